"""runbook_lib.core.secrets, what tests/test_runbook_core.py does not cover already: what a secret
looks like (names, credential shapes, JWT roles, known values in a text), masking of nested and
overlapping secrets, the registry's lifecycle, and the logging filter."""

from __future__ import annotations

import base64
import io
import json
import logging

import pytest

from runbook_lib.core import secrets as redaction
from runbook_lib.core.errors import (
    RunbookError,
)


def _jwt(claims: dict) -> str:
    part = lambda obj: base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")  # noqa: E731
    return f"{part({'alg': 'HS256'})}.{part(claims)}.c2lnbmF0dXJl"


@pytest.mark.parametrize("name", ["API_KEY", "MODAL_TOKEN_SECRET", "db_password", "DSN", "pwd", "GH_CREDENTIALS",
                                  "private_key_pem", "connection_string", "DATABASE_URL", "supabase_anon_key"])
def test_secret_like_names(name):
    assert redaction.looks_like_secret_name(name)


@pytest.mark.parametrize("name", ["LOG_LEVEL", "ENRICHMENT_DISPATCH_URL", "REGION", "batch_size", "WORKSTREAM"])
def test_names_that_are_not_secret_like(name):
    assert not redaction.looks_like_secret_name(name)


def test_jwt_roles_are_read_without_verification():
    assert redaction.jwt_role(_jwt({"role": "anon"})) == "anon"
    assert redaction.jwt_role(_jwt({"role": "service_role"})) == "service_role"
    assert redaction.jwt_role(_jwt({"sub": "x"})) is None
    assert redaction.jwt_role(_jwt(["not", "a", "dict"])) is None
    for junk in ("", "abc", "a.%%%.c", "a.bm90IGpzb24.c"):
        assert redaction.jwt_role(junk) is None


def test_credential_kinds_name_what_a_text_holds_never_the_values():
    anon, service = _jwt({"role": "anon"}), _jwt({"role": "service_role"})
    assert redaction.credential_kinds(f"key := '{anon}'") == []  # the anon key is public by design
    assert redaction.credential_kinds(anon, anon_jwt_is_public=False) == ["a JWT"]
    assert redaction.credential_kinds(service) == ["a JWT with role 'service_role'"]
    assert redaction.credential_kinds(service, public=(service,)) == []
    assert redaction.credential_kinds(_jwt({"sub": "x"})) == ["a JWT that is not the anon key"]
    text = ("sbp_0123abcd pnu_0123abcd ghp_0123abcd github_pat_0123_abc postgresql://u:pw@h/db "
            "password := 'hunter2'")
    assert redaction.credential_kinds(text) == [
        "a Supabase access token (sbp_...)", "a Prefect API key (pnu_...)", "a GitHub token", "a URL with a password",
        "a password literal",
    ]
    assert redaction.credential_kinds("postgresql://user@host/db https://example.com/x?y=1") == []
    assert redaction.credential_kinds(f"{service} {service}") == ["a JWT with role 'service_role'"]  # once each


def test_clear_text_secrets_adds_known_values_of_eight_characters_or_more():
    known = {"MODAL_TOKEN_SECRET": "as-0123456789", "SHORT": "abc1234", "EMPTY": ""}
    text = "SELECT 'as-0123456789', 'abc1234', pnu_abcdef"
    assert redaction.clear_text_secrets(text, known) == ["a Prefect API key (pnu_...)", "the value of MODAL_TOKEN_SECRET"]
    assert redaction.clear_text_secrets("nothing here", known) == []
    assert redaction.clear_text_secrets("x") == []


def test_a_secret_containing_another_is_masked_whole():
    redaction.register_secret("abcd1234", "SHORTER")
    redaction.register_secret("xx-abcd1234-yy", "LONGER")
    assert redaction.redact("a xx-abcd1234-yy b abcd1234") == "a [redacted:LONGER] b [redacted:SHORTER]"


def test_the_plus_encoded_form_is_masked_too():
    redaction.register_secret("pass word&x", "DB")
    assert redaction.redact("q=pass+word%26x p=pass%20word%26x") == "q=[redacted:DB] p=[redacted:DB]"


def test_the_registry_lists_labels_and_forgets():
    redaction.register_secret(None)
    redaction.register_secret("")
    redaction.register_secret("abc")  # shorter than MIN_SECRET_LENGTH
    assert redaction.registered_labels() == []
    redaction.register_secret("value-one", "ONE")
    redaction.register_secret("value-two", "TWO")
    redaction.register_secret("value-one", "RELABELLED")  # the first label stays
    assert redaction.registered_labels() == ["ONE", "TWO"]
    assert redaction.redact("value-one") == "[redacted:ONE]"
    redaction.forget_secrets()
    assert redaction.registered_labels() == [] and redaction.redact("value-one") == "value-one"


def test_redact_leaves_non_text_alone_and_redact_obj_keeps_shapes():
    redaction.register_secret("tok-secret-1", "T")
    assert redaction.redact("") == "" and redaction.redact(None) is None and redaction.redact(5) == 5
    data = {"tok-secret-1": ("tok-secret-1", 1, None), "list": [{"deep": "x tok-secret-1"}], "n": 2.5}
    assert redaction.redact_obj(data) == {"[redacted:T]": ("[redacted:T]", 1, None),
                                          "list": [{"deep": "x [redacted:T]"}], "n": 2.5}


def test_the_logging_filter_masks_the_message_and_the_traceback():
    redaction.register_secret("sbp_filtersecret1", "SUPABASE_ACCESS_TOKEN")
    try:
        raise RuntimeError("token sbp_filtersecret1 refused")
    except RuntimeError:
        import sys

        exc_info = sys.exc_info()
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "sent %s", ("sbp_filtersecret1",), exc_info)
    assert redaction.RedactingFilter().filter(record) is True
    assert record.getMessage() == "sent [redacted:SUPABASE_ACCESS_TOKEN]" and record.args == ()
    assert "sbp_filtersecret1" not in record.exc_text and "[redacted:SUPABASE_ACCESS_TOKEN]" in record.exc_text
    untouched = logging.LogRecord("x", logging.INFO, __file__, 1, "n=%d", (3,), None)
    redaction.RedactingFilter().filter(untouched)
    assert untouched.args == (3,) and untouched.getMessage() == "n=3"


def test_a_redacting_stream_delegates_everything_else():
    import io

    inner = io.StringIO()
    stream = redaction.RedactingStream(inner)
    redaction.register_secret("ghp_streamsecret9", "GITHUB_TOKEN")
    assert stream.write("a ghp_streamsecret9") == len("a ghp_streamsecret9")
    stream.writelines([" b", " ghp_streamsecret9\n"])
    assert inner.getvalue() == "a [redacted:GITHUB_TOKEN] b [redacted:GITHUB_TOKEN]\n"
    assert stream.getvalue() == inner.getvalue() and stream._runbook_redaction


def test_redact_masks_registered_secrets_their_url_forms_and_patterns():
    redaction.register_secret("p@ss/w0rd!", "DATABASE_PASSWORD")
    redaction.register_secret("pnu_abcdef123456", "PREFECT_API_KEY")
    redaction.register_secret("abc", "TOO_SHORT")  # below MIN_SECRET_LENGTH: not masked
    text = "key=pnu_abcdef123456 dsn=postgresql://u:p%40ss%2Fw0rd%21@h/db raw=p@ss/w0rd! abc"
    out = redaction.redact(text)
    assert "pnu_abcdef123456" not in out and "p@ss/w0rd!" not in out and "p%40ss%2Fw0rd%21" not in out
    assert "[redacted:PREFECT_API_KEY]" in out and out.endswith(" abc")
    assert redaction.redact("postgresql://user:unknownpw@host:5432/db") == "postgresql://user:***@host:5432/db"
    assert redaction.redact("Authorization: Bearer eyJhbGciOi.payload.sig") == "Authorization: Bearer ***"
    assert redaction.redact_obj({"a": ["pnu_abcdef123456", 3]}) == {"a": ["[redacted:PREFECT_API_KEY]", 3]}

def test_log_records_and_streams_are_redacted():
    redaction.register_secret("sbp_logsecret999", "SUPABASE_ACCESS_TOKEN")
    redaction.install_log_redaction()
    buffer = io.StringIO()
    logger = logging.getLogger("runbook-test-redaction")
    handler = logging.StreamHandler(buffer)
    logger.addHandler(handler)
    try:
        logger.warning("token is %s", "sbp_logsecret999")
        try:
            raise ValueError("boom sbp_logsecret999")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    assert "sbp_logsecret999" not in buffer.getvalue()
    assert "token is [redacted:SUPABASE_ACCESS_TOKEN]" in buffer.getvalue()
    assert "boom [redacted:SUPABASE_ACCESS_TOKEN]" in buffer.getvalue()
    inner = io.StringIO()
    stream = redaction.RedactingStream(inner)
    print("x sbp_logsecret999 y", file=stream)
    assert inner.getvalue() == "x [redacted:SUPABASE_ACCESS_TOKEN] y\n"

def test_runbook_errors_are_redacted_when_created():
    redaction.register_secret("ghp_errorsecret42", "GITHUB_TOKEN")
    assert "ghp_errorsecret42" not in str(RunbookError("clone with ghp_errorsecret42 failed"))


def test_error_bodies_are_masked_before_they_are_cut_short():
    """A secret straddling the cut (a 300-character excerpt of a response body) is masked whole: cut
    first, its head would no longer be recognised and would reach the message."""
    import httpx

    from runbook_lib.core import secrets as redaction
    from runbook_lib.systems.prefect import _short_body
    from runbook_lib.systems.supabase import _message

    secret = "pnu_" + "q7" * 20
    redaction.register_secret(secret, "PREFECT_API_KEY")
    body = "e" * 290 + secret + " trailing"
    for text in (_short_body(httpx.Response(500, text=body)), _message(httpx.Response(500, text=body)),
                 _message(httpx.Response(500, json={"message": body}))):
        assert "pnu_q7q7" not in text and len(text) <= 303, text
