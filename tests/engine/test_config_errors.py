"""A broken pipeline is refused before anything runs, each problem at its key path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine import ConfigError, Pipeline


def base(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "source": {"plugin": "memory", "options": {"rows": []}, "on_success": "raw"},
        "transforms": [
            {"name": "t1", "plugin": "passthrough", "input": "raw", "on_success": "mid"},
            {"name": "t2", "plugin": "passthrough", "input": "mid", "on_success": "out"},
        ],
        "sinks": [{"name": "out", "plugin": "jsonl", "options": {"path": "out.jsonl"}}],
    }
    config.update(overrides)
    return config


def issues(config: dict[str, Any], tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        Pipeline.from_dict(config, base_dir=tmp_path)
    return [str(issue) for issue in info.value.issues]


def test_the_base_config_is_valid(tmp_path: Path) -> None:
    assert len(Pipeline.from_dict(base(), base_dir=tmp_path).graph.nodes) == 4


def test_unknown_plugin_names_its_key_path(tmp_path: Path) -> None:
    config = base()
    config["transforms"][1]["plugin"] = "no_such_plugin"
    found = issues(config, tmp_path)
    assert any(i.startswith("transforms[1].plugin:") and "no_such_plugin" in i for i in found)


def test_plugin_import_path_that_does_not_import(tmp_path: Path) -> None:
    config = base()
    config["transforms"][0]["plugin"] = "no_such_module.sub:Thing"
    assert any(i.startswith("transforms[0].plugin:") for i in issues(config, tmp_path))


def test_dangling_connection(tmp_path: Path) -> None:
    config = base()
    config["transforms"][1]["on_success"] = "nowhere"
    found = issues(config, tmp_path)
    assert any(i.startswith("transforms[1].on_success:") and "nowhere" in i for i in found)


def test_cycle_is_refused(tmp_path: Path) -> None:
    config = base()
    config["transforms"].append(
        {"name": "loop", "plugin": "passthrough", "input": "back", "on_success": "mid2"}
    )
    config["transforms"].append(
        {"name": "loop2", "plugin": "passthrough", "input": "mid2", "on_success": "back"}
    )
    found = issues(config, tmp_path)
    assert any("cycle" in i or "not reachable" in i for i in found), found


def test_cycle_reachable_from_the_source_is_named(tmp_path: Path) -> None:
    config = base(
        gates=[
            {
                "name": "g",
                "input": "mid",
                "condition": "row['x'] > 1",
                "routes": {"true": "raw2", "false": "out"},
            }
        ]
    )
    config["transforms"][1] = {
        "name": "t2",
        "plugin": "passthrough",
        "input": "raw2",
        "on_success": "mid",
    }
    found = issues(config, tmp_path)
    assert any("cycle" in i for i in found), found


def test_node_nobody_feeds(tmp_path: Path) -> None:
    config = base()
    config["transforms"].append(
        {"name": "orphan", "plugin": "passthrough", "input": "lonely", "on_success": "out"}
    )
    found = issues(config, tmp_path)
    assert any(i.startswith("transforms[2].input:") and "lonely" in i for i in found)


def test_sink_nobody_feeds(tmp_path: Path) -> None:
    config = base()
    config["sinks"].append({"name": "unused", "plugin": "jsonl", "options": {"path": "u.jsonl"}})
    found = issues(config, tmp_path)
    assert any(i.startswith("sinks[1].name:") and "unused" in i for i in found)


def test_forbidden_expression_construct(tmp_path: Path) -> None:
    config = base(
        gates=[
            {"name": "g", "input": "out2", "condition": "row.__class__", "routes": {"true": "out"}}
        ]
    )
    config["transforms"][1]["on_success"] = "out2"
    found = issues(config, tmp_path)
    assert any(i.startswith("gates[0].condition:") for i in found), found


def test_expression_that_does_not_parse_in_a_compute_option(tmp_path: Path) -> None:
    config = base()
    config["transforms"][0] = {
        "name": "t1",
        "plugin": "compute",
        "input": "raw",
        "on_success": "mid",
        "options": {"fields": {"x": "row[["}},
    }
    assert any(i.startswith("transforms[0].options") for i in issues(config, tmp_path))


def test_wrong_option_type(tmp_path: Path) -> None:
    config = base()
    config["transforms"][0] = {
        "name": "t1",
        "plugin": "field_map",
        "input": "raw",
        "on_success": "mid",
        "options": {"rename": ["not", "a", "map"]},
    }
    found = issues(config, tmp_path)
    assert any(i.startswith("transforms[0].options.rename") for i in found), found


def test_unknown_key_and_wrong_type_in_the_pipeline_itself(tmp_path: Path) -> None:
    config = base()
    config["transforms"][0]["concurency"] = 4
    config["transforms"][1]["concurrency"] = "lots"
    found = issues(config, tmp_path)
    assert "transforms[0].concurency: unknown key" in found
    assert any(i.startswith("transforms[1].concurrency:") for i in found)


def test_duplicate_node_names(tmp_path: Path) -> None:
    config = base()
    config["transforms"][1]["name"] = "t1"
    assert any(
        i.startswith("transforms[1].name:") and "duplicate" in i for i in issues(config, tmp_path)
    )


def test_two_nodes_cannot_read_one_connection(tmp_path: Path) -> None:
    config = base()
    config["transforms"][1]["input"] = "raw"
    assert any(i.startswith("transforms[1].input:") for i in issues(config, tmp_path))


def test_on_error_must_name_a_sink(tmp_path: Path) -> None:
    config = base()
    config["transforms"][0]["on_error"] = "mid"
    assert any(i.startswith("transforms[0].on_error:") for i in issues(config, tmp_path))


def test_gate_needs_routes_or_fork(tmp_path: Path) -> None:
    config = base(gates=[{"name": "g", "input": "x", "condition": "True"}])
    assert any(i.startswith("gates[0]") for i in issues(config, tmp_path))


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    config = base()
    config["transforms"][0]["plugin"] = "nope"
    config["transforms"][1]["on_success"] = "nowhere"
    assert len(issues(config, tmp_path)) >= 2


def test_yaml_that_does_not_parse(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("source: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Pipeline.from_yaml(path)
