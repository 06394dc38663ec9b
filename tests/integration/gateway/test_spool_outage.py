"""Kafka outages (G7): requests keep getting 200 through the spool, and every event reaches Kafka afterwards."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from gateway.config import GatewaySettings

from .conftest import GatewayServer, consume, event, signed_query, wait_until

StartGateway = Callable[[GatewaySettings], GatewayServer]


def keys(records: list[tuple[bytes | None, dict[str, Any], dict[str, Any]]]) -> set[tuple[str, str]]:
    return {(value["userid"], value["sessionId"]) for _, value, _ in records}


async def post_batches(
    client: httpx.AsyncClient, server: GatewayServer, label: str, requests: int, per_request: int
) -> tuple[set[tuple[str, str]], list[float]]:
    sent: set[tuple[str, str]] = set()
    latencies: list[float] = []
    for r in range(requests):
        events = [event(f"{label}-u{r}-{i}", f"{label}-s{r}-{i}") for i in range(per_request)]
        started = time.monotonic()
        response = await client.post(f"{server.webhook}?{signed_query(nonce=f'{label}-{r}')}", json=events)
        latencies.append(time.monotonic() - started)
        assert response.status_code == 200, response.text
        assert response.json() == {"accepted": per_request, "rejected": 0}
        sent |= {(e["userid"], e["sessionId"]) for e in events}
    return sent, latencies


async def test_g7_broker_stopped_mid_test_then_restarted_every_event_arrives(
    kafka_broker: Any,
    gateway_settings: Callable[..., GatewaySettings],
    start_gateway: StartGateway,
) -> None:
    if not kafka_broker.restartable:
        pytest.skip("needs the session's own broker (PRESENCE_TEST_KAFKA is set)")
    settings = gateway_settings(gateway_publish_budget_seconds=2.0)
    first = start_gateway(settings)
    sent: set[tuple[str, str]] = set()
    async with httpx.AsyncClient(timeout=10) as client:
        before, _ = await post_batches(client, first, "before", requests=5, per_request=10)
        sent |= before

        await asyncio.to_thread(kafka_broker.stop)
        try:
            during, latencies = await post_batches(client, first, "during", requests=30, per_request=10)
            sent |= during
            # Inside RongCloud's 5 s always; once the breaker is open, no waiting on Kafka at all.
            assert max(latencies) < 4.5
            assert sorted(latencies)[len(latencies) // 2] < 0.5
            spool = first.gateway.publisher.spool
            assert spool is not None and spool.records >= 250
            assert (await client.get(f"{first.url}/readyz")).status_code == 200

            # The spool survives a gateway restart while Kafka is still down.
            first.stop()
            second = start_gateway(settings)
            restarted, _ = await post_batches(client, second, "restarted", requests=5, per_request=10)
            sent |= restarted
            spool = second.gateway.publisher.spool
            assert spool is not None and spool.records >= 300
        finally:
            await asyncio.to_thread(kafka_broker.start)

        await wait_until(lambda: spool.records == 0, timeout=90, what="spool drained")
        await wait_until(lambda: second.gateway.publisher.breaker.closed, timeout=30, what="breaker closed")
        after, _ = await post_batches(client, second, "after", requests=3, per_request=10)
        sent |= after
        registry = second.gateway.metrics.registry
        assert registry.get_sample_value("presence_gateway_requests_total", {"outcome": "published"}) >= 1

    assert len(sent) == 430
    raw = await consume(settings, settings.topic_raw, lambda rs: keys(rs) >= sent, timeout=90)
    assert keys(raw) == sent, "every accepted event is on the topic, and nothing else"
    # at least once: duplicates allowed (the stream drops them), but bounded by the events that were in flight
    assert len(raw) - len(sent) <= 200
    sys.stderr.write(
        f"\nspool outage: {len(sent)} events sent, {len(raw)} records on RAW ({len(raw) - len(sent)} duplicates)"
        + "\n"
    )


async def test_g7_spool_full_answers_503_and_readyz_fails(
    kafka_broker: Any,
    gateway_settings: Callable[..., GatewaySettings],
    start_gateway: StartGateway,
) -> None:
    if not kafka_broker.restartable:
        pytest.skip("needs the session's own broker (PRESENCE_TEST_KAFKA is set)")
    settings = gateway_settings(
        gateway_spool_max_bytes=64 * 1024,
        gateway_spool_segment_bytes=16 * 1024,
        gateway_publish_budget_seconds=1.0,
    )
    server = start_gateway(settings)
    statuses: list[int] = []
    async with httpx.AsyncClient(timeout=10) as client:
        await asyncio.to_thread(kafka_broker.stop)
        try:
            for r in range(200):
                events = [event(f"full-u{r}-{i}", f"s{i}") for i in range(20)]
                response = await client.post(
                    f"{server.webhook}?{signed_query(nonce=f'full-{r}')}", json=events
                )
                statuses.append(response.status_code)
                if response.status_code == 503:
                    break
            assert statuses[-1] == 503
            assert set(statuses[:-1]) == {200}
            assert (await client.get(f"{server.url}/readyz")).status_code == 503
        finally:
            await asyncio.to_thread(kafka_broker.start)
        await wait_until(
            lambda: server.gateway.publisher.spool.records == 0, timeout=90, what="spool drained"
        )
        ready = await client.get(f"{server.url}/readyz")
        assert ready.status_code == 200
    accepted = (len(statuses) - 1) * 20
    raw = await consume(settings, settings.topic_raw, lambda rs: len(keys(rs)) >= accepted, timeout=60)
    assert len(keys(raw)) == accepted


async def test_g7_gateway_started_while_kafka_is_down_creates_topics_and_drains_later(
    kafka_broker: Any,
    gateway_settings: Callable[..., GatewaySettings],
    start_gateway: StartGateway,
) -> None:
    if not kafka_broker.restartable:
        pytest.skip("needs the session's own broker (PRESENCE_TEST_KAFKA is set)")
    settings = gateway_settings(gateway_publish_budget_seconds=1.0)
    await asyncio.to_thread(kafka_broker.stop)
    try:
        server = start_gateway(settings)
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await client.get(f"{server.url}/readyz")).status_code == 200
            sent, latencies = await post_batches(client, server, "cold", requests=5, per_request=4)
            assert max(latencies) < 1.0
    finally:
        await asyncio.to_thread(kafka_broker.start)
    spool = server.gateway.publisher.spool
    assert spool is not None
    await wait_until(lambda: spool.records == 0, timeout=90, what="spool drained")
    raw = await consume(settings, settings.topic_raw, lambda rs: keys(rs) >= sent)
    assert keys(raw) == sent
