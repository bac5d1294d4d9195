"""LLM pipelines against the project's own mock server on 127.0.0.1 (real HTTP)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CLASSIFY_SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["billing", "login", "other"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["label", "score"],
}


def endpoint(base_url: str, **extra: Any) -> dict[str, Any]:
    """An endpoint section with quick retries (tests never wait for real backoffs)."""
    return {
        "base_url": base_url,
        "max_in_flight": 64,
        "timeout_seconds": 5,
        "backoff": {"initial_seconds": 0.01, "max_seconds": 0.05},
        **extra,
    }


def llm_node(name: str = "classify", **extra: Any) -> dict[str, Any]:
    options = {
        "endpoint": "local",
        "model": "mock-model",
        "prompt": "Ticket {{ row.id }}: {{ row.text }}",
        "response_format": "json_schema",
        "json_schema": CLASSIFY_SCHEMA,
        **extra.pop("options", {}),
    }
    return {
        "name": name,
        "plugin": "llm",
        "input": "raw",
        "on_success": "out",
        "on_error": "errors",
        "concurrency": 16,
        "options": options,
        **extra,
    }


def pipeline(
    base_url: str, rows: Any, out: Path, *, transforms: list[dict[str, Any]] | None = None,
    endpoint_options: dict[str, Any] | None = None, **extra: Any,
) -> dict[str, Any]:  # fmt: skip
    return {
        "endpoints": {"local": endpoint(base_url, **(endpoint_options or {}))},
        "source": {"plugin": "memory", "options": {"rows": rows}, "on_success": "raw"},
        "transforms": transforms if transforms is not None else [llm_node()],
        "sinks": [
            {"name": "out", "plugin": "jsonl", "options": {"path": str(out / "out.jsonl")}},
            {"name": "errors", "plugin": "jsonl", "options": {"path": str(out / "errors.jsonl")}},
        ],
        **extra,
    }


def tickets(n: int) -> list[dict[str, Any]]:
    topics = ["cannot log in", "charged twice", "feature request"]
    return [{"id": i, "text": topics[i % 3]} for i in range(n)]
