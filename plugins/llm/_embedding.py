"""The ``embedding`` transform: a vector per row from ``/embeddings``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field

from plugins.protocols import Determinism, PluginSetup, Row, RowContext, Transform

from ._transform import AnswerError, endpoint_for

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["EmbeddingOptions", "EmbeddingTransform"]


class EmbeddingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: str = Field(description="Name of an entry of the top-level `endpoints`.")
    model: str = Field(description="Embedding model name.")
    input_field: str = Field(description="Field holding the text to embed.")
    output_field: str = Field("embedding", description="Field for the vector.")
    dimensions: int | None = Field(None, ge=1, description="Vector length, if the model can.")
    timeout_seconds: float | None = Field(None, gt=0, description="Overrides the endpoint's.")
    max_attempts: int | None = Field(None, ge=1, description="Overrides the endpoint's.")


class EmbeddingTransform(Transform):
    """Embeds ``input_field`` of each row through a shared endpoint into ``output_field``.

    A missing or non-text input is the row's error; every call attempt is recorded.
    """

    name: ClassVar[str] = "embedding"
    determinism: ClassVar[Determinism] = Determinism.EXTERNAL
    Options: ClassVar[type[BaseModel]] = EmbeddingOptions
    options: EmbeddingOptions

    def __init__(self, options: Any, setup: PluginSetup) -> None:
        super().__init__(options, setup)
        self.endpoint = endpoint_for(setup, self.options.endpoint)

    @classmethod
    def from_options(cls, options: Mapping[str, Any], setup: PluginSetup) -> Self:
        return cls(EmbeddingOptions.model_validate(dict(options)), setup)

    async def open(self) -> None:
        await self.endpoint.open()

    async def aclose(self) -> None:
        await self.endpoint.aclose()

    async def process(self, row: Row, ctx: RowContext) -> Row:
        o = self.options
        text = row.get(o.input_field)
        if not isinstance(text, str):
            raise AnswerError(f"field {o.input_field!r} is {type(text).__name__}, not text")
        body: dict[str, Any] = {"model": o.model, "input": [text]}
        if o.dimensions is not None:
            body["dimensions"] = o.dimensions
        answer = await self.endpoint.post(
            "/embeddings",
            body,
            calls=ctx.calls,
            call_type="embedding",
            estimated_tokens=len(text) // 4 + 1,
            timeout_seconds=o.timeout_seconds,
            max_attempts=o.max_attempts,
        )
        try:
            vector = answer["data"][0]["embedding"]
        except (KeyError, IndexError, TypeError):
            raise AnswerError("the answer has no data[0].embedding") from None
        if not isinstance(vector, list) or not all(isinstance(v, int | float) for v in vector):
            raise AnswerError("the embedding is not a list of numbers")
        return {**row, o.output_field: vector}
