"""The secret scan on files holding each secret the sandbox issues, in each form a record can hold it:
raw, URL-encoded (upper and lowercase), JSON, the HTML entities nbconvert writes, inside a base64
Basic-auth header, and cut short before masking. Every form is found, masked in place, and named."""

from __future__ import annotations

import base64
import html
import json
import secrets
import string
from pathlib import Path

import jwt
import pytest

from runbook_lib.records.scan import scan_for_secrets, secret_forms


def sandbox_like_secrets() -> dict[str, str]:
    """The shapes runbook_sandbox/config.py issues (fresh values), plus a DSN password with / # ? @ : ' "."""
    ref = "".join(secrets.choice(string.ascii_lowercase) for _ in range(20))
    jwt_secret = secrets.token_urlsafe(32)
    password = "p/w#1?x@y:z'q\"" + secrets.token_urlsafe(8)
    return {
        "PREFECT_API_KEY": "pnu_" + secrets.token_hex(18),
        "SUPABASE_ACCESS_TOKEN": "sbp_" + secrets.token_hex(20),
        "SUPABASE_JWT_SECRET": jwt_secret,
        "SUPABASE_SERVICE_ROLE_KEY": jwt.encode({"iss": "supabase", "ref": ref, "role": "service_role"}, jwt_secret),
        "GITHUB_TOKEN": "ghp_" + secrets.token_hex(18),
        "DATABASE_PASSWORD": password,
        "MODAL_TOKEN_ID": "ak-" + secrets.token_hex(10),
        "MODAL_TOKEN_SECRET": "as-" + secrets.token_hex(16),
    }


def _basic(user: str, value: str) -> str:
    return "Authorization: Basic " + base64.b64encode(f"{user}:{value}".encode()).decode()


# name -> how a record can hold the value
ENCODINGS = {
    "raw": lambda v: f"token={v}\n",
    "url_upper": lambda v: "https://h/cb?x=" + "".join(c if c.isalnum() else "%%%02X" % ord(c) for c in v),
    "url_lower": lambda v: "https://h/cb?x=" + "".join(c if c.isalnum() else "%%%02x" % ord(c) for c in v),
    "json": lambda v: json.dumps({"detail": f"failed with {v}"}),
    "html_python": lambda v: f"<td>{html.escape(v)}</td>",
    "html_nbconvert": lambda v: "<pre>" + html.escape(v, quote=False).replace("'", "&#39;").replace('"', "&#34;") + "</pre>",
    "html_of_json": lambda v: "<pre>" + html.escape(json.dumps({"k": v}), quote=False).replace('"', "&#34;") + "</pre>",
    "basic_auth_user_x": lambda v: _basic("x", v),
    "basic_auth_user_postgres": lambda v: _basic("postgres", v),
    "basic_auth_urlsafe": lambda v: base64.urlsafe_b64encode(f"ab:{v}".encode()).decode(),
    "truncated_head": lambda v: f"error: {('connecting with ' + v)[:16 + len(v) // 2 + 1]}",
    "truncated_tail": lambda v: f"...{v[-(len(v) // 2 + 1):]} was refused",
}


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_each_secret_is_found_and_masked_in_each_form(tmp_path: Path, encoding: str):
    planted = sandbox_like_secrets()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name, value in planted.items():
        (run_dir / f"{name}.txt").write_text("before\n" + ENCODINGS[encoding](value) + "\nafter\n")
    scan = scan_for_secrets(run_dir, planted)
    found = {(f.file, f.secret) for f in scan.findings}
    assert {(f"{name}.txt", name) for name in planted} <= found, encoding
    for name, value in planted.items():
        text = (run_dir / f"{name}.txt").read_text()
        assert ENCODINGS[encoding](value) not in text and "[redacted:" in text, (name, text)
        assert text.startswith("before\n") and text.endswith("\nafter\n")  # the file keeps its shape
        assert value not in json.dumps(scan.model_dump())  # the report names secrets, never values


def test_base64_core_is_found_whatever_precedes_the_value():
    value = "as-" + secrets.token_hex(16)
    cores = {f for f in secret_forms(value) if f not in value}
    for prefix in ("", "a", "ab", "abc", "user:", "postgres:"):
        encoded = base64.b64encode((prefix + value + "@tail").encode()).decode()
        assert any(core in encoded for core in cores), prefix


def test_short_and_absent_values_find_nothing_and_other_places_are_scanned(tmp_path: Path):
    run_dir, interactive, notebooks = tmp_path / "run", tmp_path / "runs" / "interactive-sandbox", tmp_path / "nb"
    for d in (run_dir, interactive, notebooks / ".ipynb_checkpoints"):
        d.mkdir(parents=True)
    (run_dir / "clean.json").write_text('{"status": "passed", "abc": "short"}')
    value = "pnu_" + secrets.token_hex(18)
    (interactive / "03_deploy.json").write_text(json.dumps({"env": value}))
    (notebooks / ".ipynb_checkpoints" / "03_deploy-checkpoint.ipynb").write_text(json.dumps({"out": value}))
    scan = scan_for_secrets(run_dir, {"PREFECT_API_KEY": value, "TINY": "abc"}, also=[interactive.parent, notebooks],
                            relative_to=tmp_path)
    assert scan.secrets_known == ["PREFECT_API_KEY"]
    assert {(f.file, f.secret) for f in scan.findings} == {
        ("runs/interactive-sandbox/03_deploy.json", "PREFECT_API_KEY"),
        ("nb/.ipynb_checkpoints/03_deploy-checkpoint.ipynb", "PREFECT_API_KEY"),
    }
    assert scan.scanned_files == 3
    assert value not in (interactive / "03_deploy.json").read_text()


def test_credentials_the_runner_does_not_know_are_found_by_their_shape(tmp_path: Path):
    planted = sandbox_like_secrets()
    anon = jwt.encode({"iss": "supabase", "role": "anon"}, planted["SUPABASE_JWT_SECRET"])
    text = "\n".join([planted["PREFECT_API_KEY"], planted["SUPABASE_ACCESS_TOKEN"], planted["GITHUB_TOKEN"],
                      planted["SUPABASE_SERVICE_ROLE_KEY"], f"anon: {anon}", "pnu_short", "plain text"])
    (tmp_path / "record.txt").write_text(text)
    scan = scan_for_secrets(tmp_path, {})  # knows no value
    assert {f.secret for f in scan.findings} == {
        "a Prefect API key (by shape)", "a Supabase access token (by shape)", "a GitHub token (by shape)",
        "a JWT with role 'service_role' (by shape)"}
    masked = (tmp_path / "record.txt").read_text()
    for name in ("PREFECT_API_KEY", "SUPABASE_ACCESS_TOKEN", "GITHUB_TOKEN", "SUPABASE_SERVICE_ROLE_KEY"):
        assert planted[name] not in masked, name
    assert anon in masked and "pnu_short" in masked and "plain text" in masked  # public key and non-keys stay


def test_unknown_credentials_inside_base64_are_found_by_their_shape(tmp_path: Path):
    planted = sandbox_like_secrets()
    anon = jwt.encode({"iss": "supabase", "role": "anon"}, planted["SUPABASE_JWT_SECRET"])
    lines = [_basic("u", planted["SUPABASE_SERVICE_ROLE_KEY"]), _basic("x-access-token", planted["GITHUB_TOKEN"]),
             base64.urlsafe_b64encode(f"k={planted['PREFECT_API_KEY']}".encode()).decode(),
             _basic("u", anon), base64.b64encode(b"just some harmless text, long enough").decode()]
    (tmp_path / "r.txt").write_text("\n".join(lines))
    scan = scan_for_secrets(tmp_path, {})
    assert {f.secret for f in scan.findings} == {"a JWT with role 'service_role' (by shape) (base64)",
                                                 "a GitHub token (by shape) (base64)", "a Prefect API key (by shape) (base64)"}
    text = (tmp_path / "r.txt").read_text().splitlines()
    assert text[0] == "Authorization: Basic [redacted:a JWT with role 'service_role' (by shape) (base64)]"
    assert text[3:] == lines[3:]  # the anon key and harmless base64 stay


def test_an_unknown_service_role_key_url_encoded_and_a_url_encoded_known_value_are_masked_whole(tmp_path: Path):
    planted = sandbox_like_secrets()
    encode = lambda v: "".join(c if c.isalnum() else "%%%02x" % ord(c) for c in v)  # noqa: E731
    known = "as-" + secrets.token_hex(16)
    (tmp_path / "r.txt").write_text(encode(json.dumps({"SERVICE": planted["SUPABASE_SERVICE_ROLE_KEY"], "M": known})))
    scan = scan_for_secrets(tmp_path, {"MODAL_TOKEN_SECRET": known})
    text = (tmp_path / "r.txt").read_text()
    assert known[:12] not in text and encode(known)[:16] not in text, text  # the head of a known value too
    assert "eyJ" not in text, text
    assert "a JWT with role 'service_role' (by shape) (URL-encoded)" in {f.secret for f in scan.findings}


def test_url_encoded_keys_are_masked_wherever_their_stretch_starts_and_plain_runs_stay(tmp_path: Path):
    """The URL-encoded pass looks only at the stretches around a `%xx`: a key's run found at the start of a
    file, at its end, after another one, and after letters long past the stretch's first look-back (300 and
    5,000 characters glued to it), while long runs with no `%xx` and `%` signs that encode nothing stay."""
    planted = sandbox_like_secrets()
    key = planted["SUPABASE_SERVICE_ROLE_KEY"]
    encoded = "".join(c if c.isalnum() else "%%%02X" % ord(c) for c in "k=" + key)
    plain = "x" * 5_000
    lines = [encoded + "&a=1", "width: 100%; " + plain, "a" * 300 + encoded, "b" * 5_000 + encoded + "%41" + encoded,
             "50% done, 100%", "end " + encoded]
    (tmp_path / "r.txt").write_text("\n".join(lines))
    scan = scan_for_secrets(tmp_path, {})
    assert {f.secret for f in scan.findings} == {"a JWT with role 'service_role' (by shape) (URL-encoded)"}
    masked = (tmp_path / "r.txt").read_text().split("\n")
    label = "[redacted:a JWT with role 'service_role' (by shape) (URL-encoded)]"
    assert masked[0] == label + "&a=1"
    assert masked[1] == lines[1] and masked[4] == lines[4]
    assert masked[2] == label and masked[3] == label and masked[5] == "end " + label  # the glued letters went with it
