"""The ``llm`` transform: one chat completion per row, its answer mapped into the row."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, model_validator

from plugins.protocols import Determinism, PluginSetup, Row, RowContext, Transform

from ._endpoint import Endpoint
from ._prompts import PromptTemplate

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["AnswerError", "LlmOptions", "LlmTransform", "endpoint_for"]


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
        if self.validator is not None:
            errors = sorted(self.validator.iter_errors(value), key=lambda e: list(e.path))
            if errors:
                where = "/".join(map(str, errors[0].path)) or "(root)"
                raise AnswerError(f"the answer does not match the schema at {where}: "
                                  f"{errors[0].message}")  # fmt: skip
        return value

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
