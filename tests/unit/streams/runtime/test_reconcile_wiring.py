"""Reconciliation wired into the worker's real Faust app (no broker): the checker exists only when active, its
metrics are in the worker's registry, its budget follows the partitions owned, and ``POST /presence:reconcile``
queues on-demand checks behind the query token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from aiokafka.structs import TopicPartition

from streams.config import WorkerSettings
from streams.runtime.app import Worker, create_app
from streams.runtime.views import ROUTED_HEADER

ROUTED = {ROUTED_HEADER: "1"}


def settings_for(tmp_path: Path, **extra: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": "127.0.0.1:9",
        "worker_data_dir": tmp_path / "state",
        "worker_app_id": "unit-worker",
        "topic_partitions": 4,
        "app_key": "key",
        "app_secret": "secret",
        "reconcile_api_urls": "http://127.0.0.1:9",
        "reconcile_budget_per_second": 40,
        "reconcile_gap_cap": 100,
    }
    values.update(extra)
    return WorkerSettings(**values)


async def serve(worker: Worker) -> TestClient:
    client = TestClient(TestServer(worker.app.web.web_app))
    await client.start_server()
    return client


def sample(worker: Worker, name: str, labels: dict[str, str] | None = None) -> float | None:
    return worker.metrics.registry.get_sample_value(name, labels or {})


def test_reconciliation_is_wired_only_when_active(tmp_path: Path) -> None:
    worker = create_app(settings_for(tmp_path))
    assert worker.reconciler is not None
    # In the worker's own registry (scraped at /metrics), with no share before the first assignment.
    assert sample(worker, "presence_worker_reconcile_budget_per_second") == 0
    off = create_app(settings_for(tmp_path / "off", reconcile_enabled=False))
    assert off.reconciler is None
    assert sample(off, "presence_worker_reconcile_budget_per_second") is None


async def test_every_rebalance_resizes_the_budget_and_the_gap_cap_to_the_partitions_owned(
    tmp_path: Path,
) -> None:
    worker = create_app(settings_for(tmp_path))
    reconciler = worker.reconciler
    assert reconciler is not None
    app: Any = worker.app
    raw, ticks = worker.settings.topic_raw, worker.settings.ticks_topic
    assigned = {TopicPartition(raw, 0), TopicPartition(raw, 2), TopicPartition(ticks, 0)}
    await app.on_partitions_assigned.send(assigned=assigned)
    assert reconciler.client.budget.rate == 20  # 2 of 4 partitions of 40 per second
    assert reconciler.queue.gap_cap == 50
    assert sample(worker, "presence_worker_reconcile_budget_per_second") == 20
    await app.on_partitions_revoked.send(revoked=assigned)
    assert reconciler.client.budget.rate == 0
    await app.on_partitions_assigned.send(assigned={TopicPartition(raw, p) for p in range(4)})
    assert reconciler.client.budget.rate == 40
    assert reconciler.queue.gap_cap == 100


async def test_the_reconcile_endpoint_queues_on_demand_checks(tmp_path: Path) -> None:
    worker = create_app(settings_for(tmp_path))
    assert worker.reconciler is not None
    client = await serve(worker)
    try:
        answer = await client.post(
            "/presence:reconcile", json={"userids": ["u1", "u2", "u1"]}, headers=ROUTED
        )
        assert answer.status == 202
        assert await answer.json() == {"queued": {"u1": "queued", "u2": "queued"}}
        again = await client.post("/presence:reconcile", json={"userids": ["u1"]}, headers=ROUTED)
        assert await again.json() == {"queued": {"u1": "duplicate"}}
        assert "u1" in worker.reconciler.queue and "u2" in worker.reconciler.queue
        assert (await client.post("/presence:reconcile", data=b"{", headers=ROUTED)).status == 400
        too_many = {"userids": [f"u{n}" for n in range(1001)]}
        assert (await client.post("/presence:reconcile", json=too_many, headers=ROUTED)).status == 413
        # Without the routed header the owner is looked up: no assignment yet, so 503 as for queries.
        assert (await client.post("/presence:reconcile", json={"userids": ["u3"]})).status == 503
        assert "u3" not in worker.reconciler.queue
        offers = sample(
            worker,
            "presence_worker_reconcile_queue_offers_total",
            {"trigger": "on_demand", "result": "queued"},
        )
        assert offers == 2
        assert sample(worker, "presence_worker_query_requests_total",
                      {"route": "/presence:reconcile", "status": "202"}) == 2  # fmt: skip
    finally:
        await client.close()


async def test_the_reconcile_endpoint_needs_the_query_token_and_says_when_reconciliation_is_off(
    tmp_path: Path,
) -> None:
    worker = create_app(settings_for(tmp_path, worker_query_token="s3cret"))
    assert worker.reconciler is not None
    off = create_app(settings_for(tmp_path / "off", reconcile_enabled=False))
    client, off_client = await serve(worker), await serve(off)
    try:
        body = {"userids": ["u1"]}
        assert (await client.post("/presence:reconcile", json=body, headers=ROUTED)).status == 401
        assert "u1" not in worker.reconciler.queue
        authorized = {**ROUTED, "Authorization": "Bearer s3cret"}
        assert (await client.post("/presence:reconcile", json=body, headers=authorized)).status == 202
        refused = await off_client.post("/presence:reconcile", json=body, headers=ROUTED)
        assert refused.status == 409
        assert "reconciliation is off" in (await refused.json())["error"]
    finally:
        await client.close()
        await off_client.close()
