"""Secrets and row data stay out of what the CLI prints and what the Landscape records.

Each test runs ``ledgerflow`` as a subprocess, the way an operator does: a PostgreSQL
Landscape behind a password (a server of this module's own, which checks passwords
over TCP, so the password really matters), an LLM endpoint that echoes the API key and
the proxy's credentials back, and a Landscape that refuses a write carrying a row.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import shlex
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import orjson
import pytest
import yaml
from sqlalchemy import select

from landscape import Landscape
from landscape import _schema as t
from tests._postgres import PostgresServer, PostgresUnavailable, start_server
from tests.llm._raw_server import Connection, chat_answer, raw_server, response

from ._crash import (
    check_audit,
    cli_command,
    finish,
    mock_server,
    start_cli,
    started_run,
    write_pipeline,
)
from .conftest import run_id_of

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 3
EXIT_ROW_ERRORS = 4

#: The Landscape role's password: long enough to be masked wherever it occurs.
PASSWORD = "pw-" + secrets.token_hex(12)


async def ledgerflow(work: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``ledgerflow ARGS`` in ``work`` with ``env`` added to an environment without
    ``PGPASSWORD``; its exit code and output (stdout, then stderr)."""
    base = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"}
    full_env = {**base, "NO_COLOR": "1", "COLUMNS": "160", **(env or {})}
    done = await anyio.run_process(
        cli_command(*args),
        cwd=work,
        env=full_env,
        check=False,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    return done.returncode, done.stdout.decode() + done.stderr.decode()


# -- a PostgreSQL server that checks passwords ------------------------------------------


@pytest.fixture(scope="module")
def guarded_server() -> Iterator[PostgresServer]:
    """A server of this module's own whose TCP connections need a password (SCRAM),
    with role ``ledger`` (password :data:`PASSWORD`); its socket stays open to the
    ``postgres`` superuser without one, for setting up."""
    if os.environ.get("LEDGERFLOW_SKIP_POSTGRES") == "1":
        pytest.skip("LEDGERFLOW_SKIP_POSTGRES=1")
    try:
        server = start_server()
    except PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        hba = server.root / "data" / "pg_hba.conf"
        lines = hba.read_text().splitlines()
        hba.write_text(
            "\n".join(
                line.replace("trust", "scram-sha-256") if line.startswith("host") else line
                for line in lines
            )
            + "\n"
        )
        anyio.run(_superuser, server, f"CREATE ROLE ledger LOGIN PASSWORD '{PASSWORD}'")
        anyio.run(_superuser, server, "SELECT pg_reload_conf()")
        yield server
    finally:
        server.stop()


async def _superuser(server: PostgresServer, sql: str) -> None:
    conn = await asyncpg.connect(host=str(server.root), port=server.port, user="postgres")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
async def landscape_url(guarded_server: PostgresServer) -> str:
    """The URL, password included, of a new database owned by ``ledger``."""
    name = f"t_{secrets.token_hex(8)}"
    await _superuser(guarded_server, f'CREATE DATABASE "{name}" OWNER ledger')
    return f"postgresql+asyncpg://ledger:{PASSWORD}@127.0.0.1:{guarded_server.port}/{name}"


async def test_the_server_refuses_a_wrong_password(landscape_url: str) -> None:
    """What makes the tests below mean something: the password is checked."""
    with pytest.raises(asyncpg.InvalidPasswordError):
        await _as_ledger(landscape_url.replace(PASSWORD, "wrong"), "SELECT 1")


# -- the Landscape password ---------------------------------------------------------------


@pytest.mark.timeout(300)
async def test_an_interrupted_runs_resume_command_masks_the_password_and_works_with_pgpassword(
    landscape_url: str, tmp_path: Path
) -> None:
    async with mock_server(latency=0.1) as server:
        # The pool batches only at the end, so the run is still busy when it is signalled.
        pipeline = write_pipeline(tmp_path, server.base_url, pool_count=10_000)
        args = ("run", str(pipeline), "--no-progress", "--landscape", landscape_url)
        process = await start_cli(tmp_path, *args)
        run_id, printed = await started_run(process)
        with anyio.fail_after(60):
            await server.wait_in_flight(8)
        os.killpg(process.pid, signal.SIGINT)
        with anyio.fail_after(60):
            code, output = await finish(process, printed)
        assert code == EXIT_INTERRUPTED, output
        assert PASSWORD not in output
        masked = landscape_url.replace(PASSWORD, "***")
        (command_line,) = re.findall(r"^resume with: (.*)$", output, re.M)
        command = shlex.split(command_line)
        assert command == [
            "ledgerflow", "resume", run_id, "--pipeline", str(pipeline), "--landscape", masked
        ]  # fmt: skip
        assert "PGPASSWORD" in output

        # As printed, without the password: refused, saying how to give it.
        code, refused = await ledgerflow(tmp_path, *command[1:])
        assert code == EXIT_CONFIG, refused
        assert "set PGPASSWORD" in refused
        # With the password where the hint says: the run is finished.
        code, resumed = await ledgerflow(tmp_path, *command[1:], env={"PGPASSWORD": PASSWORD})
        assert code == 0, resumed
        assert PASSWORD not in resumed

    await check_audit(tmp_path, run_id, landscape_url)
    for listing in (
        ("runs", "--landscape", landscape_url),
        ("verify", run_id, "--landscape", landscape_url),
    ):
        code, shown = await ledgerflow(tmp_path, *listing)
        assert code == 0, shown
        assert run_id in shown
        assert PASSWORD not in shown


async def test_a_refused_password_is_masked_in_the_error(
    landscape_url: str, tmp_path: Path
) -> None:
    wrong = "wrong-" + secrets.token_hex(12)
    code, output = await ledgerflow(
        tmp_path, "runs", "--landscape", landscape_url.replace(PASSWORD, wrong)
    )
    assert code == EXIT_FAILED, output
    assert "password authentication failed" in output
    assert wrong not in output
    assert "ledger:***@127.0.0.1" in output
    async with Landscape.connect(landscape_url) as landscape:  # the database is sound
        assert await landscape.list_runs() == []


# -- an LLM endpoint that echoes credentials ----------------------------------------------

API_KEY = "sk-test-" + secrets.token_hex(16)
PROXY_USER, PROXY_PASSWORD = "relay", "proxy-" + secrets.token_hex(12)


def _header(head: bytes, name: bytes) -> str:
    found = re.search(rb"(?im)^" + name + rb":\s*(.*?)\s*$", head)
    return found.group(1).decode() if found else ""


async def _echoing_proxy(connection: Connection, logins: list[str]) -> None:
    """A forward proxy that is also the endpoint, and a careless one: it answers the
    prompts that ask for it with the key they were sent, and every other request with
    401 and everything it was sent — the key and the proxy credentials, as they came
    and decoded — in its body and its headers.  ``logins`` gets each request's
    ``Proxy-Authorization``."""
    while (request := await connection.request()) is not None:
        key = _header(request.head, b"authorization")
        proxy = _header(request.head, b"proxy-authorization")
        logins.append(proxy)
        if "your key" in request.prompt:
            await connection.send(response(chat_answer(f"the key you sent: {key}")))
            continue
        login = base64.b64decode(proxy.removeprefix("Basic ")).decode() if proxy else ""
        body = orjson.dumps(
            {
                "error": {
                    "message": f"Incorrect API key provided: {key.removeprefix('Bearer ')}",
                    "proxy_login": login,
                    "request": request.head.decode(),
                }
            }
        )
        echoed = f"www-authenticate: Bearer error={key}\r\nx-proxy: {proxy}\r\n".encode()
        await connection.send(response(body, status="401 Unauthorized", headers=echoed))


def _llm_pipeline(work: Path) -> Path:
    rows = [{"id": 0, "text": "what is your key?"}] + [
        {"id": i, "text": f"ticket {i}"} for i in range(1, 4)
    ]
    config = {
        "endpoints": {
            "careless": {
                "base_url": "http://llm.invalid/v1",
                "api_key_env": "LEDGERFLOW_SECRET_TEST_KEY",
                "max_attempts": 2,
                "backoff": {"initial_seconds": 0.01, "max_seconds": 0.02},
            }
        },
        "source": {"plugin": "jsonl", "options": {"path": "rows.jsonl"}, "on_success": "raw"},
        "transforms": [
            {
                "name": "ask",
                "plugin": "llm",
                "input": "raw",
                "on_success": "out",
                "on_error": "errors",
                "options": {
                    "endpoint": "careless",
                    "model": "any",
                    "prompt": "{{ row.text }}",
                    "response_format": "text",
                    "output_field": "answer",
                },
            }
        ],
        "sinks": [
            {"name": "out", "plugin": "jsonl", "options": {"path": "out/out.jsonl"}},
            {"name": "errors", "plugin": "jsonl", "options": {"path": "out/errors.jsonl"}},
        ],
    }
    (work / "rows.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    path = work / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


async def test_an_api_key_and_proxy_credentials_echoed_by_the_server_are_in_no_record_or_output(
    tmp_path: Path,
) -> None:
    sent: list[str] = []

    async def handler(connection: Connection) -> None:
        await _echoing_proxy(connection, sent)

    async with raw_server(handler) as proxy:
        proxy_url = f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{proxy.port}"
        env = {"LEDGERFLOW_SECRET_TEST_KEY": API_KEY, "http_proxy": proxy_url, "no_proxy": ""}
        code, output = await ledgerflow(
            tmp_path, "run", str(_llm_pipeline(tmp_path)), "--no-progress", env=env
        )
    assert code == EXIT_ROW_ERRORS, output  # three rows refused with 401
    run_id = run_id_of(output)
    code, verified = await ledgerflow(tmp_path, "verify", run_id)
    assert code == 0, verified

    proxy_login = f"{PROXY_USER}:{PROXY_PASSWORD}"
    basic = base64.b64encode(proxy_login.encode()).decode()
    assert proxy.connections > 0
    leaked = [API_KEY, PROXY_PASSWORD, basic]
    for text in leaked:
        assert text not in output
    # Every byte the run left: the Landscape (and its WAL, if any) and the sinks.
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "rows.jsonl"]  # noqa: ASYNC240
    assert any(p.name == "audit.db" for p in files)
    for path in files:
        content = path.read_bytes()
        for text in leaked:
            assert text.encode() not in content, (path, text)
    # What the server said is on record, masked where it quoted the secrets.
    with sqlite3.connect(tmp_path / "runs" / "audit.db") as conn:
        errors = [
            orjson.loads(e)
            for (e,) in conn.execute("SELECT error_json FROM calls WHERE error_json IS NOT NULL")
        ]
    bodies = [orjson.loads(e["body"]) for e in errors]
    assert len(bodies) == 3
    for body in bodies:
        assert body["error"]["message"] == "Incorrect API key provided: ***"
        assert body["error"]["proxy_login"] == f"{PROXY_USER}:***"
    answered = orjson.loads((tmp_path / "out" / "out.jsonl").read_bytes())
    assert answered["answer"] == "the key you sent: Bearer ***"
    assert sent == [f"Basic {basic}"] * 4  # the proxy's credentials went with each request


# -- row values in a Landscape error --------------------------------------------------------

ROW_VALUE = "refuse-me-" + secrets.token_hex(8)

REFUSE = """
CREATE FUNCTION refuse_marked() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.content LIKE '%refuse-me-%' THEN
        RAISE EXCEPTION 'this payload is refused';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_marked BEFORE INSERT ON payloads
    FOR EACH ROW EXECUTE FUNCTION refuse_marked();
"""


async def _as_ledger(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _plain_pipeline(work: Path) -> Path:
    rows = [{"id": i, "note": ROW_VALUE if i == 2 else f"note {i}"} for i in range(4)]
    config = {
        "source": {"plugin": "jsonl", "options": {"path": "rows.jsonl"}, "on_success": "out"},
        "sinks": [{"name": "out", "plugin": "jsonl", "options": {"path": "out/out.jsonl"}}],
    }
    (work / "rows.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    path = work / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.mark.timeout(300)
async def test_a_landscape_error_shows_the_rows_values_only_with_verbose(
    landscape_url: str, tmp_path: Path
) -> None:
    pipeline = _plain_pipeline(tmp_path)
    async with Landscape.connect(landscape_url):  # the schema, for the trigger to go on
        pass
    await _as_ledger(landscape_url, REFUSE)
    landscape_args = ("--pipeline", str(pipeline), "--landscape", landscape_url)

    code, output = await ledgerflow(
        tmp_path, "run", str(pipeline), "--no-progress", "--landscape", landscape_url
    )
    assert code == EXIT_FAILED, output
    assert "this payload is refused" in output
    assert "[SQL: INSERT INTO payloads" in output
    assert "parameters hidden; --verbose shows them" in output
    assert ROW_VALUE not in output
    assert PASSWORD not in output
    run_id = re.findall(r"starting run (\S+) ", output)[0]

    code, output = await ledgerflow(tmp_path, "resume", run_id, *landscape_args, "--verbose")
    assert code == EXIT_FAILED, output
    assert "this payload is refused" in output
    assert ROW_VALUE in output
    assert PASSWORD not in output

    await _as_ledger(landscape_url, "DROP TRIGGER refuse_marked ON payloads")
    code, output = await ledgerflow(tmp_path, "resume", run_id, *landscape_args)
    assert code == 0, output
    assert PASSWORD not in output
    await check_audit(tmp_path, run_id, landscape_url)


async def test_a_plugins_error_quoting_a_configured_secret_is_recorded_masked(
    run_verified: Any, sqlite_url: str, tmp_path: Path
) -> None:
    password = "hunter2-but-longer"
    config = {
        "source": {"plugin": "memory", "options": {"rows": [{"id": 1}]}, "on_success": "login"},
        "transforms": [
            {
                "name": "login",
                "plugin": "tests.engine.sample_plugins:Login",
                "input": "login",
                "on_success": "out",
                "on_error": "errors",
                "options": {"password": password},
            }
        ],
        "sinks": [
            {"name": "out", "plugin": "jsonl", "options": {"path": "out.jsonl"}},
            {"name": "errors", "plugin": "jsonl", "options": {"path": "errors.jsonl"}},
        ],
    }
    result = await run_verified(config)
    assert result.row_errors == 1
    audit = Path(sqlite_url.removeprefix("sqlite+aiosqlite:///"))
    recorded = b"".join(
        path.read_bytes() for path in audit.parent.glob(audit.name + "*") if path.is_file()
    )
    assert password.encode() not in recorded
    async with Landscape.connect(sqlite_url) as landscape, landscape.engine.connect() as conn:
        errors = (await conn.execute(select(t.node_states.c.error_json))).scalars().all()
    (error,) = [e for e in errors if e]
    assert "login refused for '***' at https://bot:***@api/" in error
    errors_sink = (tmp_path / "errors.jsonl").read_text()
    assert password not in errors_sink
    assert "login refused for '***'" in errors_sink
