"""The ``llm`` transform: one chat completion per row, its answer mapped into the row."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, model_validator

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

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from plugins.protocols import CallLog

__all__ = ["AnswerError", "LlmOptions", "LlmTransform", "endpoint_for"]


_BATCH_INSTRUCTIONS = (
    "The user message is a JSON object whose 'batch' array holds {n} prompts, each with "
    "an 'index'. Answer each prompt on its own, and reply with a JSON object whose "
    "'answers' array holds exactly {n} answers, each with the 'index' of its prompt."
)


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
        None, description="With response_format json_schema: the answer's JSON schema."
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

    @model_validator(mode="after")
    def _consistent(self) -> LlmOptions:
        if (self.prompt is None) == (self.prompt_file is None):
            raise ValueError("give exactly one of prompt and prompt_file")
        if self.system is not None and self.system_file is not None:
            raise ValueError("give system or system_file, not both")
        if self.response_format == "json_schema":
            if self.json_schema is None:
                raise ValueError("response_format json_schema needs json_schema")
            try:
                jsonschema.Draft202012Validator.check_schema(self.json_schema)
            except jsonschema.SchemaError as exc:
                raise ValueError(f"json_schema is not a valid JSON schema: {exc.message}") from None
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
    row's error.
    """

    name: ClassVar[str] = "llm"
    version: ClassVar[str] = "1"
    determinism: ClassVar[Determinism] = Determinism.EXTERNAL
    Options: ClassVar[type[BaseModel]] = LlmOptions
    options: LlmOptions

    def __init__(self, options: Any, setup: PluginSetup) -> None:
        super().__init__(options, setup)
        o: LlmOptions = options
        self.endpoint = endpoint_for(setup, o.endpoint)
        base = setup.base_dir
        self.system = PromptTemplate.load(o.system, o.system_file, base, origin="system")
        prompt = PromptTemplate.load(o.prompt, o.prompt_file, base, origin="prompt")
        assert prompt is not None
        self.prompt = prompt
        self.validator = (
            None if o.json_schema is None else jsonschema.Draft202012Validator(o.json_schema)
        )
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
        body: dict[str, Any] = {"model": o.model, "messages": messages}
        if o.temperature is not None:
            body["temperature"] = o.temperature
        if o.max_tokens is not None:
            body["max_tokens"] = o.max_tokens
        if o.response_format == "json":
            body["response_format"] = {"type": "json_object"}
        elif o.response_format == "json_schema":
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": o.json_schema, "strict": True},
            }
        return body

    async def process(self, row: Row, ctx: RowContext) -> Row:
        body = self.request(row)
        estimate = _estimate_tokens(body) + (self.options.max_tokens or 256)
        failure: AnswerError | None = None
        for call_index in range(self.options.parse_retries + 1):
            answer = await self.endpoint.post(
                "/chat/completions",
                body,
                calls=ctx.calls,
                call_type="llm",
                call_index=call_index,
                estimated_tokens=estimate,
                timeout_seconds=self.options.timeout_seconds,
                max_attempts=self.options.max_attempts,
            )
            try:
                return self.merge(row, self.parse(answer))
            except AnswerError as exc:
                failure = exc
        assert failure is not None
        raise failure

    # -- several rows in one request -----------------------------------------------------

    async def process_batch(
        self, rows: Sequence[Row], contexts: Sequence[RowContext], calls: CallLog
    ) -> list[TransformResult | Exception]:
        """One request for all ``rows``: their prompts as a JSON array, the answers as a
        JSON array of the same length mapped back by ``index``.

        A wrong count, or an answer that is not JSON, is asked again ``parse_retries``
        times, then it is every row's error; an item that is missing, repeated or
        invalid is its own row's error.
        """
        try:
            body = self.batch_request(rows)
        except PromptError:  # find which rows cannot be rendered; the rest go alone
            return [await self._single(row, ctx) for row, ctx in zip(rows, contexts, strict=True)]
        estimate = _estimate_tokens(body) + (self.options.max_tokens or 256) * len(rows)
        failure: AnswerError | None = None
        for call_index in range(self.options.parse_retries + 1):
            answer = await self.endpoint.post(
                "/chat/completions",
                body,
                calls=calls,
                call_type="llm",
                call_index=call_index,
                estimated_tokens=estimate,
                timeout_seconds=self.options.timeout_seconds,
                max_attempts=self.options.max_attempts,
            )
            try:
                items = self._batch_items(answer, len(rows))
            except AnswerError as exc:
                failure = exc
                continue
            return [self._batch_result(row, items.get(i)) for i, row in enumerate(rows)]
        assert failure is not None
        return [failure] * len(rows)

    async def _single(self, row: Row, ctx: RowContext) -> TransformResult | Exception:
        try:
            return await self.process(row, ctx)
        except Exception as exc:  # this row's error, in its place
            return exc

    def batch_request(self, rows: Sequence[Row]) -> dict[str, Any]:
        """The one chat completion request for ``rows`` (raises ``PromptError``)."""
        o = self.options
        prompts = [{"index": i, "prompt": self.prompt.render(row)} for i, row in enumerate(rows)]
        instructions = _BATCH_INSTRUCTIONS.format(n=len(rows))
        if self.system is not None:
            instructions = self.system.render(rows[0]) + "\n\n" + instructions
        body: dict[str, Any] = {
            "model": o.model,
            "messages": [
                {"role": "system", "content": instructions},
                {"role": "user", "content": json.dumps({"batch": prompts}, ensure_ascii=False)},
            ],
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "answers",
                    "schema": self._batch_schema(len(rows)),
                    "strict": True,
                },
            },
        }
        if o.temperature is not None:
            body["temperature"] = o.temperature
        if o.max_tokens is not None:
            body["max_tokens"] = o.max_tokens * len(rows)
        return body

    def _batch_schema(self, n: int) -> dict[str, Any]:
        index = {"index": {"type": "integer", "minimum": 0, "maximum": n - 1}}
        schema = self.options.json_schema
        if self.options.response_format == "text":
            item: dict[str, Any] = {
                "type": "object",
                "properties": {**index, "answer": {"type": "string"}},
                "required": ["index", "answer"],
            }
        elif schema is not None and schema.get("type") == "object":
            item = {
                **schema,
                "properties": {**index, **schema.get("properties", {})},
                "required": ["index", *schema.get("required", [])],
            }
        else:
            item = {"type": "object", "properties": index, "required": ["index"]}
        return {
            "type": "object",
            "properties": {
                "answers": {"type": "array", "items": item, "minItems": n, "maxItems": n}
            },
            "required": ["answers"],
        }

    def _batch_items(self, answer: dict[str, Any], n: int) -> dict[int, dict[str, Any]]:
        """The answer's items by index; :class:`AnswerError` when they cannot be mapped."""
        try:
            content = answer["choices"][0]["message"]["content"]
            value = json.loads(content)
        except (KeyError, IndexError, TypeError, ValueError):
            raise AnswerError("the batch answer is not a JSON object") from None
        items = value.get("answers") if isinstance(value, dict) else None
        if not isinstance(items, list):
            raise AnswerError("the batch answer has no 'answers' array")
        if len(items) != n:
            raise AnswerError(f"the batch answer has {len(items)} answers for {n} rows")
        by_index: dict[int, dict[str, Any]] = {}
        for item in items:
            index = item.get("index") if isinstance(item, dict) else None
            if isinstance(index, int) and 0 <= index < n and index not in by_index:
                by_index[index] = item
        return by_index

    def _batch_result(self, row: Row, item: dict[str, Any] | None) -> TransformResult | Exception:
        if item is None:
            return AnswerError("the batch answer has no (single) item for this row")
        value: Any = {k: v for k, v in item.items() if k != "index"}
        if self.options.response_format == "text":
            value = value.get("answer")
            if not isinstance(value, str):
                return AnswerError("the batch answer's item has no text answer")
        try:
            self._validate(value)
            return self.merge(row, value)
        except AnswerError as exc:
            return exc

    # -- answers -----------------------------------------------------------------------

    def parse(self, answer: dict[str, Any]) -> Any:
        """The usable value of ``answer``: its text, or its JSON (validated by the schema)."""
        try:
            content = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise AnswerError("the answer has no choices[0].message.content") from None
        if not isinstance(content, str):
            raise AnswerError("the answer's content is not text")
        if self.options.response_format == "text":
            return content
        try:
            value = json.loads(content)
        except ValueError:
            raise AnswerError(f"the answer is not JSON: {content[:200]!r}") from None
        self._validate(value)
        return value

    def _validate(self, value: Any) -> None:
        if self.validator is None:
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


def _estimate_tokens(body: dict[str, Any]) -> int:
    """About four characters per token, over the messages' text."""
    return sum(len(m["content"]) for m in body["messages"]) // 4 + 1
