"""The Landscape's tables (SQLAlchemy Core).

Table and column names listed in ``docs/audit.md`` are contract; the extra columns here carry
``run_id`` wherever a lookup needs it.  Timestamps are UNIX epoch seconds (float, UTC):
cheap to bind on every dialect and exact to the microsecond.  Append-only event tables
(``routing_events``, ``token_outcomes``, ``validation_errors``) carry their generated id
as a plain column: no lookup goes by it, and every index costs each audited row an extra
B-tree insert.  Foreign keys are not declared: rows arrive in group-committed batches in
dependency order, and :func:`landscape.verify` checks referential integrity explicitly.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)

metadata = MetaData()

_ID = String(96)

runs = Table(
    "runs",
    metadata,
    Column("run_id", _ID, primary_key=True),
    Column("status", String(16), nullable=False),
    Column("started_at", Float, nullable=False),
    Column("completed_at", Float),
    Column("config_hash", String(64), nullable=False),
    Column("settings_json", Text, nullable=False),
    Column("engine_version", String(32), nullable=False),
    Column("pipeline_name", Text),
    Column("rows_processed", Integer),
    Column("outcomes_json", Text),
    Column("error", Text),
    #: The run whose recorded answers this one replays (no network), if any.
    Column("replayed_from", _ID),
    #: The pipeline file the run was started with (relative paths in it are relative
    #: to it): what a resume that cannot find the source points the user at.
    Column("pipeline_file", Text),
)

#: Who executes each run (see ``landscape._leases``): one lease per run (and, for a
#: partitioned run, per partition), taken over only from an owner no longer alive.
run_leases = Table(
    "run_leases",
    metadata,
    Column("run_id", _ID, primary_key=True),
    Column("partition_index", Integer, primary_key=True),
    Column("owner_id", _ID, nullable=False),
    Column("host", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    #: Boot id, pid namespace and start time of the owner's process (Linux).
    Column("process_key", Text),
    #: The database's clock, in UNIX epoch seconds.
    Column("acquired_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False),
    Column("lease_seconds", Float, nullable=False),
    Column("released_at", Float),
    #: How many owners the run has had, this one included.
    Column("epoch", Integer, nullable=False),
)

nodes = Table(
    "nodes",
    metadata,
    Column("run_id", _ID, primary_key=True),
    Column("node_id", _ID, primary_key=True),
    Column("name", Text, nullable=False),
    Column("node_type", String(16), nullable=False),
    Column("plugin_name", Text),
    Column("plugin_version", String(32)),
    Column("determinism", String(32)),
    Column("config_hash", String(64), nullable=False),
    Column("config_json", Text, nullable=False),
)

edges = Table(
    "edges",
    metadata,
    Column("run_id", _ID, primary_key=True),
    Column("edge_id", _ID, primary_key=True),
    Column("from_node_id", _ID, nullable=False),
    Column("to_node_id", _ID, nullable=False),
    Column("label", Text, nullable=False),
    Column("mode", String(8), nullable=False),
)

rows = Table(
    "rows",
    metadata,
    Column("row_id", _ID, primary_key=True),
    Column("run_id", _ID, nullable=False),
    Column("source_node_id", _ID, nullable=False),
    Column("row_index", Integer, nullable=False),
    Column("source_data_hash", String(64), nullable=False),
    Column("source_data_ref", String(64), nullable=False),
    Index("ix_rows_run_index", "run_id", "row_index", unique=True),
)

tokens = Table(
    "tokens",
    metadata,
    Column("token_id", _ID, primary_key=True),
    Column("run_id", _ID, nullable=False),
    Column("row_id", _ID, nullable=False),
    Column("branch_name", Text),
    Column("created_at", Float, nullable=False),
    Index("ix_tokens_row", "row_id"),
)

token_parents = Table(
    "token_parents",
    metadata,
    Column("token_id", _ID, primary_key=True),
    Column("parent_token_id", _ID, primary_key=True),
    Column("ordinal", Integer, nullable=False),
    Column("run_id", _ID, nullable=False),
    Index("ix_token_parents_parent", "parent_token_id"),
)

node_states = Table(
    "node_states",
    metadata,
    Column("state_id", _ID, primary_key=True),
    Column("run_id", _ID, nullable=False),
    Column("token_id", _ID, nullable=False),
    Column("node_id", _ID, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("input_hash", String(64)),
    Column("output_hash", String(64)),
    Column("started_at", Float, nullable=False),
    Column("completed_at", Float),
    Column("duration_ms", Float),
    Column("error_json", Text),
    Column("context_json", Text),
    Column("step_index", Integer),
    #: The provider's id of the job a ``pending`` state waits for (kept once it ends).
    Column("external_job_id", Text),
    Index("ix_node_states_token", "token_id"),
)

routing_events = Table(
    "routing_events",
    metadata,
    Column("event_id", _ID, nullable=False),
    Column("run_id", _ID, nullable=False),
    Column("state_id", _ID, nullable=False),
    Column("edge_id", _ID, nullable=False),
    Column("route_label", Text, nullable=False),
    Column("reason_json", Text),
    Index("ix_routing_events_state", "state_id"),
)

calls = Table(
    "calls",
    metadata,
    Column("call_id", _ID, primary_key=True),
    Column("run_id", _ID, nullable=False),
    Column("state_id", _ID, nullable=False),
    Column("call_index", Integer, nullable=False),
    Column("call_type", String(32), nullable=False),
    Column("provider", Text),
    Column("model", Text),
    Column("status", String(16), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("http_status", Integer),
    Column("request_hash", String(64)),
    Column("request_ref", String(64)),
    Column("response_hash", String(64)),
    Column("response_ref", String(64)),
    Column("error_json", Text),
    Column("latency_ms", Float),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("cost", Float),
    Column("created_at", Float),
    #: The token and node of the call's state: a crash may come before the state is
    #: recorded, and a resume then records the state ``cancelled`` from these.
    Column("token_id", _ID),
    Column("node_id", _ID),
    Index("ix_calls_state", "state_id"),
    Index("ix_calls_run_request", "run_id", "request_hash"),
)

batches = Table(
    "batches",
    metadata,
    Column("batch_id", _ID, primary_key=True),
    Column("run_id", _ID, nullable=False),
    Column("aggregation_node_id", _ID, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("trigger_reason", String(16)),
    Column("aggregation_state_id", _ID),
    Column("external_job_id", Text),
    Column("group_key", Text),
    Column("created_at", Float),
    Column("completed_at", Float),
)

batch_members = Table(
    "batch_members",
    metadata,
    Column("batch_id", _ID, primary_key=True),
    Column("token_id", _ID, primary_key=True),
    Column("ordinal", Integer, nullable=False),
    Column("run_id", _ID, nullable=False),
    Index("ix_batch_members_token", "token_id"),
)

token_outcomes = Table(
    "token_outcomes",
    metadata,
    Column("outcome_id", _ID, nullable=False),
    Column("run_id", _ID, nullable=False),
    Column("token_id", _ID, nullable=False),
    Column("outcome", String(24), nullable=False),
    Column("is_terminal", Boolean, nullable=False),
    Column("sink_name", Text),
    Column("batch_id", _ID),
    Column("context_json", Text),
    Column("recorded_at", Float, nullable=False),
    Index("ix_token_outcomes_token", "token_id"),
    # The audit trail's hardest rule, enforced by the database itself: a second
    # terminal outcome for a token makes the commit fail and the run fail loudly.
    Index(
        "ux_token_outcomes_terminal",
        "token_id",
        unique=True,
        sqlite_where=text("is_terminal"),
        postgresql_where=text("is_terminal"),
    ),
)

artifacts = Table(
    "artifacts",
    metadata,
    Column("artifact_id", _ID, primary_key=True),
    Column("run_id", _ID, nullable=False),
    Column("sink_node_id", _ID, nullable=False),
    Column("uri", Text, nullable=False),
    Column("content_hash", String(64), nullable=False),
    Column("size_bytes", Integer, nullable=False),
    Column("rows_written", Integer),
    Column("created_at", Float),
)

#: Where each sink stood after each write, committed with that write's outcomes: resume
#: cuts an appending sink back to the last position whose outcomes are on record.
sink_positions = Table(
    "sink_positions",
    metadata,
    Column("run_id", _ID, nullable=False),
    Column("sink_node_id", _ID, nullable=False),
    Column("write_seq", Integer, nullable=False),
    Column("position_json", Text),
    Column("recorded_at", Float, nullable=False),
    Index("ix_sink_positions_run", "run_id", "sink_node_id", "write_seq"),
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("checkpoint_id", _ID, primary_key=True),
    Column("run_id", _ID, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("watermark_row_index", Integer, nullable=False),
    Column("state_json", Text, nullable=False),
)

validation_errors = Table(
    "validation_errors",
    metadata,
    Column("error_id", _ID, nullable=False),
    Column("run_id", _ID, nullable=False),
    Column("node_id", _ID, nullable=False),
    Column("row_index", Integer, nullable=False),
    Column("error", Text, nullable=False),
    Column("row_data_ref", String(64)),
)

payloads = Table(
    "payloads",
    metadata,
    Column("hash", String(64), primary_key=True),
    Column("content", Text, nullable=False),
)

#: Tables in the order a group commit inserts into them (parents before children).
INSERT_ORDER = (
    runs,
    nodes,
    edges,
    payloads,
    rows,
    tokens,
    token_parents,
    validation_errors,
    batches,
    node_states,
    routing_events,
    calls,
    batch_members,
    token_outcomes,
    artifacts,
    sink_positions,
    checkpoints,
)
