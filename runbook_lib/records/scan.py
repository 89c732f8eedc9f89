"""The secret scan every record goes through: the value of every secret the runner knows, in every
form a record can hold it, looked for in every file of the places scanned (the run directory, the
interactive run directories, the notebooks JupyterLab saves); a hit is masked in place and reported
by file and secret NAME, never by value.

The forms (`secret_forms`): raw; URL-encoded (upper- and lowercase `%xx`, `+` for spaces); JSON-escaped;
HTML-escaped the ways Python and nbconvert write it (`&#x27;` / `&#39;`, `&quot;` / `&#34;`), also
over the JSON-escaped form (a JSON output rendered in HTML); base64 and URL-safe base64 at each of
the three alignments, so the value is found inside a longer encoded text such as the `user:password`
of a Basic-auth header; and the leading and trailing half of a long value (a value cut short before
it could be masked: `text[:120]`, `...[-40:]`).

Credentials the runner does not know are also found by their shape (`SHAPES`): Supabase access
tokens, Prefect API keys, GitHub tokens, and every JWT whose role is not `anon` (a service_role key;
the anon key is public by design and stays).
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import quote, quote_plus, unquote_to_bytes

from runbook_lib.core.secrets import JWT, MIN_SECRET_LENGTH, jwt_role
from runbook_lib.records.manifest import SecretFinding, SecretScan

# A value this long or longer is also looked for cut short (its first and last half, at least this long).
TRUNCATED_MIN = 12
# base64 forms only for values long enough that their encoded core cannot occur by chance.
BASE64_MIN = 8

_PERCENT = re.compile(r"%[0-9A-F]{2}")

# Credentials recognised by their shape alone (label -> pattern), whatever their value.
SHAPES: tuple[tuple[str, re.Pattern[bytes]], ...] = (
    ("a Supabase access token (by shape)", re.compile(rb"\bsbp_[A-Za-z0-9]{20,}")),
    ("a Prefect API key (by shape)", re.compile(rb"\bpnu_[A-Za-z0-9]{20,}")),
    ("a GitHub token (by shape)", re.compile(rb"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{22,})")),
)
_JWT = re.compile(JWT.pattern.encode())


_BASE64_RUN = re.compile(rb"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{24,}={0,2}")
_PERCENT_RUN = re.compile(rb"(?:[A-Za-z0-9._~+-]|%[0-9A-Fa-f]{2}){24,}")  # linear: no nested optional groups
# Where a URL-encoded run can hold something encoded: the stretches of the bytes such runs are made of
# around each `%xx` (a record is mostly runs of letters with no `%` in them: not decoded, so not matched).
_PERCENT_HIT = re.compile(rb"%[0-9A-Fa-f]{2}")
_STRETCH = re.compile(rb"[A-Za-z0-9._~+%-]*")
_BEFORE_STRETCH = re.compile(rb"(?s).*[^A-Za-z0-9._~+%-]")  # up to the last byte outside a stretch


def _shaped(data: bytes) -> list[str]:
    """The labels of the credentials `data` holds by their shape (see `SHAPES`, non-anon JWTs)."""
    found = [label for label, pattern in SHAPES if pattern.search(data)]
    for match in _JWT.finditer(data):
        role = jwt_role(match.group(0).decode("ascii", "replace"))
        if role and role != "anon":
            found.append(f"a JWT with role {role!r} (by shape)")
    return found


def _mask_shapes(data: bytes, names: list[str]) -> bytes:
    # Inside base64 first (a Basic-auth header, an encoded payload): the whole encoded run is masked.
    def encoded(match: re.Match[bytes]) -> bytes:
        run = match.group(0)
        try:
            decoded = base64.b64decode(run + b"=" * (-len(run) % 4), altchars=b"-_" if b"-" in run or b"_" in run else None)
        except ValueError:
            return run
        labels = _shaped(decoded) if decoded.isascii() else []
        for label in labels:
            if f"{label} (base64)" not in names:
                names.append(f"{label} (base64)")
        return f"[redacted:{labels[0]} (base64)]".encode() if labels else run
    data = _BASE64_RUN.sub(encoded, data)

    def percent(match: re.Match[bytes]) -> bytes:  # URL-encoded: looked at decoded
        run = match.group(0)
        labels = _shaped(unquote_to_bytes(run)) if b"%" in run else []
        for label in labels:
            if f"{label} (URL-encoded)" not in names:
                names.append(f"{label} (URL-encoded)")
        return f"[redacted:{labels[0]} (URL-encoded)]".encode() if labels else run
    data = _in_percent_stretches(data, lambda stretch: _PERCENT_RUN.sub(percent, stretch))
    for label, pattern in SHAPES:
        data, hits = pattern.subn(f"[redacted:{label}]".encode(), data)
        if hits and label not in names:
            names.append(label)

    def jwt(match: re.Match[bytes]) -> bytes:
        role = jwt_role(match.group(0).decode("ascii", "replace"))
        if not role or role == "anon":  # the anon key is public; a token without a role is no Supabase key
            return match.group(0)
        label = f"a JWT with role {role!r} (by shape)"
        if label not in names:
            names.append(label)
        return f"[redacted:{label}]".encode()
    return _JWT.sub(jwt, data)


def _in_percent_stretches(data: bytes, change: Callable[[bytes], bytes]) -> bytes:
    """`data` with `change` applied to each maximal stretch of URL-run bytes (letters, digits,
    `._~+-%`) that holds a `%xx`, the rest as it is. No `_PERCENT_RUN` match crosses a stretch's
    ends, so `_PERCENT_RUN.sub` over the stretches finds what it finds over the whole `data`."""
    pieces, done = [], 0
    for hit in _PERCENT_HIT.finditer(data):
        if hit.start() < done:
            continue  # in the stretch just changed
        window = 256
        while True:  # back to the byte after the last one outside the stretch (a window in C, widened)
            low = max(done, hit.start() - window)
            before = _BEFORE_STRETCH.match(data, low, hit.start())
            if before is not None or low == done:
                start = before.end() if before is not None else low
                break
            window *= 4
        end = _STRETCH.match(data, hit.start()).end()
        pieces += [data[done:start], change(data[start:end])]
        done = end
    return b"".join(pieces + [data[done:]]) if pieces else data


def _html_forms(text: str) -> set[str]:
    escaped = html.escape(text, quote=False)
    return {
        html.escape(text, quote=True),                                        # &quot; &#x27;
        escaped.replace('"', "&#34;").replace("'", "&#39;"),                  # nbconvert / Jinja's escape
        escaped.replace('"', "&quot;").replace("'", "&#39;"),
        escaped,
    }


def _base64_cores(value: str) -> set[str]:
    """The part of value's base64 encoding that does not depend on what precedes or follows it, at
    each of the 3 byte alignments, in both alphabets: found inside any base64 text that holds it."""
    raw = value.encode()
    cores = set()
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw).decode()
        start = -(-8 * shift // 6)  # the first character made only of the value's bits
        end = (8 * (shift + len(raw))) // 6  # past the last one
        core = encoded[start:end]
        if len(core) >= BASE64_MIN:
            cores |= {core, core.replace("+", "-").replace("/", "_")}
    return cores


def url_encoded_pattern(value: str) -> re.Pattern[bytes]:
    """`value` with any of its characters but letters and digits percent-encoded, in either case
    (`%2F` or `%2f`, `-` or `%2D`), or `+` for a space: as every URL encoder writes it."""
    parts = []
    for char in value:
        if char.isascii() and char.isalnum():
            parts.append(re.escape(char.encode()))
            continue
        encoded = b"".join(b"%%[%X%x][%X%x]" % (b >> 4, b >> 4, b & 15, b & 15) for b in char.encode())
        alternatives = [re.escape(char.encode()), encoded] + ([rb"\+"] if char == " " else [])
        parts.append(b"(?:" + b"|".join(alternatives) + b")")
    return re.compile(b"".join(parts))


def secret_forms(value: str) -> set[str]:
    """Every literal form of `value` the scan looks for (see the module doc; URL-encoded forms
    are also matched by `url_encoded_pattern`)."""
    url = {quote(value, safe=""), quote_plus(value)}
    url |= {_PERCENT.sub(lambda m: m.group(0).lower(), u) for u in url}
    as_json = json.dumps(value)[1:-1]
    forms = {value, as_json} | url
    forms |= _html_forms(value) | _html_forms(as_json)
    if len(value) >= BASE64_MIN:
        forms |= _base64_cores(value)
    return {f for f in forms | partial_forms(value) if len(f) >= MIN_SECRET_LENGTH}


def partial_forms(value: str) -> set[str]:
    """A long value cut short: its first or last half (at least TRUNCATED_MIN characters), raw or JSON-escaped."""
    if len(value) < 2 * TRUNCATED_MIN - 4:
        return set()
    half = max(TRUNCATED_MIN, len(value) // 2)
    return {form for part in (value[:half], value[-half:]) for form in (part, json.dumps(part)[1:-1])}


def _files(places: Iterable[Path]) -> list[Path]:
    found: set[Path] = set()
    for place in places:
        place = Path(place)
        if place.is_file():
            found.add(place)
        elif place.is_dir():
            found.update(p for p in place.rglob("*") if p.is_file())  # checkpoints included
    return sorted(found)


def scan_for_secrets(run_dir: Path, secrets: dict[str, str], *, also: Iterable[Path] = (),
                     relative_to: Path | None = None) -> SecretScan:
    """Look for every secret value (by NAME -> value), in every form, in every file under `run_dir`
    and under each of `also` (directories or files); mask each hit in place (the record keeps its
    shape, the value is gone) and report it by file (relative to `run_dir`, else to `relative_to`)
    and name."""
    secrets = {name: v for name, v in secrets.items() if v and len(v) >= MIN_SECRET_LENGTH}
    # Whole values first (longest first, so that a secret containing another one is masked whole), in
    # every form, URL-encoded ones included; then what is left of a value cut short.
    whole = sorted(((form.encode(), name) for name, v in secrets.items() for form in secret_forms(v) - partial_forms(v)),
                   key=lambda item: len(item[0]), reverse=True)
    halves = sorted(((form.encode(), name) for name, v in secrets.items() for form in partial_forms(v)),
                    key=lambda item: len(item[0]), reverse=True)
    patterns = [(url_encoded_pattern(v), name) for name, v in sorted(secrets.items(), key=lambda kv: -len(kv[1]))]
    findings: list[SecretFinding] = []
    run_dir = Path(run_dir)
    files = _files([run_dir, *also])
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        names: list[str] = []
        data = _replace(data, whole, names)
        for pattern, name in patterns:
            data, hits = pattern.subn(f"[redacted:{name}]".encode(), data)
            if hits and name not in names:
                names.append(name)
        data = _replace(data, halves, names)
        data = _mask_shapes(data, names)
        if names:
            path.write_bytes(data)
            findings.extend(SecretFinding(file=_shown(path, run_dir, relative_to), secret=name) for name in names)
    return SecretScan(scanned_files=len(files), secrets_known=sorted(secrets), findings=findings)


def _replace(data: bytes, needles: list[tuple[bytes, str]], names: list[str]) -> bytes:
    for needle, name in needles:
        if needle in data:
            data = data.replace(needle, f"[redacted:{name}]".encode())
            if name not in names:
                names.append(name)
    return data


def _shown(path: Path, run_dir: Path, relative_to: Path | None) -> str:
    for base in (run_dir, relative_to):
        if base is not None and path.is_relative_to(base):
            return str(path.relative_to(base))
    return str(path)
