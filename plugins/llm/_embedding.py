"""The ``embedding`` transform: a vector per row from ``/embeddings`` (with a node's
``batch_size`` above 1, one request per batch)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field

from plugins.protocols import (
    CallLog,
    Determinism,
    PluginSetup,
    Row,
    RowContext,
    Transform,
    TransformResult,
)

from ._transform import AnswerError, endpoint_for

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

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
    With a node's ``batch_size`` above 1 a batch is one request whose ``input`` lists
    the rows' texts; each vector goes back to its row by its ``index`` in the answer.
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
        text = self._text(row)
        answer = await self._post([text], ctx.calls)
        return self._merge(row, _vectors(answer, 1).get(0))

    async def process_batch(
        self, rows: Sequence[Row], contexts: Sequence[RowContext], calls: CallLog
    ) -> list[TransformResult | Exception]:
        """One request for the texts of all ``rows``, recorded for each row of the batch
        (a call the batch shares, also for a row whose text it could not hold).

        A row whose input is not text is its own error, and its input is not sent; a
        row the answer has no vector, or several, for is its own error; a call that
        fails is the error of every row whose text it held.
        """
        results: dict[int, TransformResult | Exception] = {}
        texts: dict[int, str] = {}
        for i, row in enumerate(rows):
            try:
                texts[i] = self._text(row)
            except AnswerError as exc:
                results[i] = exc
        if texts:
            try:
                answer = await self._post(list(texts.values()), calls)
                vectors = _vectors(answer, len(texts))
            except Exception as exc:  # the call failed, or answered no data: each row's error
                results.update(dict.fromkeys(texts, exc))
            else:
                for position, i in enumerate(texts):
                    results[i] = self._result(rows[i], vectors.get(position))
        return [results[i] for i in range(len(rows))]

    def _text(self, row: Row) -> str:
        """The text ``row`` asks to embed; :class:`AnswerError` when it has none."""
        field = self.options.input_field
        text = row.get(field)
        if not isinstance(text, str):
            raise AnswerError(f"field {field!r} is {type(text).__name__}, not text")
        return text

    async def _post(self, texts: list[str], calls: CallLog) -> dict[str, Any]:
        """One logical call embedding ``texts``."""
        o = self.options
        body: dict[str, Any] = {"model": o.model, "input": texts}
        if o.dimensions is not None:
            body["dimensions"] = o.dimensions
        return await self.endpoint.post(
            "/embeddings",
            body,
            calls=calls,
            call_type="embedding",
            estimated_tokens=sum(len(text) // 4 + 1 for text in texts),
            timeout_seconds=o.timeout_seconds,
            max_attempts=o.max_attempts,
        )

    def _result(self, row: Row, vector: Any) -> TransformResult | Exception:
        """``row`` with ``vector`` merged in, or the :class:`AnswerError` why it cannot be."""
        try:
            return self._merge(row, vector)
        except AnswerError as exc:
            return exc

    def _merge(self, row: Row, vector: Any) -> Row:
        """``row`` with ``vector`` in ``output_field``; :class:`AnswerError` when the
        answer had no usable vector for it."""
        if vector is None:
            raise AnswerError("the answer has no (single) embedding for this input")
        if not isinstance(vector, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in vector
        ):
            raise AnswerError("the embedding is not a list of numbers")
        return {**row, self.options.output_field: vector}


def _vectors(answer: Any, n: int) -> dict[int, Any]:
    """The embeddings of an answer to ``n`` inputs by their ``index``; an index held by
    several entries, or outside the inputs, maps to nothing.  :class:`AnswerError` when
    the answer has no ``data`` list."""
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list):
        raise AnswerError("the answer has no data list")
    found: dict[int, list[Any]] = {}
    for entry in data:
        index = entry.get("index") if isinstance(entry, dict) else None
        if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < n:
            found.setdefault(index, []).append(entry.get("embedding"))
    return {index: vectors[0] for index, vectors in found.items() if len(vectors) == 1}
