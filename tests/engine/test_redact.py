"""Secrets are masked before anything is recorded or printed."""

from __future__ import annotations

from engine._redact import REDACTED, redact, redact_url


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
