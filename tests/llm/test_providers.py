"""Provider profiles and secrets: Azure paths and headers, key files, and a key that
never shows in the Landscape, the sinks or what the CLI prints — even when it is wrong."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import yaml

from plugins.llm import MockLlmServer, MockSettings

from .conftest import pipeline, tickets

Run = Callable[..., Any]


async def test_azure_openai_calls_the_deployment_path_with_an_api_key_header(
    run_verified: Run, tmp_path: Path, monkeypatch: Any
) -> None:
    key = "azure-" + os.urandom(8).hex()
    monkeypatch.setenv("LEDGERFLOW_AZURE_KEY", key)
    async with MockLlmServer(MockSettings(api_key=key)) as server:
        config = pipeline(server.base_url, tickets(3), tmp_path)
        config["endpoints"]["local"] = {
            "provider": "azure_openai",
            "endpoint": server.origin,
            "deployment": "classifier",
            "api_version": "2024-10-21",
            "api_key_env": "LEDGERFLOW_AZURE_KEY",
        }
        result = await run_verified(config)
        stats = server.statistics()
    assert result.outcomes == {"completed": 3}
    assert dict(stats.requests_by_path) == {"/openai/deployments/classifier/chat/completions": 3}


async def test_a_key_can_come_from_a_secrets_file(run_verified: Run, tmp_path: Path) -> None:
    key = "file-" + os.urandom(8).hex()
    secret = tmp_path / "llm.key"
    secret.write_text(key + "\n", encoding="utf-8")
    async with MockLlmServer(MockSettings(api_key=key)) as server:
        options = {"api_key_file": str(secret)}
        result = await run_verified(
            pipeline(server.base_url, tickets(2), tmp_path, endpoint_options=options)
        )
    assert result.outcomes == {"completed": 2}


async def test_a_wrong_key_is_in_no_record_no_output_and_no_message(tmp_path: Path) -> None:
    wrong = "sk-wrong-" + os.urandom(12).hex()
    async with MockLlmServer(MockSettings(api_key="sk-right")) as server:
        config = pipeline(
            server.base_url,
            tickets(3),
            tmp_path / "out",
            endpoint_options={"api_key_env": "LEDGERFLOW_CLI_KEY"},
        )
        config["landscape"] = {"url": f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"}
        (tmp_path / "out").mkdir()
        (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
        env = {**os.environ, "LEDGERFLOW_CLI_KEY": wrong, "NO_COLOR": "1"}
        done = await anyio.run_process(
            [sys.executable, "-m", "engine.cli", "run", "pipeline.yaml", "--no-progress"],
            cwd=tmp_path,
            env=env,
            check=False,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    output = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 4, output  # completed, with row errors
    assert "quarantined: 3" in output  # every row failed with HTTP 401, routed to errors
    assert wrong not in output
    files = [p for p in tmp_path.rglob("*") if p.is_file()]  # noqa: ASYNC240
    assert any(p.name == "errors.jsonl" for p in files)
    for path in files:
        assert wrong.encode() not in path.read_bytes(), path
