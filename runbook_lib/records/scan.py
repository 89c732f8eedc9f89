"""The secret scan every record of a run goes through: the raw value of every secret the runner
knows, and its URL-, JSON- and HTML-escaped forms, looked for in every file of the run directory;
a hit is masked in place and reported by file and secret NAME, never by value."""

from __future__ import annotations

import html
import json
from pathlib import Path
from urllib.parse import quote, quote_plus

from runbook_lib.core.secrets import MIN_SECRET_LENGTH
from runbook_lib.records.manifest import SecretFinding, SecretScan


def _forms(value: str) -> set[str]:
    """The ways a value can appear in a file: raw, URL-encoded, JSON-escaped, HTML-escaped."""
    return {value, quote(value, safe=""), quote_plus(value), json.dumps(value)[1:-1], html.escape(value, quote=True)}


def scan_for_secrets(run_dir: Path, secrets: dict[str, str]) -> SecretScan:
    """Look for every secret value (by NAME -> value) in every file under `run_dir`; mask each hit in
    place (the record keeps its shape, the value is gone) and report it by file and name."""
    secrets = {name: v for name, v in secrets.items() if v and len(v) >= MIN_SECRET_LENGTH}
    # Longest values first, so that a secret containing another one is masked whole.
    needles = sorted(((form.encode(), name) for name, v in secrets.items() for form in _forms(v)),
                     key=lambda item: len(item[0]), reverse=True)
    findings: list[SecretFinding] = []
    files = sorted(p for p in Path(run_dir).rglob("*") if p.is_file())
    for path in files:
        data = path.read_bytes()
        names: list[str] = []
        for needle, name in needles:
            if needle in data:
                data = data.replace(needle, f"[redacted:{name}]".encode())
                if name not in names:
                    names.append(name)
        if names:
            path.write_bytes(data)
            rel = str(path.relative_to(run_dir))
            findings.extend(SecretFinding(file=rel, secret=name) for name in names)
    return SecretScan(scanned_files=len(files), secrets_known=sorted(secrets), findings=findings)
