"""The replay-and-diff loop a user runs: record an LLM run, change a threshold or a
prompt, ``ledgerflow run --replay`` against the record (no network), then ``ledgerflow
diff`` names exactly the rows affected and why."""

from __future__ import annotations

import json
from pathlib import Path

from landscape import Landscape
from plugins.llm import MockLlmServer, MockSettings
from tests._read import read_jsonl

from .conftest import run_id_of
from .test_crash_resume import run_cli

ROWS = 40

PIPELINE = """
name: triage
landscape: {{url: "sqlite+aiosqlite:///{landscape}"}}
endpoints:
  mock: {{base_url: "{base_url}", max_attempts: 1}}
source:
  plugin: jsonl
  options: {{path: tickets.jsonl}}
  on_success: raw
transforms:
  - name: classify
    plugin: llm
    input: raw
    on_success: scored
    on_error: errors
    concurrency: 8
    options:
      endpoint: mock
      model: mock-model
      prompt: "{prompt}"
      response_format: json_schema
      json_schema:
        type: object
        properties: {{label: {{type: string}}, score: {{type: number}}}}
        required: [label, score]
gates:
  - name: urgency
    input: scored
    condition: "row['score'] >= {threshold}"
    routes: {{"true": urgent, "false": later}}
sinks:
  - {{name: urgent, plugin: jsonl, options: {{path: {out}/urgent.jsonl}}}}
  - {{name: later, plugin: jsonl, options: {{path: {out}/later.jsonl}}}}
  - {{name: errors, plugin: jsonl, options: {{path: {out}/errors.jsonl}}}}
"""
PROMPT = "Ticket {{ row.id }}: {{ row.text }}"


def write(work: Path, name: str, base_url: str, *, threshold: float, prompt: str = PROMPT) -> Path:
    path = work / f"{name}.yaml"
    path.write_text(
        PIPELINE.format(
            landscape=work / "audit.db",
            base_url=base_url,
            prompt=prompt,
            threshold=threshold,
            out=f"out_{name}",
        )
    )
    return path


async def diff_json(work: Path, run_a: str, run_b: str) -> dict:  # type: ignore[type-arg]
    url = f"sqlite+aiosqlite:///{work / 'audit.db'}"
    code, output = await run_cli(
        work, "diff", run_a, run_b, "--json", "--limit", "0", "--landscape", url
    )
    assert code == 0, output
    return json.loads(output)  # type: ignore[no-any-return]


async def verified(work: Path, run_id: str) -> None:
    async with Landscape.connect(f"sqlite+aiosqlite:///{work / 'audit.db'}") as landscape:
        report = await landscape.verify(run_id)
    assert report.ok, [str(v) for v in report.violations]


async def test_a_changed_threshold_replayed_shows_exactly_the_rerouted_rows(
    tmp_path: Path,
) -> None:
    with (tmp_path / "tickets.jsonl").open("w") as data:
        for i in range(ROWS):
            data.write(json.dumps({"id": i, "text": f"problem number {i}"}) + "\n")
    async with MockLlmServer(MockSettings(seed=5)) as server:
        recorded = write(tmp_path, "recorded", server.base_url, threshold=0.5)
        code, output = await run_cli(tmp_path, "run", str(recorded), "--no-progress")
        assert code == 0, output
        run_a = run_id_of(output)
        requests = server.statistics().requests

        lowered = write(tmp_path, "lowered", server.base_url, threshold=0.3)
        code, output = await run_cli(
            tmp_path, "run", str(lowered), "--no-progress", "--replay", run_a
        )
        assert code == 0, output
        run_b = run_id_of(output)

        urgent_prompt = "{% if row.id < 4 %}URGENT {% endif %}" + PROMPT
        reworded = write(tmp_path, "reworded", server.base_url, threshold=0.5, prompt=urgent_prompt)
        code, output = await run_cli(
            tmp_path, "run", str(reworded), "--no-progress", "--replay", run_a
        )
        assert code == 4, output  # the reworded rows' replay misses are row errors
        assert "rows with errors: 4" in output
        run_c = run_id_of(output)
        assert server.statistics().requests == requests  # the replays sent nothing
    for run_id in (run_a, run_b, run_c):
        await verified(tmp_path, run_id)

    scores = {
        row["id"]: row["score"]
        for name in ("urgent", "later")
        for row in read_jsonl(tmp_path / "out_recorded" / f"{name}.jsonl")
    }
    moved = sorted(i for i, score in scores.items() if 0.3 <= score < 0.5)
    assert moved, "the seed should put some scores between the thresholds"
    diff = await diff_json(tmp_path, run_a, run_b)
    assert diff["counts"]["different"] == len(moved)
    assert sorted(row["row_index"] for row in diff["rows"]) == moved
    for row in diff["rows"]:
        (split,) = row["divergences"]
        assert (split["kind"], split["a"]["node_id"]) == ("route", "urgency")
        assert split["a"]["reason"]["value"] is False
        assert split["b"]["reason"]["value"] is True
        assert [e["sink"] for e in row["ends_a"]] == ["later"]
        assert [e["sink"] for e in row["ends_b"]] == ["urgent"]

    # A reworded prompt: the replay has no answer for the rows whose prompt changed.
    diff = await diff_json(tmp_path, run_a, run_c)
    assert sorted(row["row_index"] for row in diff["rows"]) == [0, 1, 2, 3]
    for row in diff["rows"]:
        (split,) = row["divergences"]
        assert split["a"]["node_id"] == "classify"
        assert split["b"]["status"] == "failed"
        assert "replay_miss" in json.dumps(split["b"])
        assert [e["sink"] for e in row["ends_b"]] == ["errors"]
    errors = read_jsonl(tmp_path / "out_reworded" / "errors.jsonl")
    assert sorted(row["id"] for row in errors) == [0, 1, 2, 3]
