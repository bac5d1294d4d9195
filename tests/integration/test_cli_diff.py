"""``ledgerflow diff`` end to end: two runs of the quickstart with different gate thresholds."""

from __future__ import annotations

import json
from pathlib import Path

from tests._read import read_jsonl

from .conftest import Cli, run_id_of


def test_diff_names_the_rerouted_rows_in_a_table_and_as_json(cli: Cli, quickstart: Path) -> None:
    lowered = quickstart.with_name("lowered.yaml")
    text = quickstart.read_text(encoding="utf-8")
    lowered.write_text(
        text.replace("row['amount_eur'] >= 500", "row['amount_eur'] >= 300").replace(
            "path: out/", "path: out_lowered/"
        ),
        encoding="utf-8",
    )
    run_a = run_id_of(cli("run", str(quickstart), "--no-progress").stdout)
    run_b = run_id_of(cli("run", str(lowered), "--no-progress").stdout)
    accepted = read_jsonl(quickstart.parent / "out" / "accepted.jsonl")
    moved = sum(300 <= row["amount_eur"] < 500 for row in accepted)
    assert moved > 0

    table = cli("diff", run_a, run_b)
    assert table.returncode == 0, table.stderr
    for expected in (
        f"{moved} differ",
        "size (gate)",
        "row['amount_eur'] >= 500 → false",
        "row['amount_eur'] >= 300 → true",
        "routed→accepted",
        "routed→review",
    ):
        assert expected in table.stdout, (expected, table.stdout)

    as_json = cli("diff", run_a, run_b, "--json", "--limit", "0")
    assert as_json.returncode == 0, as_json.stderr
    diff = json.loads(as_json.stdout)
    assert diff["counts"]["different"] == moved == len(diff["rows"])
    assert diff["counts"]["only_in_a"] == diff["counts"]["only_in_b"] == 0
    for row in diff["rows"]:
        assert [(e["outcome"], e["sink"]) for e in row["ends_a"]] == [("routed", "accepted")]
        assert [(e["outcome"], e["sink"]) for e in row["ends_b"]] == [("routed", "review")]
        (split,) = row["divergences"]
        assert (split["kind"], split["a"]["node_id"], split["a"]["node_type"]) == (
            "route",
            "size",
            "gate",
        )
        assert (split["a"]["reason"]["value"], split["b"]["reason"]["value"]) == (False, True)

    same = cli("diff", run_a, run_a)
    assert same.returncode == 0
    assert "all identical" in same.stdout


def test_diff_of_an_unknown_run_fails_clearly(cli: Cli, quickstart: Path) -> None:
    run_id = run_id_of(cli("run", str(quickstart), "--no-progress").stdout)
    unknown = cli("diff", run_id, "no-such-run")
    assert unknown.returncode == 1
    assert "no-such-run" in unknown.stderr
