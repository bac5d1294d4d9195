"""The mock LLM server's Batch API (files and batch jobs), over real HTTP with ``httpx``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

from plugins.llm import Fault, MockLlmServer, MockSettings, MockStats, settings_from_options

ENDED = {"completed", "failed", "expired", "cancelled"}
SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": ["bug", "other"]}, "score": {"type": "number"}},
    "required": ["label", "score"],
}


@asynccontextmanager
async def running(
    settings: MockSettings | None = None,
) -> AsyncIterator[tuple[MockLlmServer, httpx.AsyncClient]]:
    """A server and a client pointed at its ``base_url``."""
    async with (
        MockLlmServer(settings) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=5) as client,
    ):
        yield server, client


def chat_body(prompt: str, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": "Label it."}, {"role": "user", "content": prompt}]
    return {"model": "mock-model", "messages": messages, **extra}


BODIES = {
    "row-1": chat_body("printer broken"),
    "row-2": chat_body(
        "invoice wrong",
        response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}},
    ),
    "row-3": chat_body("hello", max_tokens=2),
}


def request_line(custom_id: str, body: Any, **override: Any) -> dict[str, Any]:
    line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
    return {**line, **override}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def batch_file(bodies: dict[str, Any] = BODIES) -> bytes:
    return jsonl([request_line(custom_id, body) for custom_id, body in bodies.items()])


async def upload(client: httpx.AsyncClient, content: bytes, purpose: str = "batch") -> str:
    response = await client.post(
        "/files",
        data={"purpose": purpose},
        files={"file": ("requests.jsonl", content, "application/jsonl")},
    )
    assert response.status_code == 200, response.text
    file_id: str = response.json()["id"]
    return file_id


async def create(client: httpx.AsyncClient, file_id: str, **extra: Any) -> dict[str, Any]:
    request = {"input_file_id": file_id, "endpoint": "/v1/chat/completions"}
    response = await client.post("/batches", json={**request, "completion_window": "24h", **extra})
    assert response.status_code == 200, response.text
    batch: dict[str, Any] = response.json()
    return batch


async def retrieve(client: httpx.AsyncClient, batch_id: str) -> dict[str, Any]:
    response = await client.get(f"/batches/{batch_id}")
    assert response.status_code == 200, response.text
    batch: dict[str, Any] = response.json()
    return batch


async def until_ended(client: httpx.AsyncClient, batch_id: str) -> tuple[dict[str, Any], list[str]]:
    """The ended batch and every status seen on the way (no repeats)."""
    seen: list[str] = []
    while True:
        batch = await retrieve(client, batch_id)
        if not seen or seen[-1] != batch["status"]:
            seen.append(batch["status"])
        if batch["status"] in ENDED:
            return batch, seen
        await anyio.sleep(0.02)


async def run_job(
    client: httpx.AsyncClient, content: bytes = b""
) -> tuple[dict[str, Any], list[str]]:
    """Upload ``content`` (the default file if empty), create a job and wait for its end."""
    batch = await create(client, await upload(client, content or batch_file()))
    assert batch["status"] == "validating"
    return await until_ended(client, batch["id"])


async def file_lines(client: httpx.AsyncClient, file_id: str | None) -> dict[str, dict[str, Any]]:
    """The lines of a result file by custom_id."""
    assert file_id is not None
    response = await client.get(f"/files/{file_id}/content")
    assert response.status_code == 200, response.text
    lines = [json.loads(line) for line in response.content.splitlines()]
    assert all(line.keys() == {"id", "custom_id", "response", "error"} for line in lines)
    return {line["custom_id"]: line for line in lines}


def comparable(completion: dict[str, Any]) -> dict[str, Any]:
    """A chat completion without the fields that name the call (its id and time)."""
    return {k: v for k, v in completion.items() if k not in ("id", "created")}


# -- lifecycle --------------------------------------------------------------------------------


async def test_a_job_answers_each_line_as_the_online_route_answers_its_body() -> None:
    async with running(MockSettings(seed=4, batch_delay_seconds=0.2)) as (_, client):
        batch, seen = await run_job(client)
        output = await file_lines(client, batch["output_file_id"])
        online = {
            custom_id: (await client.post("/chat/completions", json=body)).json()
            for custom_id, body in BODIES.items()
        }
    assert seen in (["in_progress", "completed"], ["completed"])
    assert batch["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert (batch["error_file_id"], batch["errors"]) == (None, None)
    assert batch["created_at"] == batch["in_progress_at"] <= batch["completed_at"]
    assert batch["object"] == "batch"
    assert output.keys() == BODIES.keys()
    for custom_id, line in output.items():
        assert line["id"].startswith("batch_req_")
        assert line["error"] is None
        assert line["response"]["status_code"] == 200
        assert line["response"]["request_id"]
        assert comparable(line["response"]["body"]) == comparable(online[custom_id])


async def test_a_job_waits_for_its_delay_in_progress() -> None:
    async with running(MockSettings(batch_delay_seconds=3600)) as (_, client):
        batch = await create(client, await upload(client, batch_file()), metadata={"run": "r1"})
        now = await retrieve(client, batch["id"])
    assert now["status"] == "in_progress"
    assert now["request_counts"] == {"total": 3, "completed": 0, "failed": 0}
    assert (now["output_file_id"], now["completed_at"]) == (None, None)
    assert now["metadata"] == {"run": "r1"}
    assert now["expires_at"] == now["created_at"] + 24 * 3600


async def test_the_file_object_describes_the_upload() -> None:
    content = batch_file()
    async with running() as (_, client):
        response = await client.post(
            "/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", content)}
        )
        stored = await client.get(f"/files/{response.json()['id']}/content")
    document = response.json()
    assert document["id"].startswith("file-")
    assert document["object"] == "file"
    assert (document["bytes"], document["filename"], document["purpose"]) == (
        len(content),
        "in.jsonl",
        "batch",
    )
    assert isinstance(document["created_at"], int)
    assert stored.content == content


async def test_failing_requests_go_to_the_error_file() -> None:
    settings = MockSettings(batch_failure_rate=1.0)
    async with running(settings) as (_, client):
        batch, _ = await run_job(client)
        errors = await file_lines(client, batch["error_file_id"])
        online = await client.post("/chat/completions", json=BODIES["row-1"])
    assert batch["status"] == "completed"
    assert batch["output_file_id"] is None
    assert batch["request_counts"] == {"total": 3, "completed": 0, "failed": 3}
    assert errors.keys() == BODIES.keys()
    for line in errors.values():
        assert line["error"] is None
        assert line["response"]["status_code"] == 500
        assert line["response"]["body"]["error"]["type"] == "server_error"
    assert online.status_code == 200


async def test_a_bad_body_is_a_400_in_the_error_file_and_the_rest_succeed() -> None:
    bodies = {"good": chat_body("fine"), "bad": {"model": "m", "messages": []}}
    async with running() as (_, client):
        batch, _ = await run_job(client, batch_file(bodies))
        output = await file_lines(client, batch["output_file_id"])
        errors = await file_lines(client, batch["error_file_id"])
    assert batch["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    assert output.keys() == {"good"}
    assert errors["bad"]["response"]["status_code"] == 400
    assert errors["bad"]["response"]["body"]["error"]["message"]


async def test_failures_are_drawn_from_the_seed_and_the_line() -> None:
    bodies = {f"row-{i}": chat_body(f"ticket {i}") for i in range(40)}
    reversed_bodies = dict(reversed(bodies.items()))

    async def failed(content: bytes) -> set[str]:
        async with running(MockSettings(seed=5, batch_failure_rate=0.5)) as (_, client):
            batch, _ = await run_job(client, content)
            return set(await file_lines(client, batch["error_file_id"]))

    in_order = await failed(batch_file(bodies))
    assert 5 <= len(in_order) <= 35
    assert await failed(batch_file(reversed_bodies)) == in_order


async def test_the_first_jobs_expire_and_a_retried_job_completes() -> None:
    async with running(MockSettings(batch_expire_jobs=1, batch_delay_seconds=0.1)) as (_, client):
        expired, _ = await run_job(client)
        errors = await file_lines(client, expired["error_file_id"])
        retried, _ = await run_job(client)
    assert expired["status"] == "expired"
    assert expired["expired_at"] is not None
    assert expired["output_file_id"] is None
    assert expired["request_counts"] == {"total": 3, "completed": 0, "failed": 3}
    assert errors.keys() == BODIES.keys()
    for line in errors.values():
        assert line["response"] is None
        assert line["error"]["code"] == "batch_expired"
        assert line["error"]["message"]
    assert retried["status"] == "completed"
    assert retried["request_counts"]["completed"] == 3


GOOD = request_line("a", chat_body("x"))


@pytest.mark.parametrize(
    ("bad_line", "code"),
    [
        (b"{not json", "invalid_json_line"),
        (b"[1, 2]", "invalid_json_line"),
        (json.dumps(request_line("", chat_body("x"))).encode(), "invalid_custom_id"),
        (json.dumps({**GOOD, "custom_id": 7}).encode(), "invalid_custom_id"),
        (json.dumps(GOOD).encode(), "duplicate_custom_id"),
        (json.dumps(request_line("b", chat_body("x"), method="GET")).encode(), "invalid_method"),
        (
            json.dumps(request_line("b", chat_body("x"), url="/v1/embeddings")).encode(),
            "invalid_url",
        ),
        (json.dumps(request_line("b", "not an object")).encode(), "invalid_body"),
    ],
)
async def test_an_invalid_input_file_fails_the_job_naming_the_line(
    bad_line: bytes, code: str
) -> None:
    content = json.dumps(GOOD).encode() + b"\n\n" + bad_line + b"\n"
    async with running() as (_, client):
        batch, seen = await run_job(client, content)
    assert seen == ["failed"]
    assert batch["failed_at"] is not None
    assert batch["output_file_id"] is batch["error_file_id"] is None
    [error] = batch["errors"]["data"]
    assert (error["code"], error["line"]) == (code, 3)
    assert error["message"]


async def test_an_empty_input_file_fails_the_job() -> None:
    async with running() as (_, client):
        batch = await create(client, await upload(client, b"\n"))
        batch, _ = await until_ended(client, batch["id"])
    assert batch["status"] == "failed"
    assert batch["errors"]["data"][0]["code"] == "empty_file"


async def test_a_cancelled_job_is_cancelling_then_cancelled() -> None:
    async with running(MockSettings(batch_delay_seconds=3600)) as (_, client):
        batch = await create(client, await upload(client, batch_file()))
        cancelling = await client.post(f"/batches/{batch['id']}/cancel")
        cancelled = await retrieve(client, batch["id"])
        again = await client.post(f"/batches/{batch['id']}/cancel")
    assert cancelling.json()["status"] == "cancelling"
    assert cancelling.json()["cancelling_at"] is not None
    assert cancelled["status"] == "cancelled"
    assert cancelled["cancelled_at"] is not None
    assert cancelled["output_file_id"] is cancelled["error_file_id"] is None
    assert again.json() == cancelled


async def test_cancelling_an_ended_job_leaves_it_as_it_is() -> None:
    async with running() as (_, client):
        batch, _ = await run_job(client)
        response = await client.post(f"/batches/{batch['id']}/cancel")
    assert response.status_code == 200
    assert response.json() == batch


# -- refusals ---------------------------------------------------------------------------------


async def test_unknown_files_and_batches_are_404s() -> None:
    async with running() as (_, client):
        responses = [
            await client.get("/files/file-nope/content"),
            await client.get("/batches/batch_nope"),
            await client.post("/batches/batch_nope/cancel"),
            await client.post(
                "/batches",
                json={
                    "input_file_id": "file-nope",
                    "endpoint": "/v1/chat/completions",
                    "completion_window": "24h",
                },
            ),
        ]
    assert [r.status_code for r in responses] == [404] * 4
    assert all(r.json()["error"]["message"] for r in responses)


async def test_malformed_uploads_are_400s() -> None:
    async with running() as (server, client):
        responses = [
            await client.post("/files", data={"purpose": "fine-tune"}, files={"file": b"{}"}),
            await client.post("/files", data={"purpose": "batch"}),
            await client.post("/files", files={"file": b"{}"}),
            await client.post("/files", json={"purpose": "batch"}),
            await client.post(
                "/files",
                content=b"not multipart",
                headers={"Content-Type": "multipart/form-data; boundary=xyz"},
            ),
        ]
        files_uploaded = server.statistics().files_uploaded
    assert [r.status_code for r in responses] == [400] * len(responses)
    assert all(r.json()["error"]["message"] for r in responses)
    assert files_uploaded == 0


@pytest.mark.parametrize(
    "change",
    [
        {"endpoint": "/v1/embeddings"},
        {"completion_window": "1h"},
        {"input_file_id": None},
        {"metadata": {"n": 1}},
    ],
)
async def test_a_malformed_batch_request_is_a_400(change: dict[str, Any]) -> None:
    async with running() as (server, client):
        request = {
            "input_file_id": await upload(client, batch_file()),
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            **change,
        }
        response = await client.post("/batches", json=request)
        not_json = await client.post("/batches", content=b"{")
        created = server.statistics().batches_created
    assert (response.status_code, not_json.status_code) == (400, 400)
    assert response.json()["error"]["message"]
    assert created == 0


async def test_an_output_file_cannot_be_the_input_of_a_job() -> None:
    async with running() as (_, client):
        batch, _ = await run_job(client)
        response = await client.post(
            "/batches",
            json={
                "input_file_id": batch["output_file_id"],
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
        )
    assert response.status_code == 400


async def test_the_batch_api_needs_the_configured_key() -> None:
    async with running(MockSettings(api_key="sk-secret")) as (server, keyless):
        refused = [
            await keyless.post("/files", data={"purpose": "batch"}, files={"file": b"{}"}),
            await keyless.get("/files/file-x/content"),
            await keyless.post("/batches", json={}),
            await keyless.get("/batches/batch_x"),
            await keyless.post("/batches/batch_x/cancel"),
        ]
        keyless.headers["Authorization"] = "Bearer sk-secret"
        batch, _ = await run_job(keyless)
        counted = server.statistics().requests_by_path["/v1/files"]
    assert [r.status_code for r in refused] == [401] * 5
    assert all("sk-" not in r.text for r in refused)
    assert batch["status"] == "completed"
    assert counted == 2


async def test_request_faults_and_latency_leave_the_batch_api_alone() -> None:
    async with running(MockSettings(faults={Fault.SERVER_ERROR: 1.0})) as (server, client):
        batch, _ = await run_job(client)
        online = await client.post("/chat/completions", json=BODIES["row-1"])
        stats = server.statistics()
    assert batch["request_counts"]["completed"] == 3
    assert online.status_code == 500
    assert stats.faults_injected == {Fault.SERVER_ERROR: 1}


async def test_routes_take_one_method() -> None:
    async with running() as (server, client):
        statuses = [
            (await client.get("/files")).status_code,
            (await client.post("/files/file-x/content")).status_code,
            (await client.put("/batches")).status_code,
            (await client.get("/batches/batch_x/cancel")).status_code,
            (await client.post("/batches/batch_x/other")).status_code,
        ]
        assert server.statistics().requests == 0
    assert statuses == [405, 405, 405, 405, 404]


# -- statistics and settings ------------------------------------------------------------------


async def test_stats_count_uploads_jobs_and_answers() -> None:
    async with running(MockSettings(batch_delay_seconds=3600)) as (server, client):
        file_id = await upload(client, batch_file())
        waiting = await create(client, file_id)
        before = MockStats.from_json((await client.get(server.origin + "/stats")).json())
        assert before == server.statistics()
        assert before.batch_jobs == {"in_progress": 1}
        assert (before.batches_created, before.files_uploaded) == (1, 1)
        await client.post(f"/batches/{waiting['id']}/cancel")
        assert server.statistics().batch_jobs == {"cancelled": 1}
        reset = (await client.post(server.origin + "/stats/reset")).json()
    assert reset["batches_created"] == reset["files_uploaded"] == 0
    assert reset["batch_jobs"] == {"cancelled": 1}  # jobs held, like requests in flight

    async with running() as (server, client):
        await run_job(client)
        await run_job(client, batch_file({"bad": {"model": "m"}, "good": chat_body("z")}))
        stats = server.statistics()
    assert stats.batch_jobs == {"completed": 2}
    assert (stats.batches_created, stats.files_uploaded, stats.batch_requests_answered) == (2, 2, 4)
    assert stats.requests_by_path["/v1/files"] == 2
    assert stats.requests_by_path["/v1/batches"] == 2
    assert stats.prompts_answered == 4


def test_older_stats_documents_still_read() -> None:
    document = MockStats.from_json(
        {
            "requests": 0,
            "requests_by_path": {},
            "responses_by_status": {},
            "in_flight": 0,
            "max_in_flight": 0,
            "faults_injected": {},
            "batch_requests": 0,
            "batch_rows": 0,
            "batch_jobs": {},
        }
    )
    assert (document.batches_created, document.batch_requests_answered) == (0, 0)


def test_batch_settings_refuse_impossible_values() -> None:
    with pytest.raises(ValueError, match="batch_delay_seconds"):
        MockSettings(batch_delay_seconds=-1)
    with pytest.raises(ValueError, match="batch_failure_rate"):
        MockSettings(batch_failure_rate=1.5)
    with pytest.raises(ValueError, match="batch_expire_jobs"):
        MockSettings(batch_expire_jobs=-1)
    assert settings_from_options(batch_delay_seconds=2.5).batch_delay_seconds == 2.5


async def test_jobs_are_listed_newest_first_a_page_at_a_time() -> None:
    async with running() as (_, client):
        file_id = await upload(client, batch_file())
        made = [(await create(client, file_id, metadata={"n": str(i)}))["id"] for i in range(5)]
        first = (await client.get("/batches", params={"limit": 2})).json()
        assert [job["id"] for job in first["data"]] == made[:-3:-1]
        assert (first["first_id"], first["last_id"], first["has_more"]) == (
            made[4],
            made[3],
            True,
        )
        rest = (await client.get("/batches", params={"limit": 10, "after": made[3]})).json()
        assert [job["id"] for job in rest["data"]] == made[2::-1]
        assert rest["has_more"] is False
        assert rest["data"][0]["metadata"] == {"n": "2"}
        for params in ({"limit": 0}, {"limit": "x"}, {"after": "batch_nope"}):
            refused = await client.get("/batches", params=params)
            assert refused.status_code == 400, params
