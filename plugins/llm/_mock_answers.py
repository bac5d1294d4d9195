"""The mock LLM server's answers: chat completions and embeddings, derived from the prompt.

A chat answer depends only on the server's seed, the model, the request's ``seed`` field
and the *prompt* — the text of the last user message.  System messages and earlier turns
are left out on purpose: a client that batches rows may word its batch instructions as it
likes and still gets, for each row, exactly the answer that row's prompt gets alone.

A *batch* request is one whose prompt is a JSON object ``{"batch": [{"index": i,
"prompt": "..."}, ...]}``.  Its answer is ``{"answers": [{"index": i, ...}, ...]}``, one
row per entry, in order (unless a batch fault says otherwise).  A row holds the fields the
single answer for its prompt would hold: the object a ``json_object`` or ``json_schema``
request gets (with ``json_schema``, the schema of ``properties.answers.items`` when the
schema has it, else the schema itself), or ``{"answer": text}`` for text requests.

Two ``json_schema`` names ask for the answer of another format in an ``answer`` string
(what the ``llm`` transform sends for batches of text and json rows): a row of
``text_answers`` holds ``{"answer": text}`` with the text a text request gets, a row of
``json_answers`` the object a ``json_object`` request gets, as JSON text.
"""

from __future__ import annotations

import base64
import math
import random
import struct
from dataclasses import dataclass
from hashlib import blake2b
from typing import TYPE_CHECKING, Any

import orjson

from ._mock_schema import BadRequest, compile_schema, words
from ._mock_settings import Fault

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ._mock_schema import ValueGenerator

__all__ = ["Answerer", "BatchDisorder", "ChatAnswer"]

_MAX_CACHED_FORMATS = 256
_MAX_DIMENSIONS = 4096
_FLOATS_PER_BLOCK = 16  # a 64-byte BLAKE2b digest read as 32-bit words
_DEFAULT_OBJECT_SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["positive", "negative", "neutral", "unclear"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "answer": {"type": "string"},
    },
}


def _text(salt: bytes) -> str:
    sentence = words(salt + b"text", 4, 12)
    return sentence[0].upper() + sentence[1:] + "."


def _as_row(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {"answer": value}


@dataclass(frozen=True, slots=True)
class _Format:
    """What a ``response_format`` asks for: the answer to one prompt, and a batch row."""

    single: ValueGenerator
    row: ValueGenerator
    is_text: bool = False


_TEXT = _Format(single=_text, row=lambda salt: {"answer": _text(salt)}, is_text=True)
_JSON_OBJECT = _Format(
    single=compile_schema(_DEFAULT_OBJECT_SCHEMA), row=compile_schema(_DEFAULT_OBJECT_SCHEMA)
)


def _json_text(salt: bytes) -> dict[str, Any]:
    return {"answer": orjson.dumps(_JSON_OBJECT.single(salt)).decode()}


#: ``json_schema`` names whose batch rows carry another format's answer (see the module).
_ANSWER_ROWS: dict[str, ValueGenerator] = {"text_answers": _TEXT.row, "json_answers": _json_text}


def _schema_format(response_format: Mapping[str, Any]) -> _Format:
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise BadRequest("response_format.json_schema.schema must be an object")
    schema = spec["schema"]
    answers = (schema.get("properties") or {}).get("answers")
    items = answers.get("items") if isinstance(answers, dict) else None
    single = compile_schema(schema)
    named = _ANSWER_ROWS.get(str(spec.get("name")))
    if named is not None:
        return _Format(single=single, row=named)
    row = compile_schema(items, root=schema) if isinstance(items, dict) else single
    return _Format(single=single, row=lambda salt: _as_row(row(salt)))


@dataclass(frozen=True, slots=True)
class BatchDisorder:
    """The batch faults drawn for one request (they only affect batch requests)."""

    shuffle: bool = False
    wrong_count: bool = False
    seed: int = 0


@dataclass(frozen=True, slots=True)
class ChatAnswer:
    """The assistant message of a chat completion, with its token estimates."""

    content: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    #: Entries of the batch the prompt held; 0 for a single prompt.
    batch_rows: int
    #: Batch faults that altered the answer.
    faults: tuple[Fault, ...]


def estimate_tokens(text: str) -> int:
    """The token count the mock reports for ``text``: about four characters a token."""
    return (len(text) + 3) // 4


class Answerer:
    """Deterministic chat and embedding answers for one seed.

    ``json_schema`` formats are compiled once and kept (up to a few hundred distinct
    ones), so a request pays for its schema only the first time it is seen.
    """

    def __init__(self, seed: int, embedding_dimensions: int) -> None:
        self._key = seed.to_bytes(16, "little", signed=True)
        self._dimensions = embedding_dimensions
        self._formats: dict[bytes, _Format] = {}

    def chat(self, request: Mapping[str, Any], model: str, disorder: BatchDisorder) -> ChatAnswer:
        """The answer to a chat completion request; :class:`BadRequest` when malformed."""
        texts = _message_texts(request.get("messages"))
        prompt = _last_user_text(texts)
        form = self._format(request.get("response_format"))
        prefix = self._prefix(model, request.get("seed"))
        batch = _batch_of(prompt)
        faults: tuple[Fault, ...] = ()
        if batch is None:
            value = form.single(self._digest(prefix, prompt))
            content = value if form.is_text else orjson.dumps(value).decode()
        else:
            answers = [self._row(form, prefix, index, text) for index, text in batch]
            answers, faults = _disorder(answers, disorder)
            content = orjson.dumps({"answers": answers}).decode()
        limit = request.get("max_completion_tokens") or request.get("max_tokens")
        completion_tokens, finish_reason = estimate_tokens(content), "stop"
        if isinstance(limit, int) and 0 < limit < completion_tokens:
            content, completion_tokens, finish_reason = content[: 4 * limit], limit, "length"
        return ChatAnswer(
            content=content,
            finish_reason=finish_reason,
            prompt_tokens=estimate_tokens("".join(text for _, text in texts)),
            completion_tokens=completion_tokens,
            batch_rows=0 if batch is None else len(batch),
            faults=faults,
        )

    def embeddings(self, request: Mapping[str, Any], model: str) -> dict[str, Any]:
        """The body of an embeddings response: one unit vector per input."""
        inputs = _embedding_inputs(request.get("input"))
        dimensions = request.get("dimensions") or self._dimensions
        if not isinstance(dimensions, int) or not 0 < dimensions <= _MAX_DIMENSIONS:
            raise BadRequest(f"dimensions must be an integer from 1 to {_MAX_DIMENSIONS}")
        as_base64 = request.get("encoding_format") == "base64"
        prefix = self._prefix(model, None)
        data = []
        for index, text in enumerate(inputs):
            vector = self._vector(self._digest(prefix, text), dimensions)
            embedding: Any = _base64(vector) if as_base64 else vector
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = sum(map(estimate_tokens, inputs))
        return {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def _format(self, response_format: Any) -> _Format:
        if response_format is None:
            return _TEXT
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "text":
            return _TEXT
        if kind == "json_object":
            return _JSON_OBJECT
        if kind != "json_schema":
            raise BadRequest("response_format.type must be text, json_object or json_schema")
        key = orjson.dumps(response_format, option=orjson.OPT_SORT_KEYS)
        form = self._formats.get(key)
        if form is None:
            form = _schema_format(response_format)
            if len(self._formats) >= _MAX_CACHED_FORMATS:
                self._formats.clear()
            self._formats[key] = form
        return form

    def _prefix(self, model: str, seed: Any) -> bytes:
        return b"%s\0%s\0" % (model.encode(), str(seed).encode())

    def _digest(self, prefix: bytes, text: str) -> bytes:
        return blake2b(prefix + text.encode(), key=self._key, digest_size=16).digest()

    def _row(self, form: _Format, prefix: bytes, index: Any, text: str) -> dict[str, Any]:
        row = {"index": index}
        row.update(form.row(self._digest(prefix, text)))
        row["index"] = index
        return row

    def _vector(self, digest: bytes, dimensions: int) -> list[float]:
        blocks = -(-dimensions // _FLOATS_PER_BLOCK)
        raw = b"".join(blake2b(digest + bytes([i])).digest() for i in range(blocks))
        values = [word / 2**32 - 0.5 for word in struct.unpack(f"<{blocks * 16}I", raw)]
        del values[dimensions:]
        norm = math.sqrt(math.fsum(v * v for v in values)) or 1.0
        return [v / norm for v in values]


def _message_texts(messages: Any) -> list[tuple[str, str]]:
    """``(role, text)`` of each message; text parts of list contents are joined."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    texts = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest("each message must be an object with a role")
        texts.append((message["role"], _content_text(message.get("content"))))
    return texts


def _content_text(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "\n".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    raise BadRequest("message content must be a string or a list of parts")


def _last_user_text(texts: list[tuple[str, str]]) -> str:
    for role, text in reversed(texts):
        if role == "user":
            return text
    raise BadRequest("messages hold no user message")


def _batch_of(prompt: str) -> list[tuple[Any, str]] | None:
    """The ``(index, prompt)`` entries of a batch prompt, or ``None`` for a single prompt."""
    if not prompt.lstrip().startswith("{"):
        return None
    try:
        document = orjson.loads(prompt)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict) or "batch" not in document:
        return None
    entries = document["batch"]
    if not isinstance(entries, list) or not entries:
        raise BadRequest("batch must be a non-empty list")
    batch = []
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict) or "prompt" not in entry:
            raise BadRequest(f"batch[{position}] must be an object with a prompt")
        text = entry["prompt"]
        if not isinstance(text, str):
            text = orjson.dumps(text, option=orjson.OPT_SORT_KEYS).decode()
        batch.append((entry.get("index", position), text))
    return batch


def _disorder(
    answers: list[dict[str, Any]], disorder: BatchDisorder
) -> tuple[list[dict[str, Any]], tuple[Fault, ...]]:
    """``answers`` with the drawn batch faults applied, and the faults that took effect."""
    faults = []
    if disorder.shuffle and len(answers) > 1:
        order = list(range(len(answers)))
        random.Random(disorder.seed).shuffle(order)
        if order == sorted(order):  # a shuffle that left every answer in place
            order = order[1:] + order[:1]
        answers = [answers[i] for i in order]
        faults.append(Fault.SHUFFLED_ANSWERS)
    if disorder.wrong_count:
        answers = answers[:-1] if len(answers) > 1 else [*answers, dict(answers[0])]
        faults.append(Fault.WRONG_ANSWER_COUNT)
    return answers, tuple(faults)


def _embedding_inputs(value: Any) -> list[str]:
    """The texts to embed; token-id lists are embedded as their JSON text."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise BadRequest("input must be a string or a non-empty list")
    if all(isinstance(item, int) for item in value):
        return [orjson.dumps(value).decode()]
    texts = []
    for item in value:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, list) and all(isinstance(i, int) for i in item):
            texts.append(orjson.dumps(item).decode())
        else:
            raise BadRequest("input items must be strings or lists of token ids")
    return texts


def _base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
