"""The ``llm`` transform: one chat completion per row, its answer mapped into the row."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self, TypeVar

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from plugins.protocols import (
    Determinism,
    PluginSetup,
    Row,
    RowContext,
    Transform,
    TransformResult,
)

from ._endpoint import Endpoint
from ._prompts import PromptError, PromptTemplate
from ._strict import strict_schema

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from pathlib import Path

    from plugins.protocols import CallLog

__all__ = ["AnswerError", "LlmOptions", "LlmTransform", "endpoint_for"]


T = TypeVar("T")

#: How many answer texts found valid are remembered (then forgotten all at once).
_VALID_ANSWERS_KEPT = 1024

_BATCH_INSTRUCTIONS = (
    "The user message is a JSON object whose 'batch' array holds {n} prompts, each with "
    "an 'index'. Answer each prompt on its own, and reply with a JSON object whose "
    "'answers' array holds exactly {n} answers, each with the 'index' of its prompt {how}."
)

#: Per ``response_format``: the name of a batch's structured output, how its
#: instructions say where an answer goes, and the schema of that answer (``None``: the
#: answer's fields are the item's own, next to ``index``).  The mock server knows the
#: names (``_mock_answers``).
_BATCH_FORMATS: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    "text": ("text_answers", "and your answer, as text, in 'answer'", {"type": "string"}),
    "json": (
        "json_answers",
        "and your answer, one JSON object written out as JSON text, in 'answer'",
        {"type": "string", "description": "The answer: one JSON object, as JSON text."},
    ),
    "json_schema": ("answers", "and the fields of your answer", None),
}

#: The field of a batch answer's item that names its row.
_INDEX = "index"


class AnswerError(ValueError):
    """The model's answer cannot be used: not JSON, or not valid against the schema."""


class LlmOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: str = Field(description="Name of an entry of the top-level `endpoints`.")
    model: str = Field(description="Model name sent to the endpoint.")
    system: str | None = Field(None, description="System message template (Jinja2, sandboxed).")
    system_file: str | None = Field(None, description="System template from a file.")
    prompt: str | None = Field(None, description="User message template over `row`.")
    prompt_file: str | None = Field(None, description="User template from a file.")
    response_format: Literal["text", "json", "json_schema"] = Field(
        "text", description="text | json | json_schema (structured output, validated)."
    )
    json_schema: dict[str, Any] | None = Field(
        None,
        description="With response_format json_schema: the answer's JSON schema (sent as "
        "a strict structured output, see docs/architecture.md).",
    )
    output_field: str | None = Field(
        None, description="Field for the answer; json answers merge at top level without it."
    )
    parse_retries: int = Field(
        1, ge=0, description="Calls again this often when the answer is unusable."
    )
    temperature: float | None = Field(None, ge=0, description="Sampling temperature.")
    max_tokens: int | None = Field(None, ge=1, description="Longest answer, in tokens.")
    timeout_seconds: float | None = Field(None, gt=0, description="Overrides the endpoint's.")
    max_attempts: int | None = Field(None, ge=1, description="Overrides the endpoint's.")

    @field_validator("json_schema")
    @classmethod
    def _sendable(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        """A valid JSON schema that can be sent as a strict structured output (see
        ``_strict``)."""
        if schema is not None:
            try:
                jsonschema.Draft202012Validator.check_schema(schema)
            except jsonschema.SchemaError as exc:
                raise ValueError(f"json_schema is not a valid JSON schema: {exc.message}") from None
            strict_schema(schema)
        return schema

    @model_validator(mode="after")
    def _consistent(self) -> LlmOptions:
        if (self.prompt is None) == (self.prompt_file is None):
            raise ValueError("give exactly one of prompt and prompt_file")
        if self.system is not None and self.system_file is not None:
            raise ValueError("give system or system_file, not both")
        if self.response_format == "json_schema":
            if self.json_schema is None:
                raise ValueError("response_format json_schema needs json_schema")
        elif self.json_schema is not None:
            raise ValueError("json_schema is only for response_format json_schema")
        if self.response_format == "text" and self.output_field is None:
            raise ValueError("a text answer needs output_field")
        return self


def endpoint_for(setup: PluginSetup, name: str) -> Endpoint:
    """The shared endpoint ``name`` of the pipeline; ``ValueError`` when there is none."""
    endpoint = setup.endpoints.get(name)
    if not isinstance(endpoint, Endpoint):
        known = ", ".join(sorted(setup.endpoints)) or "none configured"
        raise ValueError(f"endpoint: unknown endpoint '{name}' (known: {known})")
    return endpoint


class LlmTransform(Transform):
    """Chat completion per row through a shared endpoint; the answer goes into the row.

    The rendered request is the payload of every call attempt, and the templates'
    hashes are part of the node's recorded configuration.  An unusable answer (not
    JSON, schema-invalid) is asked for again ``parse_retries`` times, then it is the
    row's error.  A ``json_schema`` is sent in its strict form (``_strict``) and answers
    are validated against the schema as given.  With a node's ``batch_size`` above 1,
    rows share requests (:meth:`process_batch`).
    """

    name: ClassVar[str] = "llm"
    version: ClassVar[str] = "2"  # 2: strict schemas, answers carried in batches
    determinism: ClassVar[Determinism] = Determinism.EXTERNAL
    Options: ClassVar[type[BaseModel]] = LlmOptions
    options: LlmOptions

    def __init__(self, options: Any, setup: PluginSetup) -> None:
        super().__init__(options, setup)
        o: LlmOptions = options
        self.endpoint = endpoint_for(setup, o.endpoint)

        def file(name: str | None) -> Path | None:
            return None if name is None else setup.resolve(name)

        self.system = PromptTemplate.load(o.system, file(o.system_file), origin="system")
        prompt = PromptTemplate.load(o.prompt, file(o.prompt_file), origin="prompt")
        assert prompt is not None
        self.prompt = prompt
        self.validator = (
            None if o.json_schema is None else jsonschema.Draft202012Validator(o.json_schema)
        )
        #: ``json_schema`` as sent with ``"strict": true``.
        self.sent_schema = None if o.json_schema is None else strict_schema(o.json_schema)
        #: Answer texts already found valid: classifying rows, a model gives the same few
        #: answers over and over, and validating costs more than the rest of parsing.
        self._valid_answers: set[str] = set()
        self.template_hashes = {
            "system": None if self.system is None else self.system.sha256,
            "prompt": self.prompt.sha256,
        }

    @classmethod
    def from_options(cls, options: Mapping[str, Any], setup: PluginSetup) -> Self:
        return cls(LlmOptions.model_validate(dict(options)), setup)

    def audit_details(self) -> dict[str, Any]:
        return {"template_sha256": self.template_hashes}

    async def open(self) -> None:
        await self.endpoint.open()

    async def aclose(self) -> None:
        await self.endpoint.aclose()

    # -- one row -----------------------------------------------------------------------

    def request(self, row: Row) -> dict[str, Any]:
        """The chat completion request for ``row`` (raises ``PromptError``)."""
        o = self.options
        messages = []
        if self.system is not None:
            messages.append({"role": "system", "content": self.system.render(row)})
        messages.append({"role": "user", "content": self.prompt.render(row)})
        response_format: dict[str, Any] | None = None
        if o.response_format == "json":
            response_format = {"type": "json_object"}
        elif o.response_format == "json_schema":
            response_format = _schema_format("answer", self.sent_schema)
        return self._body(messages, response_format, rows=1)

    async def process(self, row: Row, ctx: RowContext) -> Row:
        body = self.request(row)
        return await self._ask(
            body, ctx.calls, 1, lambda answer: self.merge(row, self.parse(answer))
        )

    async def _ask(
        self, body: dict[str, Any], calls: CallLog, rows: int, use: Callable[[dict[str, Any]], T]
    ) -> T:
        """Post ``body`` and hand the answer to ``use``; an answer it refuses
        (:class:`AnswerError`) is asked for again ``parse_retries`` times, each a new
        logical call (``call_index``), then the last refusal is raised."""
        failure: AnswerError | None = None
        for call_index in range(self.options.parse_retries + 1):
            answer = await self._post(body, calls, call_index, rows)
            try:
                return use(answer)
            except AnswerError as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def _post(
        self, body: dict[str, Any], calls: CallLog, call_index: int, rows: int
    ) -> dict[str, Any]:
        """One logical call of ``body`` (for ``rows`` rows) to the chat endpoint."""
        estimate = _estimate_tokens(body) + (self.options.max_tokens or 256) * rows
        return await self.endpoint.post(
            "/chat/completions",
            body,
            calls=calls,
            call_type="llm",
            call_index=call_index,
            estimated_tokens=estimate,
            timeout_seconds=self.options.timeout_seconds,
            max_attempts=self.options.max_attempts,
        )

    def _body(
        self, messages: list[dict[str, str]], response_format: dict[str, Any] | None, rows: int
    ) -> dict[str, Any]:
        o = self.options
        body: dict[str, Any] = {"model": o.model, "messages": messages}
        if response_format is not None:
            body["response_format"] = response_format
        if o.temperature is not None:
            body["temperature"] = o.temperature
        if o.max_tokens is not None:
            body["max_tokens"] = o.max_tokens * rows
        return body

    # -- several rows in one request -----------------------------------------------------

    def batch_refusal(self) -> str | None:
        """Rows can share a request in every ``response_format``, unless the schema has
        a top-level property named like the field that maps answers to rows."""
        properties = (self.sent_schema or {}).get("properties", {})
        if _INDEX in properties:
            return (
                f"json_schema has a top-level property {_INDEX!r}, the field batched "
                "answers name their rows by (rename it to batch rows)"
            )
        return None

    async def process_batch(
        self, rows: Sequence[Row], contexts: Sequence[RowContext], calls: CallLog
    ) -> list[TransformResult | Exception]:
        """One request for all ``rows`` (:meth:`batch_request`): their prompts as a JSON
        array, the answers as a JSON array mapped back to the rows by ``index``.

        Each row keeps the first usable answer it gets.  While some row has none — no
        item with its index, several, or one whose answer is missing or unusable; or
        an answer unusable as a whole — the batch is asked again, ``parse_retries``
        times, each a new logical call; then every row still without an answer has
        its own error saying why.  A call that fails is the error of every row still
        without an answer.  Rows whose prompts cannot be rendered, or whose system
        prompts differ, go one request each.
        """
        try:
            body = self.batch_request(rows)
        except PromptError:
            body = None
        if body is None:
            return await super().process_batch(rows, contexts, calls)
        answered: dict[int, TransformResult] = {}
        errors: dict[int, Exception] = {}
        for call_index in range(self.options.parse_retries + 1):
            try:
                answer = await self._post(body, calls, call_index, len(rows))
            except Exception as exc:  # the call failed: the error of each row unanswered
                errors = dict.fromkeys(range(len(rows)), exc)
                break
            for i, result in enumerate(self.batch_results(rows, answer)):
                if i in answered:
                    continue
                if isinstance(result, Exception):
                    errors[i] = result
                else:
                    answered[i] = result
            if len(answered) == len(rows):
                break
        return [answered[i] if i in answered else errors[i] for i in range(len(rows))]

    def batch_request(self, rows: Sequence[Row]) -> dict[str, Any] | None:
        """The one chat completion request for ``rows`` (raises ``PromptError``), or
        ``None`` when their system prompts differ and they cannot share one."""
        prompts = [{_INDEX: i, "prompt": self.prompt.render(row)} for i, row in enumerate(rows)]
        name, how, _ = _BATCH_FORMATS[self.options.response_format]
        instructions = _BATCH_INSTRUCTIONS.format(n=len(rows), how=how)
        if self.system is not None:
            systems = {self.system.render(row) for row in rows}
            if len(systems) > 1:
                return None
            instructions = systems.pop() + "\n\n" + instructions
        messages = [
            {"role": "system", "content": instructions},
            {"role": "user", "content": json.dumps({"batch": prompts}, ensure_ascii=False)},
        ]
        schema = _schema_format(name, self.batch_schema(len(rows)))
        return self._body(messages, schema, rows=len(rows))

    def batch_schema(self, n: int) -> dict[str, Any]:
        """The strict schema of the answer to a batch of ``n`` rows: an ``answers``
        array of ``n`` items, each the ``index`` of its row next to its answer — in
        ``answer`` (text, or a JSON object as JSON text), or, with ``json_schema``, as
        the schema's own fields."""
        index = {_INDEX: {"type": "integer", "minimum": 0, "maximum": n - 1}}
        answer = _BATCH_FORMATS[self.options.response_format][2]
        schema = self.sent_schema
        definitions: dict[str, Any] = {}
        if answer is not None or schema is None:
            item: dict[str, Any] = {
                "type": "object",
                "properties": {**index, "answer": answer},
                "required": [_INDEX, "answer"],
                "additionalProperties": False,
            }
        else:
            item = {k: v for k, v in schema.items() if k not in ("$defs", "definitions")}
            definitions = {k: v for k, v in schema.items() if k in ("$defs", "definitions")}
            item["properties"] = {**index, **schema.get("properties", {})}
            item["required"] = [_INDEX, *schema.get("required", [])]
        return {
            "type": "object",
            "properties": {
                "answers": {"type": "array", "items": item, "minItems": n, "maxItems": n}
            },
            "required": ["answers"],
            "additionalProperties": False,
            **definitions,
        }

    def batch_results(
        self, rows: Sequence[Row], answer: dict[str, Any]
    ) -> list[TransformResult | Exception]:
        """What ``answer``, to :meth:`batch_request` for ``rows``, makes of each row: the
        row with its answer mapped in, or an :class:`AnswerError` saying why it has none."""
        try:
            items = _batch_items(answer)
        except AnswerError as exc:
            return [exc] * len(rows)
        count = sum(map(len, items.values()))
        return [
            self._batch_result(row, i, items.get(i, []), count, len(rows))
            for i, row in enumerate(rows)
        ]

    def _batch_result(
        self, row: Row, index: int, items: list[dict[str, Any]], count: int, n: int
    ) -> TransformResult | Exception:
        """``row`` with the answer of its one item mapped in, or why it cannot be."""
        if len(items) != 1:
            held = "no item" if not items else f"{len(items)} items"
            return AnswerError(
                f"the batch answer holds {held} with index {index} for this row "
                f"({count} items for {n} rows)"
            )
        try:
            return self.merge(row, self._item_value(items[0]))
        except AnswerError as exc:
            return exc

    def _item_value(self, item: dict[str, Any]) -> Any:
        """The usable answer an item of a batch answer holds; :class:`AnswerError` if none."""
        response_format = self.options.response_format
        if response_format == "json_schema":
            value = {k: v for k, v in item.items() if k != _INDEX}
            self._validate(value)
            return value
        text = item.get("answer")
        if not isinstance(text, str):
            raise AnswerError("the batch answer's item for this row has no text 'answer'")
        if response_format == "text":
            return text
        try:
            return json.loads(text)
        except ValueError:
            raise AnswerError(
                f"the batch answer's item for this row is not JSON: {text[:200]!r}"
            ) from None

    # -- answers -----------------------------------------------------------------------

    def parse(self, answer: dict[str, Any]) -> Any:
        """The usable value of ``answer``: its text, or its JSON (validated by the schema)."""
        content = _content(answer)
        if self.options.response_format == "text":
            return content
        try:
            value = json.loads(content)
        except ValueError:
            raise AnswerError(f"the answer is not JSON: {content[:200]!r}") from None
        if self.validator is not None and content not in self._valid_answers:
            self._validate(value)
            if len(self._valid_answers) >= _VALID_ANSWERS_KEPT:
                self._valid_answers.clear()
            self._valid_answers.add(content)
        return value

    def _validate(self, value: Any) -> None:
        if self.validator is None or self.validator.is_valid(value):
            return
        errors = sorted(self.validator.iter_errors(value), key=lambda e: list(e.path))
        if errors:
            where = "/".join(map(str, errors[0].path)) or "(root)"
            raise AnswerError(
                f"the answer does not match the schema at {where}: {errors[0].message}"
            )

    def merge(self, row: Row, value: Any) -> Row:
        field = self.options.output_field
        if field is not None:
            return {**row, field: value}
        if not isinstance(value, dict):
            raise AnswerError("a JSON answer without output_field must be an object")
        return {**row, **value}


def _content(answer: dict[str, Any]) -> str:
    """The text of a chat completion's first choice; :class:`AnswerError` if none."""
    try:
        content = answer["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise AnswerError("the answer has no choices[0].message.content") from None
    if not isinstance(content, str):
        raise AnswerError("the answer's content is not text")
    return content


def _batch_items(answer: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """The items of a batch answer by their ``index`` (items without an integer index
    are left out); :class:`AnswerError` when the answer holds no ``answers`` array."""
    content = _content(answer)
    try:
        value = json.loads(content)
    except ValueError:
        raise AnswerError(f"the batch answer is not JSON: {content[:200]!r}") from None
    items = value.get("answers") if isinstance(value, dict) else None
    if not isinstance(items, list):
        raise AnswerError("the batch answer has no 'answers' array")
    by_index: dict[int, list[dict[str, Any]]] = {}
    for item in items:
        index = item.get(_INDEX) if isinstance(item, dict) else None
        if isinstance(index, int) and not isinstance(index, bool):
            by_index.setdefault(index, []).append(item)
    return by_index


def _schema_format(name: str, schema: dict[str, Any] | None) -> dict[str, Any]:
    """A ``response_format`` asking for structured output by ``schema``."""
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def _estimate_tokens(body: dict[str, Any]) -> int:
    """About four characters per token, over the messages' text."""
    return sum(len(m["content"]) for m in body["messages"]) // 4 + 1
