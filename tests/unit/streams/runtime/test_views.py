"""The query API on the worker's real Faust web app (aiohttp, in process), no broker: answers and request metrics.

Partition ownership needs a running consumer group, so the owner lookups here either find no assignment (503,
as during a rebalance) or are skipped the way a forwarded request skips them (``X-Presence-Routed``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from streams.config import WorkerSettings
from streams.metrics import QUERY_ROUTES
from streams.processor import state_of
from streams.runtime.app import Worker, create_app
from streams.runtime.views import ROUTED_HEADER

AT = 1_700_000_000_000
ROUTED = {ROUTED_HEADER: "1"}


def online(userid: str) -> bytes:
    return orjson.dumps({"schema": 1, "userid": userid, "status": 0, "time": AT, "sessionId": "s1", "os": "iOS",
                         "clientIp": "1.2.3.4:5", "received_at": AT, "delivery_id": "d"})  # fmt: skip


async def serve(worker: Worker) -> TestClient:
    client = TestClient(TestServer(worker.app.web.web_app))
    await client.start_server()
    return client


@pytest.fixture
async def client(worker: Worker) -> AsyncIterator[TestClient]:
    worker.table.partition = 1
    worker.processor.on_raw(1, 0, b"u1", online("u1"), now_ms=AT + 5)
    served = await serve(worker)
    yield served
    await served.close()


def requests(worker: Worker, route: str, status: int) -> float:
    sample = worker.metrics.registry.get_sample_value(
        "presence_worker_query_requests_total", {"route": route, "status": str(status)}
    )
    return sample or 0.0


async def test_q1_answers_from_the_table_and_counts_by_route_template(
    worker: Worker, client: TestClient
) -> None:
    answer = await client.get("/presence/u1", headers=ROUTED)
    assert answer.status == 200
    assert await answer.json() == state_of(worker.table, "u1", True)
    missing = await client.get("/presence/nobody", headers=ROUTED)
    assert missing.status == 404
    assert requests(worker, "/presence/{userid}", 200) == 1
    assert requests(worker, "/presence/{userid}", 404) == 1
    count = worker.metrics.registry.get_sample_value(
        "presence_worker_query_request_duration_seconds_count", {"route": "/presence/{userid}"}
    )
    assert count == 2


async def test_without_an_assignment_queries_are_503_not_guesses(worker: Worker, client: TestClient) -> None:
    assert (await client.get("/presence/u1")).status == 503
    assert (await client.post("/presence:batch", json={"userids": ["u1"]})).status == 503
    assert requests(worker, "/presence/{userid}", 503) == 1
    assert requests(worker, "/presence:batch", 503) == 1


async def test_q2_batch_answers_and_refuses_bad_bodies(worker: Worker, client: TestClient) -> None:
    answer = await client.post("/presence:batch", json={"userids": ["u1", "nobody"]}, headers=ROUTED)
    assert answer.status == 200
    assert await answer.json() == {"records": {"u1": state_of(worker.table, "u1", True)}}
    assert (await client.post("/presence:batch", data=b"{nope", headers=ROUTED)).status == 400
    assert (await client.post("/presence:batch", json={"userids": [""]}, headers=ROUTED)).status == 400
    too_many = {"userids": [f"u{i}" for i in range(1001)]}
    assert (await client.post("/presence:batch", json=too_many, headers=ROUTED)).status == 413
    assert requests(worker, "/presence:batch", 200) == 1
    assert requests(worker, "/presence:batch", 400) == 2
    assert requests(worker, "/presence:batch", 413) == 1


async def test_probes_and_metrics(worker: Worker, client: TestClient) -> None:
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 503, (
        "not ready before partitions are assigned and recovered"
    )
    worker.progress.mark_ready()
    assert (await client.get("/readyz")).status == 200
    exposition = await (await client.get("/metrics")).text()
    assert 'presence_worker_query_requests_total{route="/readyz",status="503"} 1.0' in exposition
    for route in QUERY_ROUTES:
        assert f'presence_worker_query_request_duration_seconds_count{{route="{route}"}}' in exposition


async def test_q3_a_token_protects_the_queries(tmp_path: Path) -> None:
    settings = WorkerSettings(
        kafka_bootstrap_servers="127.0.0.1:9", worker_data_dir=tmp_path, worker_query_token="s3cret"
    )
    worker = create_app(settings)
    client = await serve(worker)
    try:
        assert (await client.get("/presence/u1", headers=ROUTED)).status == 401
        authorized = {**ROUTED, "Authorization": "Bearer s3cret"}
        assert (await client.get("/presence/u1", headers=authorized)).status == 404
        assert (await client.post("/presence:batch", json={"userids": ["u1"]}, headers=ROUTED)).status == 401
        assert requests(worker, "/presence/{userid}", 401) == 1
    finally:
        await client.close()


async def test_a_handler_failure_is_counted_as_500(worker: Worker, client: TestClient) -> None:
    def broken(key: str, default: object = None) -> object:
        raise RuntimeError("store failure")

    worker.table.get = broken  # type: ignore[method-assign]
    assert (await client.get("/presence/u1", headers=ROUTED)).status == 500
    assert requests(worker, "/presence/{userid}", 500) == 1
