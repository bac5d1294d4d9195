"""A synthetic run recorded through the real Recorder, for the lineage and verify tests.

Graph: ``src`` → ``clean`` → {``risk`` gate, ``split`` fork gate, ``daily`` aggregation}
→ sinks; branches ``sentiment`` / ``topics`` meet at coalesce ``join``.  Rows:

====  ==========================================================================
0     linear: src → clean (an LLM call failed once, then answered) → sink ``out``
1     gate: risk routes it ``true`` → sink ``review`` (outcome routed)
2     fork at split into sentiment / topics, coalesced at join → sink ``out``
3     fails in clean (no error route): outcome failed
4     malformed: validation error at src → sink ``quarantine``
5, 6  aggregated by daily into one output token (parents: both) → sink ``out``
7     fork whose topics branch fails, so join fails with the missing branch
====  ==========================================================================
"""

from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from landscape import _schema as t
from landscape._outcomes import NodeStateStatus, Outcome, RunStatus
from landscape._recorder import Recorder
from landscape._store import Landscape
from landscape._writer import GroupCommitWriter

NODES = {
    "src": "source",
    "clean": "transform",
    "risk": "gate",
    "split": "gate",
    "sentiment": "transform",
    "topics": "transform",
    "join": "coalesce",
    "daily": "aggregation",
    "out": "sink",
    "review": "sink",
    "quarantine": "sink",
}
EDGES = {
    "e-src-clean": ("src", "clean", "on_success", "move"),
    "e-src-quarantine": ("src", "quarantine", "on_validation_failure", "divert"),
    "e-clean-risk": ("clean", "risk", "on_success", "move"),
    "e-risk-review": ("risk", "review", "true", "move"),
    "e-risk-out": ("risk", "out", "false", "move"),
    "e-split-sentiment": ("split", "sentiment", "sentiment", "copy"),
    "e-split-topics": ("split", "topics", "topics", "copy"),
    "e-sentiment-join": ("sentiment", "join", "on_success", "move"),
    "e-topics-join": ("topics", "join", "on_success", "move"),
    "e-join-out": ("join", "out", "on_success", "move"),
    "e-daily-out": ("daily", "out", "on_success", "move"),
}
GATE_CONDITION = "row['score'] > 0.8"
CLEAN_ERROR = {"type": "KeyError", "message": "'text'"}


@dataclass
class SampleRun:
    """Ids of what :func:`record_sample_run` recorded, by readable names."""

    run_id: str
    rows: dict[int, str] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    states: dict[str, str] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)

    def token_count(self) -> int:
        return len(self.tokens)


class _Builder:
    """Records rows, tokens and node states with readable ids and increasing times."""

    def __init__(self, rec: Recorder, writer: GroupCommitWriter, sample: SampleRun) -> None:
        self.rec = rec
        self.writer = writer
        self.sample = sample
        self._clock = itertools.count()
        self._t0 = time.time()
        self._steps: dict[str, int] = {}
        self.p = f"{sample.run_id}/"

    def now(self) -> float:
        return self._t0 + next(self._clock) * 0.001

    def row(self, index: int, data: Any, *, valid: Any = None) -> str:
        """A source row and its token; ``valid`` is the validated row (None: malformed)."""
        raw = self.rec.store(data)
        row_id, token = f"{self.p}row-{index}", f"{self.p}tok-{index}"
        self.sample.rows[index] = row_id
        self.rec.source_row(row_id=row_id, row_index=index, source_node_id="src", data_hash=raw)
        self.rec.token(token_id=token, row_id=row_id)
        self.sample.tokens[str(index)] = token
        self.sample.hashes[f"raw-{index}"] = raw
        if valid is None:
            self.rec.validation_error(
                node_id="src", row_index=index, error="id: not an int", row_data_ref=raw
            )
            self.state(
                token,
                "src",
                raw,
                None,
                status=NodeStateStatus.FAILED,
                error={"type": "ValidationError", "message": "id: not an int"},
            )
        else:
            self.state(token, "src", raw, valid)
        return token

    def child(self, name: str, row_id: str, parents: list[str], branch: str | None = None) -> str:
        token = f"{self.p}tok-{name}"
        self.rec.token(token_id=token, row_id=row_id, branch_name=branch, parents=parents)
        self.sample.tokens[name] = token
        self._steps[token] = max(self._steps.get(p, 0) for p in parents)
        return token

    def state(
        self,
        token: str,
        node: str,
        input_hash: str | None,
        output: Any,
        *,
        status: NodeStateStatus = NodeStateStatus.COMPLETED,
        error: dict[str, Any] | None = None,
        context: dict[str, Any] | None = None,
    ) -> str:
        state_id = f"st-{token}-{node}"
        out_hash = None if output is None else self.rec.store(output)
        step = self._steps.get(token, -1) + 1
        self._steps[token] = step
        started = self.now()
        self.rec.node_state(
            state_id=state_id, token_id=token, node_id=node, status=status,
            input_hash=input_hash, output_hash=out_hash, started_at=started,
            completed_at=started + 0.0025, step_index=step, error=error, context=context,
        )  # fmt: skip
        self.sample.states[f"{token}@{node}"] = state_id
        if out_hash is not None:
            self.sample.hashes[f"{token}@{node}"] = out_hash
        return state_id

    def route(self, state_id: str, edge_id: str, label: str, reason: Any = None) -> None:
        self.rec.routing_event(state_id=state_id, edge_id=edge_id, route_label=label, reason=reason)

    def sink(self, token: str, sink: str, input_hash: str, outcome: Outcome) -> None:
        self.state(token, sink, input_hash, None)
        self.rec.outcome(token_id=token, outcome=outcome, sink_name=sink)


def _graph(rec: Recorder) -> None:
    for node_id, node_type in NODES.items():
        rec.node(
            node_id=node_id, node_type=node_type, plugin_name=f"p-{node_id}",
            plugin_version="1.0", determinism="deterministic", config={"name": node_id},
        )  # fmt: skip
    for edge_id, (src, dst, label, mode) in EDGES.items():
        rec.edge(edge_id=edge_id, from_node=src, to_node=dst, label=label, mode=mode)


def _linear(b: _Builder) -> None:
    tok = b.row(0, {"id": "0", "text": "hello"}, valid={"id": 0, "text": "hello"})
    src_out = b.sample.hashes[f"{tok}@src"]
    state = b.state(tok, "clean", src_out, {"id": 0, "text": "hello", "label": "greeting"})
    request = b.rec.store({"model": "m", "messages": [{"role": "user", "content": "hello"}]})
    response = b.rec.store({"choices": [{"message": {"content": "greeting"}}]})
    b.sample.hashes["request"], b.sample.hashes["response"] = request, response
    common = {
        "state_id": state,
        "token_id": tok,
        "node_id": "clean",
        "call_index": 0,
        "call_type": "llm",
        "provider": "openai",
    }
    b.rec.call(
        **common, call_id=f"{b.p}call-0-1", model="m", status="error", attempt=1,
        http_status=503, request_hash=request, response_hash=None,
        error={"message": "overloaded"}, latency_ms=12.5,
    )  # fmt: skip
    b.rec.call(
        **common, call_id=f"{b.p}call-0-2", model="m", status="success", attempt=2,
        http_status=200, request_hash=request, response_hash=response, latency_ms=80.0,
        prompt_tokens=20, completion_tokens=3,
    )  # fmt: skip
    b.sink(tok, "out", b.sample.hashes[f"{tok}@clean"], Outcome.COMPLETED)


def _gate(b: _Builder) -> None:
    tok = b.row(1, {"id": "1", "score": "0.9"}, valid={"id": 1, "score": 0.9})
    src_out = b.sample.hashes[f"{tok}@src"]
    b.state(tok, "clean", src_out, {"id": 1, "score": 0.9})
    clean_out = b.sample.hashes[f"{tok}@clean"]
    context = {"condition": GATE_CONDITION, "value": True, "route": "true"}
    state = b.state(tok, "risk", clean_out, {"id": 1, "score": 0.9}, context=context)
    b.route(state, "e-risk-review", "true", reason=context)
    b.sink(tok, "review", clean_out, Outcome.ROUTED)


def _fork(b: _Builder, index: int, *, topics_fails: bool = False) -> None:
    tok = b.row(index, {"id": str(index)}, valid={"id": index})
    src_out = b.sample.hashes[f"{tok}@src"]
    state = b.state(tok, "split", src_out, {"id": index})
    b.route(state, "e-split-sentiment", "sentiment")
    b.route(state, "e-split-topics", "topics")
    row_id = b.sample.rows[index]
    sent = b.child(f"{index}s", row_id, [tok], branch="sentiment")
    topics = b.child(f"{index}t", row_id, [tok], branch="topics")
    b.rec.outcome(token_id=tok, outcome=Outcome.FORKED)
    b.state(sent, "sentiment", src_out, {"id": index, "sentiment": "positive"})
    if topics_fails:
        _failed_join(b, index, sent, topics, src_out)
        return
    b.state(topics, "topics", src_out, {"id": index, "topics": ["a"]})
    b.state(sent, "join", b.sample.hashes[f"{sent}@sentiment"], None)
    b.state(topics, "join", b.sample.hashes[f"{topics}@topics"], None)
    merged = b.child(f"{index}m", row_id, [sent, topics])
    for branch in (sent, topics):
        b.rec.outcome(token_id=branch, outcome=Outcome.COALESCED)
    merged_row = {"id": index, "sentiment": "positive", "topics": ["a"]}
    b.state(merged, "join", None, merged_row)
    b.sink(merged, "out", b.sample.hashes[f"{merged}@join"], Outcome.COMPLETED)


def _failed_join(b: _Builder, index: int, sent: str, topics: str, src_out: str) -> None:
    error = {"type": "ValueError", "message": "boom"}
    b.state(topics, "topics", src_out, None, status=NodeStateStatus.FAILED, error=error)
    b.rec.outcome(
        token_id=topics, outcome=Outcome.FAILED, context={"error": error, "node": "topics"}
    )
    context = {"coalesce": "join", "policy": "require_all", "missing_branches": ["topics"]}
    b.state(sent, "join", b.sample.hashes[f"{sent}@sentiment"], None,
            status=NodeStateStatus.FAILED, context=context)  # fmt: skip
    b.rec.outcome(
        token_id=sent,
        outcome=Outcome.FAILED,
        context={**context, "node": "join", "error": "quorum"},
    )


def _failed(b: _Builder) -> None:
    tok = b.row(3, {"id": "3"}, valid={"id": 3})
    b.state(tok, "clean", b.sample.hashes[f"{tok}@src"], None,
            status=NodeStateStatus.FAILED, error=CLEAN_ERROR)  # fmt: skip
    b.rec.outcome(
        token_id=tok, outcome=Outcome.FAILED, context={"error": CLEAN_ERROR, "node": "clean"}
    )


def _quarantined(b: _Builder) -> None:
    tok = b.row(4, {"id": "four"})
    b.sink(tok, "quarantine", b.sample.hashes["raw-4"], Outcome.QUARANTINED)


def _aggregated(b: _Builder) -> None:
    members = [b.row(i, {"id": str(i)}, valid={"id": i}) for i in (5, 6)]
    for token in members:
        b.state(token, "daily", b.sample.hashes[f"{token}@src"], None)
    output = b.child("agg", b.sample.rows[5], members)
    batch_id = f"{b.p}batch-1"
    flush = b.state(output, "daily", None, {"count": 2})
    b.writer.insert(t.batches, {
        "batch_id": batch_id, "run_id": b.rec.run_id, "aggregation_node_id": "daily",
        "attempt": 1, "status": "completed", "trigger_reason": "count",
        "aggregation_state_id": flush, "external_job_id": None, "group_key": None,
        "created_at": b.now(), "completed_at": b.now(),
    })  # fmt: skip
    for ordinal, token in enumerate(members):
        b.writer.insert(t.batch_members, {
            "batch_id": batch_id, "token_id": token, "ordinal": ordinal, "run_id": b.rec.run_id,
        })  # fmt: skip
        b.rec.outcome(token_id=token, outcome=Outcome.CONSUMED_IN_BATCH, batch_id=batch_id)
    b.sink(output, "out", b.sample.hashes[f"{output}@daily"], Outcome.COMPLETED)


def _artifacts(rec: Recorder, out_dir: Path | None) -> None:
    """An artifact per sink: a file in ``out_dir`` holding what is recorded of it, or
    (without ``out_dir``) a sink with no file."""
    for sink, rows_written in (("out", 3), ("review", 1), ("quarantine", 1)):
        content = b"".join(b'{"row": %d}\n' % i for i in range(rows_written))
        uri = f"memory://sample/{sink}"
        if out_dir is not None:
            path = out_dir / f"{sink}.jsonl"
            path.write_bytes(content)
            uri = path.as_uri()
        rec.artifact(
            sink_node_id=sink, uri=uri, content_hash=hashlib.sha256(content).hexdigest(),
            size_bytes=len(content), rows_written=rows_written,
        )  # fmt: skip


async def record(landscape: Landscape, run_id: str, build: Any) -> None:
    """Run a writer, let ``build(recorder, writer)`` record, then flush and close the writer."""
    writer = landscape.open_writer(commit_interval=0.01)
    async with writer, anyio.create_task_group() as tg:
        await tg.start(writer.run)
        build(landscape.recorder(writer, run_id), writer)
        await writer.flush()
        writer.close()


async def record_sample_run(
    landscape: Landscape,
    run_id: str = "run-sample",
    *,
    status: RunStatus = RunStatus.COMPLETED,
    watermark: int | None = None,
    out_dir: Path | None = None,
) -> SampleRun:
    """Record the sample run; optionally end it ``status`` with a checkpoint at ``watermark``;
    with ``out_dir``, its sinks are files written there."""
    sample = SampleRun(run_id)

    def build(rec: Recorder, writer: GroupCommitWriter) -> None:
        rec.begin_run(config_hash="c" * 64, settings={"api_key": "***"}, engine_version="0.1.0",
                      pipeline_name="sample")  # fmt: skip
        _graph(rec)
        b = _Builder(rec, writer, sample)
        _linear(b)
        _gate(b)
        _fork(b, 2)
        _failed(b)
        _quarantined(b)
        _aggregated(b)
        _fork(b, 7, topics_fails=True)
        _artifacts(rec, out_dir)
        if watermark is not None:
            rec.checkpoint(watermark_row_index=watermark, state={})
        rec.finish_run(status, rows_processed=8, outcomes={"completed": 3})

    await record(landscape, run_id, build)
    return sample
