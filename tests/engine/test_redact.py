"""Secrets are masked before anything is recorded or printed."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import pytest
from sqlalchemy.exc import StatementError

from engine._config import load_settings
from engine._redact import (
    MIN_SECRET_LENGTH,
    REDACTED,
    Secrets,
    mask_url_passwords,
    redact,
    redact_url,
    secrets_of,
    without_row_values,
)


def test_secret_looking_keys_are_masked_at_any_depth() -> None:
    settings = {
        "options": {"api_key": "sk-123", "nested": [{"password": "hunter2"}], "model": "m"},
        "Authorization": "Bearer abc",
        "client_secret": "s",
    }
    masked = redact(settings)
    assert masked["options"]["api_key"] == REDACTED
    assert masked["options"]["nested"][0]["password"] == REDACTED
    assert masked["Authorization"] == REDACTED
    assert masked["client_secret"] == REDACTED
    assert masked["options"]["model"] == "m"


def test_names_of_environment_variables_are_kept() -> None:
    assert redact({"api_key_env": "OPENAI_API_KEY"}) == {"api_key_env": "OPENAI_API_KEY"}


def test_passwords_in_urls_are_hidden() -> None:
    url = "postgresql+asyncpg://ledger:s3cret@db.internal:5432/audit"
    assert "s3cret" not in redact_url(url)
    assert "s3cret" not in redact({"url": url})["url"]
    assert redact({"url": "sqlite+aiosqlite:///runs/audit.db"}) == {
        "url": "sqlite+aiosqlite:///runs/audit.db"
    }


def test_the_original_is_not_changed() -> None:
    settings = {"token": "t"}
    redact(settings)
    assert settings == {"token": "t"}


# -- masking by value ------------------------------------------------------------------

KEY = "sk-live-0123456789abcdef"


def test_a_secret_is_masked_wherever_it_occurs_in_text_bytes_and_values() -> None:
    secrets = Secrets([KEY])
    assert secrets.scrub_text(f"Incorrect API key provided: {KEY}.") == (
        f"Incorrect API key provided: {REDACTED}."
    )
    echoed = {"error": {"message": f"Bearer {KEY}", KEY: [KEY, 3]}, "n": 1}
    assert secrets.scrub(echoed) == {
        "error": {"message": f"Bearer {REDACTED}", REDACTED: [REDACTED, 3]},
        "n": 1,
    }
    assert echoed["error"]["message"] == f"Bearer {KEY}"  # the original is not changed
    assert secrets.scrub_bytes(f'{{"k": "{KEY}"}}'.encode()) == b'{"k": "***"}'


def test_a_secret_is_masked_also_as_json_escapes_and_urls_write_it() -> None:
    password = 'pa/ss"word@1'
    secrets = Secrets([password])
    escaped = json.dumps({"p": password}).encode()  # "pa/ss\"word@1"
    php_escaped = escaped.replace(b"/", b"\\/")  # "pa\/ss\"word@1"
    in_url = f"http://user:{quote(password, safe='')}@host/".encode()
    for data in (escaped, php_escaped, in_url):
        assert secrets.found_in(data)
        assert password.encode() not in secrets.scrub_bytes(data)
        assert b"***" in secrets.scrub_bytes(data)


def test_numbers_are_kept_where_a_secret_has_their_digits() -> None:
    secrets = Secrets(["12345678"])
    assert secrets.scrub({"tokens": 12345678, "text": "pin 12345678"}) == {
        "tokens": 12345678,
        "text": f"pin {REDACTED}",
    }


def test_secrets_shorter_than_the_minimum_are_masked_only_by_place() -> None:
    short = "x" * (MIN_SECRET_LENGTH - 1)
    secrets = Secrets([short, None, ""])
    assert not secrets
    assert secrets.scrub_text(f"{short} marks the spot") == f"{short} marks the spot"
    url = f"postgresql+asyncpg://ledger:{short}@db/audit"
    assert secrets.scrub_message(f"cannot open {url}") == (
        f"cannot open postgresql+asyncpg://ledger:{REDACTED}@db/audit"
    )
    assert secrets.scrub_error({"message": url}) == {"message": redact_url(url)}


def test_url_passwords_are_masked_by_place_in_any_text() -> None:
    text = (
        "proxy http://relay:p@ss@proxy:3128 refused; "
        "not a database URL: 'postgresql+asyncpg//ledger:s3cret@db/audit'; "
        "http://example.com:8080/x unchanged, mailto:someone@example.com too"
    )
    assert mask_url_passwords(text) == (
        "proxy http://relay:***@proxy:3128 refused; "
        "not a database URL: 'postgresql+asyncpg//ledger:***@db/audit'; "
        "http://example.com:8080/x unchanged, mailto:someone@example.com too"
    )


def test_no_value_is_shown_by_repr() -> None:
    assert KEY not in repr(Secrets([KEY]))


# -- what a pipeline makes secret ------------------------------------------------------


def test_the_secrets_of_a_pipeline_are_what_its_settings_point_to_not_their_names(
    tmp_path: Path,
) -> None:
    (tmp_path / "llm.key").write_text("file-key-0123456789\n", encoding="utf-8")
    settings = load_settings(
        {
            "endpoints": {
                "from_env": {"base_url": "http://gw:gateway-pass@llm/v1", "api_key_env": "K"},
                "from_file": {"base_url": "http://llm/v1", "api_key_file": "llm.key"},
            },
            "source": {
                "plugin": "memory",
                "options": {"rows": [], "password": "option-password"},
                "on_success": "db",
            },
            "sinks": [
                {
                    "name": "db",
                    "plugin": "database",
                    "options": {"url": "postgresql+asyncpg://w:sink-password@h/d", "table": "t"},
                }
            ],
        }
    )
    environ = {
        "K": "env-key-0123456789",
        "HTTPS_PROXY": "http://relay:proxy-password@proxy:3128",
        "PGPASSWORD": "pg-password",
        "HOME": "/home/someone-else",
    }
    found = secrets_of(
        settings,
        tmp_path,
        landscape_url="postgresql+asyncpg://ledger:landscape-password@db/audit",
        environ=environ,
    )
    expected = {
        "env-key-0123456789",
        "file-key-0123456789",
        "gateway-pass",
        "option-password",
        "sink-password",
        "proxy-password",
        "pg-password",
        "landscape-password",
    }
    assert expected <= found.values
    assert not {"K", "llm.key", "/home/someone-else"} & found.values


# -- row values in printed errors --------------------------------------------------------


def _run_failure(*, hide_parameters: bool) -> RuntimeError:
    """A run's failure quoting a sink's, quoting the SQL error behind it, as wrapping
    errors do (each the cause of the next)."""
    sql = StatementError(
        "(IntegrityError) CHECK constraint failed: note",
        "INSERT INTO t (token_id, note) VALUES (?, ?)",
        ("t-1", "row-value-42"),
        None,
        hide_parameters=hide_parameters,
    )
    sink = RuntimeError(f"sink 'db' failed to write: {sql}")
    sink.__cause__ = sql
    run = RuntimeError(f"run r1 failed: {sink}")
    run.__cause__ = sink
    return run


@pytest.mark.parametrize("hidden_by_the_engine", [False, True])
def test_the_parameters_of_a_sql_error_are_printed_only_when_verbose(
    hidden_by_the_engine: bool,
) -> None:
    failure = _run_failure(hide_parameters=hidden_by_the_engine)
    text = str(failure)
    quiet = without_row_values(text, failure, verbose=False)
    loud = without_row_values(text, failure, verbose=True)
    assert "row-value-42" not in quiet
    assert "[SQL parameters hidden; --verbose shows them]" in quiet
    assert "run r1 failed: sink 'db' failed to write:" in quiet
    assert "CHECK constraint failed: note" in quiet
    assert "row-value-42" in loud
    assert "[SQL: INSERT INTO t (token_id, note) VALUES (?, ?)]" in loud


def test_a_value_the_driver_quotes_is_printed_only_when_verbose() -> None:
    error = ValueError(
        "invalid input for query argument $2: 'row-value-42' (expected str, got int)"
    )
    assert without_row_values(str(error), error, verbose=False) == (
        "invalid input for query argument $2: (value hidden; --verbose shows it)"
    )
    assert without_row_values(str(error), error, verbose=True) == str(error)
