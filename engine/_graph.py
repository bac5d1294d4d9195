"""Compiling settings into the frozen graph the runtime executes.

:func:`compile_graph` resolves plugins, wires connections to their one consumer, and
refuses — before anything runs, each problem located by its key path — unknown plugins,
invalid options, dangling or doubly-read connections, nodes and sinks nobody feeds,
cycles, unreachable nodes and expressions that do not parse or use forbidden constructs.
"""

from __future__ import annotations

import dataclasses
import inspect
import keyword
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError

import plugins.llm as llm
from landscape import canonical_hash
from plugins import (
    Aggregation,
    ExternalJobAggregation,
    Plugin,
    PluginNotFound,
    PluginSetup,
    Sink,
    Source,
    Transform,
    resolve_plugin,
)
from plugins.expressions import Expression, ExpressionSyntaxError, compile_expression
from plugins.protocols import MAX_RECORD_BYTES

from ._config import (
    AggregationSettings,
    CoalesceSettings,
    GateSettings,
    PipelineSettings,
    SinkSettings,
    TransformSettings,
    issues_from_validation,
)
from ._errors import ConfigError, ConfigIssue
from ._redact import redact

if TYPE_CHECKING:
    from pathlib import Path

    from plugins.llm import HttpClientChoice

__all__ = [
    "DISCARD",
    "Arrival",
    "EdgeMode",
    "Graph",
    "NodeKind",
    "NodeSpec",
    "Route",
    "compile_graph",
]

DISCARD = "discard"
#: ``on_write_failure``'s default: a row its sink cannot write ends ``failed``.
FAIL = "fail"


class NodeKind(StrEnum):
    SOURCE = "source"
    TRANSFORM = "transform"
    GATE = "gate"
    COALESCE = "coalesce"
    AGGREGATION = "aggregation"
    SINK = "sink"


class EdgeMode(StrEnum):
    """How a token travels an edge: moved, copied into a branch, or diverted on error."""

    MOVE = "move"
    COPY = "copy"
    DIVERT = "divert"


class Arrival(StrEnum):
    """How a token reached a sink, which decides its outcome there."""

    NORMAL = "completed"
    ROUTED = "routed"
    #: Down an error route (``on_error``, ``on_validation_failure``).
    ERROR = "quarantined"
    #: From a sink that could not write it (``on_write_failure``).
    WRITE_FAILURE = "diverted"


@dataclass(frozen=True, slots=True)
class Route:
    """Where one kind of result of a node goes; ``target is None`` discards."""

    label: str
    target: str | None
    edge_id: str | None
    mode: EdgeMode
    arrival: Arrival
    #: The coalesce branch this route feeds, when its target is a coalesce.
    inlet: str | None = None
    #: Whether the target is a sink (a token sent there never reaches a join).
    to_sink: bool = False


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One node of the compiled graph, everything the runtime needs to run it."""

    node_id: str
    kind: NodeKind
    settings: BaseModel
    plugin: Plugin | None = None
    routes: Mapping[str, Route] = field(default_factory=dict)
    #: Where rows that fail here go (``on_error`` / ``on_validation_failure``); ``None``:
    #: they end ``failed`` (``quarantined`` at the source).
    error_route: Route | None = None
    #: A gate's condition, or an aggregation's trigger condition.
    condition: Expression | None = None
    #: An aggregation's ``group_by``, as an expression over ``row``.
    group_by: Expression | None = None
    #: A coalesce's fork gate: the node whose branches it joins.
    joins: str | None = None

    def all_routes(self) -> list[Route]:
        return [*self.routes.values(), *([self.error_route] if self.error_route else [])]

    @property
    def plugin_name(self) -> str | None:
        return None if self.plugin is None else _plugin_label(type(self.plugin))

    def config(self) -> dict[str, Any]:
        """The node's settings as recorded in the Landscape (secrets redacted).

        A plugin with an options model records its validated options, as that model
        dumps them: fields it excludes (a memory source's rows) are data, not config.
        """
        dumped = self.settings.model_dump(mode="python", by_alias=True, exclude_none=True)
        if self.plugin is not None:
            dumped["plugin"] = self.plugin_name
            if isinstance(self.plugin.options, BaseModel):
                dumped["options"] = _dump_options(self.plugin.options)
            details = self.plugin.audit_details()
            if details:
                dumped["plugin_details"] = details
        return dict(_jsonable(redact(dumped)))


@dataclass(frozen=True, slots=True)
class Graph:
    """The executable pipeline: nodes in topological order, wired by routes."""

    settings: PipelineSettings
    nodes: Mapping[str, NodeSpec]
    base_dir: Path

    @property
    def config_hash(self) -> str:
        return canonical_hash({node_id: spec.config() for node_id, spec in self.nodes.items()})

    @property
    def source(self) -> NodeSpec:
        """The source node (every graph has exactly one)."""
        return next(spec for spec in self.nodes.values() if spec.kind is NodeKind.SOURCE)

    def routes(self) -> Iterator[tuple[NodeSpec, Route]]:
        for spec in self.nodes.values():
            for route in spec.all_routes():
                yield spec, route

    def consumers_of(self, node_id: str) -> list[str]:
        return [r.target for r in self.nodes[node_id].all_routes() if r.target is not None]

    def describe(self) -> list[str]:
        """One line per route, for ``ledgerflow validate``."""
        lines = []
        for spec, route in self.routes():
            target = route.target or DISCARD
            if route.inlet is not None:
                target += f" [branch {route.inlet}]"
            lines.append(f"{spec.node_id} --{route.label} ({route.mode})--> {target}")
        return lines


def _dump_options(options: BaseModel) -> Any:
    try:
        return options.model_dump(mode="json")
    except PydanticSerializationError:  # an option of a type pydantic cannot serialise
        return options.model_dump(mode="python")


def _jsonable(value: Any) -> Any:
    """``value`` with anything JSON cannot hold (an iterable of rows, an object) named instead."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return f"<{type(value).__name__}>"


def _plugin_label(cls: type) -> str:
    name = getattr(cls, "name", "")
    return name if isinstance(name, str) and name else f"{cls.__module__}:{cls.__qualname__}"


def _endpoints(
    settings: PipelineSettings, base_dir: Path, http_clients: Mapping[str, HttpClientChoice]
) -> dict[str, Any]:
    """The clients of the configured endpoints (with none, the HTTP client is not loaded)."""
    # `llm.Endpoint` loads the HTTP client on first use (plugins.llm is a lazy package).
    return {
        name: llm.Endpoint(name, endpoint, base_dir, http_client=http_clients.get(name))
        for name, endpoint in settings.endpoints.items()
    }


class _Builder:
    """Collects every problem instead of stopping at the first."""

    def __init__(
        self,
        settings: PipelineSettings,
        base_dir: Path,
        http_clients: Mapping[str, HttpClientChoice],
    ) -> None:
        self.settings = settings
        self.base_dir = base_dir
        self.issues: list[ConfigIssue] = []
        self.endpoints = _endpoints(settings, base_dir, http_clients)
        for name in sorted(set(http_clients) - set(settings.endpoints)):
            self.fail("endpoints", f"an HTTP client is given for '{name}', not an endpoint")
        self.consumers: dict[str, str] = {}
        #: Connection -> the coalesce branch it is, for a coalesce's branch connections.
        self.inlets: dict[str, str] = {}
        self.sinks: set[str] = set()
        self.fed: set[str] = set()
        #: Key path of each claimed connection, and the connections something writes to.
        self.input_paths: dict[str, str] = {}
        self.fed_connections: set[str] = set()

    def fail(self, path: str, message: str) -> None:
        self.issues.append(ConfigIssue(path, message))

    # -- plugins -----------------------------------------------------------------------

    def plugin(
        self,
        kind: str,
        base: type[Plugin],
        settings: Any,
        path: str,
        *,
        max_record_bytes: int = MAX_RECORD_BYTES,
    ) -> Plugin | None:
        """The node's plugin built from ``settings.plugin`` and ``settings.options``."""
        ref = settings.plugin
        if isinstance(ref, base):
            return ref
        try:
            cls = (
                ref if inspect.isclass(ref) and issubclass(ref, base) else resolve_plugin(kind, ref)
            )
        except PluginNotFound as exc:
            self.fail(f"{path}.plugin", str(exc))
            return None
        setup = PluginSetup(
            node_name=settings.name,
            base_dir=self.base_dir,
            endpoints=self.endpoints,
            max_record_bytes=max_record_bytes,
        )
        try:
            return cls.from_options(settings.options, setup)
        except ValidationError as exc:
            self.issues.extend(issues_from_validation(exc, f"{path}.options"))
        except (ExpressionSyntaxError, ValueError, TypeError) as exc:
            self.fail(f"{path}.options", str(exc))
        return None

    # -- connections ---------------------------------------------------------------------

    def claim_input(self, connection: str, node: str, path: str) -> None:
        if connection in self.sinks:
            self.fail(path, f"'{connection}' is a sink; a node cannot read it")
        elif connection in self.consumers:
            self.fail(
                path, f"connection '{connection}' is already read by '{self.consumers[connection]}'"
            )
        else:
            self.consumers[connection] = node
            self.input_paths[connection] = path

    def route(
        self,
        source: str,
        label: str,
        name: str,
        path: str,
        mode: EdgeMode,
        arrival: Arrival,
        *,
        sinks_only: bool = False,
        may_discard: bool = False,
    ) -> Route | None:
        if name == DISCARD and may_discard:
            return Route(label, None, None, mode, arrival)
        if sinks_only and name not in self.sinks:
            self.fail(path, f"'{name}' is not a sink" + (" (or 'discard')" if may_discard else ""))
            return None
        target = name if name in self.sinks else self.consumers.get(name)
        if target is None:
            self.fail(
                path, f"nothing reads '{name}': no node has it as input and no sink has that name"
            )
            return None
        self.fed.add(target)
        self.fed_connections.add(name)
        edge_id = f"{source}:{label}->{target}"
        inlet = self.inlets.get(name)
        return Route(label, target, edge_id, mode, arrival, inlet, to_sink=name in self.sinks)


def compile_graph(
    settings: PipelineSettings,
    base_dir: Path,
    *,
    http_clients: Mapping[str, HttpClientChoice] | None = None,
) -> Graph:
    """Build the executable graph, or raise :class:`ConfigError` listing every problem.

    ``http_clients`` maps endpoint names to a caller's own HTTP client or transport.
    """
    builder = _Builder(settings, base_dir, http_clients or {})
    names = _check_names(builder)
    builder.sinks = {sink.name for sink in settings.sinks}
    for i, transform in enumerate(settings.transforms):
        builder.claim_input(transform.input, transform.name, f"transforms[{i}].input")
    for i, gate in enumerate(settings.gates):
        builder.claim_input(gate.input, gate.name, f"gates[{i}].input")
    for i, coalesce in enumerate(settings.coalesce):
        for branch, connection in coalesce.branches.items():
            builder.claim_input(connection, coalesce.name, f"coalesce[{i}].branches.{branch}")
            builder.inlets[connection] = branch
    for i, aggregation in enumerate(settings.aggregations):
        builder.claim_input(aggregation.input, aggregation.name, f"aggregations[{i}].input")
    specs = [_source_spec(builder)]
    specs += [_transform_spec(builder, t, i) for i, t in enumerate(settings.transforms)]
    specs += [_gate_spec(builder, g, i) for i, g in enumerate(settings.gates)]
    specs += [_coalesce_spec(builder, c, i) for i, c in enumerate(settings.coalesce)]
    specs += [_aggregation_spec(builder, a, i) for i, a in enumerate(settings.aggregations)]
    specs += [_sink_spec(builder, s, i) for i, s in enumerate(settings.sinks)]
    nodes = {spec.node_id: spec for spec in specs if spec is not None}
    _check_feeding(builder)
    if not builder.issues:
        order = _topological_order(builder, nodes, names)
        nodes = {node_id: nodes[node_id] for node_id in order}
    if not builder.issues:
        nodes = _link_joins(builder, nodes)
    if builder.issues:
        raise ConfigError(builder.issues)
    return Graph(settings=settings, nodes=nodes, base_dir=base_dir)


def _check_names(builder: _Builder) -> dict[str, str]:
    """Node name -> key path; duplicates and reserved names are issues."""
    s = builder.settings
    entries = [(s.source.name, "source.name")]
    entries += [(t.name, f"transforms[{i}].name") for i, t in enumerate(s.transforms)]
    entries += [(g.name, f"gates[{i}].name") for i, g in enumerate(s.gates)]
    entries += [(c.name, f"coalesce[{i}].name") for i, c in enumerate(s.coalesce)]
    entries += [(a.name, f"aggregations[{i}].name") for i, a in enumerate(s.aggregations)]
    entries += [(k.name, f"sinks[{i}].name") for i, k in enumerate(s.sinks)]
    names: dict[str, str] = {}
    for name, path in entries:
        if name == DISCARD or not name:
            builder.fail(path, f"'{name}' cannot be a node name")
        elif name in names:
            builder.fail(path, f"duplicate node name '{name}' (also at {names[name]})")
        else:
            names[name] = path.rsplit(".", 1)[0]
    return names


def _source_spec(b: _Builder) -> NodeSpec | None:
    src = b.settings.source
    plugin = b.plugin("source", Source, src, "source", max_record_bytes=src.max_record_bytes)
    routes = {}
    ok = b.route(
        src.name, "success", src.on_success, "source.on_success", EdgeMode.MOVE, Arrival.NORMAL
    )
    if ok:
        routes["success"] = ok
    bad = None
    if src.on_validation_failure is not None:
        bad = b.route(
            src.name,
            "validation_failure",
            src.on_validation_failure,
            "source.on_validation_failure",
            EdgeMode.DIVERT,
            Arrival.ERROR,
            sinks_only=True,
            may_discard=True,
        )
    if plugin is None:
        return None
    return NodeSpec(src.name, NodeKind.SOURCE, src, plugin, routes, error_route=bad)


def _error_route(b: _Builder, node: str, target: str | None, path: str) -> Route | None:
    if target is None:
        return None
    return b.route(node, "error", target, path, EdgeMode.DIVERT, Arrival.ERROR, sinks_only=True)


def _transform_spec(b: _Builder, t: TransformSettings, i: int) -> NodeSpec | None:
    path = f"transforms[{i}]"
    plugin = b.plugin("transform", Transform, t, path)
    if isinstance(plugin, Transform) and t.batch_size > 1:
        refusal = plugin.batch_refusal()
        if refusal is not None:
            b.fail(f"{path}.batch_size", f"{refusal}: batch_size must be 1")
    error_route = _error_route(b, t.name, t.on_error, f"{path}.on_error")
    ok = b.route(
        t.name, "success", t.on_success, f"{path}.on_success", EdgeMode.MOVE, Arrival.NORMAL
    )
    if plugin is None or ok is None:
        return None
    return NodeSpec(t.name, NodeKind.TRANSFORM, t, plugin, {"success": ok}, error_route)


def _gate_spec(b: _Builder, g: GateSettings, i: int) -> NodeSpec | None:
    path = f"gates[{i}]"
    error_route = _error_route(b, g.name, g.on_error, f"{path}.on_error")
    routes: dict[str, Route] = {}
    condition = None
    if g.fork_to is not None:
        for branch, name in g.fork_to.items():
            r = b.route(
                g.name, branch, name, f"{path}.fork_to.{branch}", EdgeMode.COPY, Arrival.ROUTED
            )
            if r:
                routes[branch] = r
    else:
        assert g.condition is not None
        assert g.routes is not None
        try:
            condition = compile_expression(g.condition)
        except ExpressionSyntaxError as exc:
            b.fail(f"{path}.condition", str(exc))
        for label, name in g.routes.items():
            r = b.route(
                g.name,
                label,
                name,
                f"{path}.routes.{label}",
                EdgeMode.MOVE,
                Arrival.ROUTED,
                may_discard=True,
            )
            if r:
                routes[label] = r
    return NodeSpec(g.name, NodeKind.GATE, g, None, routes, error_route, condition)


def _coalesce_spec(b: _Builder, c: CoalesceSettings, i: int) -> NodeSpec | None:
    path = f"coalesce[{i}]"
    _check_coalesce_options(b, c, path)
    error_route = _error_route(b, c.name, c.on_error, f"{path}.on_error")
    ok = b.route(
        c.name, "success", c.on_success, f"{path}.on_success", EdgeMode.MOVE, Arrival.NORMAL
    )
    if ok is None:
        return None
    return NodeSpec(c.name, NodeKind.COALESCE, c, None, {"success": ok}, error_route)


def _check_coalesce_options(b: _Builder, c: CoalesceSettings, path: str) -> None:
    """Options that only make sense together, each reported at its own key."""
    if c.policy == "quorum":
        if c.quorum is None:
            b.fail(f"{path}.quorum", "policy quorum needs `quorum`")
        elif c.quorum > len(c.branches):
            b.fail(f"{path}.quorum", f"quorum {c.quorum} exceeds the {len(c.branches)} branches")
    elif c.quorum is not None:
        b.fail(f"{path}.quorum", "`quorum` is only for policy quorum")
    if c.merge == "select":
        if c.select_branch is None:
            b.fail(f"{path}.select_branch", "merge select needs `select_branch`")
        elif c.select_branch not in c.branches:
            b.fail(
                f"{path}.select_branch",
                f"select_branch '{c.select_branch}' is not one of the branches",
            )
    elif c.select_branch is not None:
        b.fail(f"{path}.select_branch", "`select_branch` is only for merge select")
    if c.prefer is not None:
        if c.merge != "union":
            b.fail(f"{path}.prefer", "`prefer` is only for merge union")
        elif c.prefer not in c.branches:
            b.fail(f"{path}.prefer", f"prefer '{c.prefer}' is not one of the branches")


#: The names an aggregation's trigger condition may use.
TRIGGER_NAMES = ("row", "batch_count", "batch_age_seconds")


def _aggregation_spec(b: _Builder, a: AggregationSettings, i: int) -> NodeSpec | None:
    path = f"aggregations[{i}]"
    plugin = b.plugin("aggregation", Aggregation, a, path)
    error_route = _error_route(b, a.name, a.on_error, f"{path}.on_error")
    ok = b.route(
        a.name, "success", a.on_success, f"{path}.on_success", EdgeMode.MOVE, Arrival.NORMAL
    )
    condition = group_by = None
    if a.trigger.condition is not None:
        try:
            condition = compile_expression(a.trigger.condition, names=TRIGGER_NAMES)
        except ExpressionSyntaxError as exc:
            b.fail(f"{path}.trigger.condition", str(exc))
    if a.group_by is not None:
        source = a.group_by.strip()
        if source.isidentifier() and not keyword.iskeyword(source) and source != "row":
            source = f"row[{source!r}]"  # a bare name is a field
        try:
            group_by = compile_expression(source)
        except ExpressionSyntaxError as exc:
            b.fail(f"{path}.group_by", str(exc))
    if isinstance(plugin, ExternalJobAggregation) and a.output_mode == "single":
        b.fail(
            f"{path}.output_mode",
            "an external-job aggregation answers each row: use passthrough or transform",
        )
    if plugin is None or ok is None:
        return None
    return NodeSpec(
        a.name,
        NodeKind.AGGREGATION,
        a,
        plugin,
        {"success": ok},
        error_route,
        condition=condition,
        group_by=group_by,
    )


def _sink_spec(b: _Builder, s: SinkSettings, i: int) -> NodeSpec | None:
    plugin = b.plugin("sink", Sink, s, f"sinks[{i}]")
    failsink = None
    if s.on_write_failure != FAIL:
        path = f"sinks[{i}].on_write_failure"
        if s.on_write_failure == s.name:
            b.fail(path, f"sink '{s.name}' cannot take its own write failures")
        else:
            failsink = b.route(
                s.name,
                "write_failure",
                s.on_write_failure,
                path,
                EdgeMode.DIVERT,
                Arrival.WRITE_FAILURE,
                sinks_only=True,
                may_discard=True,
            )
    if plugin is None:
        return None
    return NodeSpec(s.name, NodeKind.SINK, s, plugin, error_route=failsink)


def _check_feeding(b: _Builder) -> None:
    for connection, path in b.input_paths.items():
        if connection not in b.fed_connections:
            b.fail(path, f"nothing writes to connection '{connection}'")
    for i, sink in enumerate(b.settings.sinks):
        if sink.name not in b.fed:
            b.fail(f"sinks[{i}].name", f"no node writes to sink '{sink.name}'")


def _link_joins(b: _Builder, nodes: Mapping[str, NodeSpec]) -> dict[str, NodeSpec]:
    """Give each coalesce the fork gate it joins: the nearest gate upstream of every one
    of its branches that forks into all of its branch names."""
    upstream: dict[str, set[str]] = {node_id: set() for node_id in nodes}
    for node_id, spec in nodes.items():  # topological order: parents are complete first
        for route in spec.all_routes():
            if route.target is not None:
                upstream[route.target] |= upstream[node_id] | {node_id}
    linked = dict(nodes)
    for i, settings in enumerate(b.settings.coalesce):
        coalesce = nodes.get(settings.name)
        if coalesce is None:
            continue
        feeders = {
            node_id
            for node_id, other in nodes.items()
            for route in other.all_routes()
            if route.target == settings.name
        }
        common = set.intersection(*({f} | upstream[f] for f in feeders)) if feeders else set()
        forks = [
            node_id
            for node_id in nodes
            if node_id in common
            and isinstance(gate := nodes[node_id].settings, GateSettings)
            and gate.fork_to is not None
            and set(settings.branches) <= set(gate.fork_to)
        ]
        if not forks:
            names = ", ".join(sorted(settings.branches))
            b.fail(
                f"coalesce[{i}].branches",
                f"no fork gate upstream of every branch forks rows into the branches {names}",
            )
            continue
        linked[settings.name] = dataclasses.replace(coalesce, joins=forks[-1])
    return linked


def _topological_order(
    b: _Builder, nodes: Mapping[str, NodeSpec], names: Mapping[str, str]
) -> list[str]:
    """Nodes reachable from the source, parents first; cycles and unreachable nodes are issues."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(node_id: str, trail: list[str]) -> None:
        if state.get(node_id) == "done":
            return
        if state.get(node_id) == "active":
            cycle = [*trail[trail.index(node_id) :], node_id]
            b.fail(names[node_id], "cycle: " + " -> ".join(cycle))
            return
        state[node_id] = "active"
        for route in nodes[node_id].all_routes():
            if route.target is not None:
                visit(route.target, [*trail, node_id])
        state[node_id] = "done"
        order.append(node_id)

    source = b.settings.source.name
    visit(source, [])
    for node_id in nodes:
        if node_id not in state:
            b.fail(names[node_id], f"'{node_id}' is not reachable from the source")
    order.reverse()
    return order
