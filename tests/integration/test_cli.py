"""The command line, end to end, as a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path

import anyio
import anyio.lowlevel

from engine import Pipeline

from .conftest import Cli, run_id_of


def test_run_then_verify_explain_and_list(cli: Cli, quickstart: Path, tmp_path: Path) -> None:
    ran = cli("run", str(quickstart), "--no-progress")
    assert ran.returncode == 0, ran.stderr
    run_id = run_id_of(ran.stdout)
    assert "quarantined: 4" in ran.stdout
    assert (tmp_path / "runs" / "audit.db").exists()

    verified = cli("verify", run_id)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    tree = cli("explain", run_id, "--row-index", "3")
    assert tree.returncode == 0, tree.stderr
    for expected in ("tidy", "price", "size", "row['amount_eur'] >= 500", "routed"):
        assert expected in tree.stdout, (expected, tree.stdout)

    as_json = cli("explain", run_id, "--row-index", "3", "--json")
    lineage = json.loads(as_json.stdout)
    assert json.dumps(lineage).count("size") >= 1
    token_id = lineage["tokens"][0]["token_id"]
    row_id = lineage["row"]["row_id"]
    assert cli("explain", run_id, "--token-id", token_id).returncode == 0
    assert cli("explain", run_id, "--row-id", row_id).returncode == 0

    quarantined = cli("explain", run_id, "--row-index", "36")
    assert "twelve" in quarantined.stdout
    assert "quarantined" in quarantined.stdout

    listed = cli("runs")
    assert listed.returncode == 0
    assert run_id in listed.stdout
    assert "completed" in listed.stdout


def test_validate_prints_the_graph(cli: Cli, quickstart: Path) -> None:
    result = cli("validate", str(quickstart))
    assert result.returncode == 0, result.stderr
    assert "size --true (move)--> review" in result.stdout


def test_broken_config_is_refused_with_its_key_path(
    cli: Cli, quickstart: Path, tmp_path: Path
) -> None:
    text = quickstart.read_text(encoding="utf-8").replace("input: tidy_out", "input: tidy_outt")
    broken = tmp_path / "broken.yaml"
    broken.write_text(text, encoding="utf-8")
    for command in ("validate", "run"):
        result = cli(command, str(broken))
        assert result.returncode == 2
        assert "transforms[1].input" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_explain_unknown_row_and_verify_unknown_run_fail_clearly(
    cli: Cli, quickstart: Path
) -> None:
    run_id = run_id_of(cli("run", str(quickstart), "--no-progress").stdout)
    missing = cli("explain", run_id, "--row-index", "99999")
    assert missing.returncode == 1
    assert "99999" in missing.stderr
    unknown = cli("verify", "no-such-run")
    assert unknown.returncode == 1
    assert "no-such-run" in unknown.stderr


def test_mock_llm_serves_until_interrupted(tmp_path: Path) -> None:
    server = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "mock-llm", "--port", "0", "--latency-ms", "1"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert server.stdout is not None
        base_url = server.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:")
        assert base_url.endswith("/v1")
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        request = urllib.request.Request(
            base_url + "/chat/completions", data=body.encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.load(response)
        assert answer["choices"][0]["message"]["content"]
        origin = base_url.removesuffix("/v1")
        with urllib.request.urlopen(origin + "/stats", timeout=10) as response:
            assert json.load(response)["requests"] == 1
    finally:
        server.send_signal(signal.SIGINT)
        returncode = server.wait(timeout=10)
        assert server.stdout is not None
        server.stdout.close()
    assert returncode == 0


def test_reading_commands_never_create_a_landscape(cli: Cli, tmp_path: Path) -> None:
    for args in (
        ("verify", "some-run"),
        ("explain", "some-run", "--row-index", "0"),
        ("diff", "run-a", "run-b"),
        ("runs",),
    ):
        result = cli(*args)
        assert result.returncode == 1, result
        assert "there is no Landscape" in result.stderr
    elsewhere = tmp_path / "nonexist" / "dir" / "a.db"
    result = cli("runs", "--landscape", f"sqlite+aiosqlite:///{elsewhere}")
    assert result.returncode == 1
    assert str(elsewhere) in result.stderr
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "nonexist").exists()


def test_first_runs_started_together_on_a_new_landscape_all_complete(
    quickstart: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "NO_COLOR": "1"}
    landscape = f"sqlite+aiosqlite:///{tmp_path / 'shared' / 'audit.db'}"
    pipelines = []
    for i in range(3):  # three pipelines (each its own outputs), one new Landscape
        copy = shutil.copytree(quickstart.parent, tmp_path / f"copy{i}")
        pipelines.append(Path(copy) / quickstart.name)
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "run", str(pipeline), *("--landscape", landscape)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pipeline in pipelines
    ]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], outputs
    assert len({run_id_of(out) for out, _ in outputs}) == 3


def test_a_missing_source_is_refused_before_any_output_is_touched(
    cli: Cli, quickstart: Path
) -> None:
    first = cli("run", str(quickstart), "--no-progress")
    assert first.returncode == 0, first.stderr
    outputs = {p: p.read_bytes() for p in (quickstart.parent / "out").iterdir()}
    assert any(outputs.values())
    (quickstart.parent / "data" / "orders.csv").rename(quickstart.parent / "orders.csv.bak")
    for command in ("validate", "run"):
        result = cli(command, str(quickstart))
        assert result.returncode == 2, result
        assert "source.options: cannot open" in result.stderr
        assert "orders.csv" in result.stderr
        assert "Traceback" not in result.stderr
    assert {p: p.read_bytes() for p in (quickstart.parent / "out").iterdir()} == outputs


async def interrupted_at_once(pipeline: Pipeline) -> str:
    """The id of a run of ``pipeline`` stopped as soon as it began (``interrupted``)."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(pipeline.run)
        await anyio.lowlevel.checkpoint()  # the run has begun
        pipeline.stop()
    assert pipeline.last_result is not None
    assert pipeline.last_result.status == "interrupted"
    return pipeline.last_result.run_id


def test_a_resume_with_a_moved_pipeline_file_says_where_the_run_began(
    cli: Cli, quickstart: Path, tmp_path: Path
) -> None:
    landscape = f"sqlite+aiosqlite:///{tmp_path / 'runs' / 'audit.db'}"
    run_id = anyio.run(interrupted_at_once, Pipeline.from_yaml(quickstart, landscape_url=landscape))
    moved = tmp_path / "elsewhere" / "pipeline.yaml"
    moved.parent.mkdir()
    quickstart.rename(moved)
    result = cli("resume", run_id, "--pipeline", str(moved), "--landscape", landscape)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert f"cannot resume run {run_id}: its source cannot be read" in message
    assert str(moved.parent / "data" / "orders.csv") in message
    assert f"resume with --pipeline {quickstart}" in message


def test_verify_reports_an_edited_sink_file_and_deep_verify_an_edited_payload(
    cli: Cli, quickstart: Path, tmp_path: Path
) -> None:
    run_id = run_id_of(cli("run", str(quickstart), "--no-progress").stdout)
    deep = cli("verify", run_id, "--deep")
    assert deep.returncode == 0, deep.stdout
    assert "payloads hashed again" in deep.stdout
    accepted = quickstart.parent / "out" / "accepted.jsonl"
    lines = accepted.read_text().splitlines(keepends=True)
    lines[3] = lines[3].replace('"country":"', '"country":"X')
    accepted.write_text("".join(lines))
    with sqlite3.connect(tmp_path / "runs" / "audit.db") as db:
        (edited,) = db.execute(
            "SELECT source_data_ref FROM rows WHERE run_id = ? AND row_index = 5", (run_id,)
        ).fetchone()
        db.execute(
            "UPDATE payloads SET content = replace(content, 'express', 'expresz') WHERE hash = ?",
            (edited,),
        )
    plain = cli("verify", run_id)
    assert plain.returncode == 1
    assert "8-sink-file" in plain.stdout
    assert "accepted.jsonl" in plain.stdout
    assert "payload-content" not in plain.stdout
    deep = cli("verify", run_id, "--deep")
    assert deep.returncode == 1
    assert "8-sink-file" in deep.stdout
    assert f"payload {edited}" in deep.stdout


def test_a_run_whose_rows_had_errors_completes_with_exit_code_4(cli: Cli, quickstart: Path) -> None:
    text = quickstart.read_text().replace(
        "round(row['amount'] * row['rate'], 2)",
        "round(row['amount'] * row['rate'] / (0 if row['currency'] == 'GBP' else 1), 2)",
    )
    quickstart.write_text(text)
    result = cli("run", str(quickstart), "--no-progress")
    assert result.returncode == 4, result.stderr
    errors = (quickstart.parent / "out" / "errors.jsonl").read_text().splitlines()
    assert errors
    assert f"rows with errors: {len(errors)}" in result.stdout
    assert "status: completed" in result.stdout


def test_a_run_past_max_failed_rows_is_interrupted_and_says_why(cli: Cli, quickstart: Path) -> None:
    text = quickstart.read_text().replace(
        "round(row['amount'] * row['rate'], 2)",
        "round(row['amount'] * row['rate'] / (0 if row['currency'] == 'GBP' else 1), 2)",
    )
    quickstart.write_text(text + "\nruntime: {max_failed_rows: 0}\n")
    result = cli("run", str(quickstart), "--no-progress")
    assert result.returncode == 3, result.stderr
    assert "status: interrupted" in result.stdout
    assert "stopped: failed rows: 1 > max_failed_rows 0" in result.stdout
    assert "resume with: ledgerflow resume" in result.stdout
