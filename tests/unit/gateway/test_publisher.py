"""The breaker, the spool fallback and the drainer (G6, G7), with an in-memory Kafka."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.breaker import Breaker, BreakerState
from gateway.config import GatewaySettings
from gateway.metrics import GatewayMetrics
from gateway.publisher import Delivery, Publisher, Unavailable
from gateway.spool import Spool, SpoolRecord

from .fakes import MemoryBatch, MemoryKafka


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_g7_breaker_opens_on_failure_and_allows_one_trial_after_cooldown() -> None:
    clock = Clock()
    changes: list[BreakerState] = []
    breaker = Breaker(cooldown=1.0, max_cooldown=4.0, clock=clock, on_change=changes.append)
    assert breaker.closed
    breaker.failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.try_trial()
    clock.now += 1.0
    assert breaker.try_trial()
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.try_trial()
    breaker.failure()  # failed trial: cooldown doubles
    clock.now += 1.5
    assert not breaker.try_trial()
    clock.now += 0.5
    assert breaker.try_trial()
    breaker.success()
    assert breaker.closed
    assert changes == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]


def test_g7_breaker_cooldown_is_capped() -> None:
    clock = Clock()
    breaker = Breaker(cooldown=1.0, max_cooldown=3.0, clock=clock)
    breaker.failure()
    for _ in range(5):
        clock.now += 100
        assert breaker.try_trial()
        breaker.failure()
    assert breaker.seconds_until_trial() == 3.0


def settings(tmp_path: Path, **overrides: object) -> GatewaySettings:
    values: dict[str, object] = {
        "env": "test",
        "app_key": "key",
        "app_secret": "secret-123",
        "gateway_spool_dir": tmp_path / "spool",
        "gateway_publish_budget_seconds": 0.3,
        "gateway_breaker_cooldown_seconds": 0.05,
        "gateway_breaker_max_cooldown_seconds": 0.2,
        "gateway_spool_max_bytes": 64 * 1024,
        "gateway_spool_segment_bytes": 4096,
        "gateway_spool_drain_batch": 7,
    }
    values.update(overrides)
    return GatewaySettings(**values)  # type: ignore[arg-type]


def make_publisher(s: GatewaySettings, kafka: MemoryKafka, *, spool: bool = True) -> Publisher:
    store = Spool(
        s.gateway_spool_dir,
        max_bytes=s.gateway_spool_max_bytes,
        segment_bytes=s.gateway_spool_segment_bytes,
        clock_ms=lambda: int(time.time() * 1000),
    )
    return Publisher(
        s,
        GatewayMetrics(process_metrics=False),
        producer_factory=kafka.producer,
        spool=store if spool else None,
    )


RAW = GatewaySettings.model_fields["topic_raw"].default


def records(n: int, start: int = 0) -> list[SpoolRecord]:
    return [SpoolRecord(RAW, f"u{i}".encode(), f"{i}".encode()) for i in range(start, start + n)]


async def publish(publisher: Publisher, batch: list[SpoolRecord], *, budget: float) -> Delivery:
    """What the webhook does with a request's records: begin, wait for Kafka until the deadline, finish."""
    publication = publisher.begin(batch, deadline=time.monotonic() + budget)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(budget):
            await publication.acknowledged()
    return await publisher.finish(publication)


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_g6_publish_waits_for_acks(tmp_path: Path) -> None:
    kafka = MemoryKafka()
    publisher = make_publisher(settings(tmp_path), kafka)
    await publisher.start()
    try:
        assert await publish(publisher, records(3), budget=1.0) is Delivery.PUBLISHED
        assert sorted(v for _, v in kafka.topic(RAW)) == [b"0", b"1", b"2"]
        assert publisher.spool is not None and publisher.spool.records == 0
    finally:
        await publisher.stop(drain_seconds=0)


async def test_g7_unacknowledged_within_budget_goes_to_spool_then_drains(tmp_path: Path) -> None:
    kafka = MemoryKafka()
    publisher = make_publisher(settings(tmp_path), kafka)
    await publisher.start()
    try:
        kafka.set_up(False)
        started = time.monotonic()
        assert await publish(publisher, records(5), budget=0.3) is Delivery.SPOOLED
        assert time.monotonic() - started < 0.6
        assert publisher.breaker.state is BreakerState.OPEN
        # breaker open: no waiting on Kafka at all
        started = time.monotonic()
        assert await publish(publisher, records(5, 5), budget=0.3) is Delivery.SPOOLED
        assert time.monotonic() - started < 0.1
        assert publisher.spool is not None and publisher.spool.records == 10
        assert publisher.ready()
        kafka.set_up(True)
        await wait_for(lambda: publisher.spool is not None and publisher.spool.records == 0)
        await wait_for(lambda: publisher.breaker.closed)
        values = {v for _, v in kafka.topic(RAW)}
        assert values == {str(i).encode() for i in range(10)}
    finally:
        await publisher.stop(drain_seconds=0)


async def test_g7_spool_disabled_means_503(tmp_path: Path) -> None:
    kafka = MemoryKafka()
    publisher = make_publisher(settings(tmp_path), kafka, spool=False)
    await publisher.start()
    try:
        kafka.set_up(False)
        with pytest.raises(Unavailable):
            await publish(publisher, records(1), budget=0.3)
        assert not publisher.ready()
        kafka.set_up(True)
        await wait_for(lambda: publisher.breaker.seconds_until_trial() == 0)
        assert await publish(publisher, records(1), budget=0.5) is Delivery.PUBLISHED  # half-open trial
        assert publisher.breaker.closed
    finally:
        await publisher.stop(drain_seconds=0)


async def test_g7_spool_full_means_503_and_not_ready(tmp_path: Path) -> None:
    kafka = MemoryKafka(up=False)
    publisher = make_publisher(settings(tmp_path, gateway_spool_max_bytes=64 * 1024), kafka)
    await publisher.start()
    try:
        big = [SpoolRecord(RAW, b"k", b"x" * 1000)] * 50
        assert await publish(publisher, big, budget=0.3) is Delivery.SPOOLED
        with pytest.raises(Unavailable):
            await publish(publisher, big, budget=0.3)
        assert not publisher.ready()
    finally:
        await publisher.stop(drain_seconds=0)


async def test_g7_kafka_unreachable_at_start_spools_and_recovers(tmp_path: Path) -> None:
    kafka = MemoryKafka(start_fails=True)
    s = settings(tmp_path, gateway_breaker_max_cooldown_seconds=0.2)
    publisher = make_publisher(s, kafka)
    await publisher.start()
    try:
        assert publisher.ready()
        assert await publish(publisher, records(2), budget=0.3) is Delivery.SPOOLED
        kafka.start_fails = False
        await wait_for(lambda: publisher.spool is not None and publisher.spool.records == 0)
        assert len(kafka.topic(RAW)) == 2
    finally:
        await publisher.stop(drain_seconds=0)


async def test_g7_drain_is_oldest_first_and_does_not_resend_inflight_chunks(tmp_path: Path) -> None:
    kafka = MemoryKafka(up=False)
    publisher = make_publisher(settings(tmp_path, gateway_kafka_request_timeout_seconds=0.2), kafka)
    await publisher.start()
    try:
        for i in range(6):
            # Enough budget for the first request to hand its records to Kafka (then the breaker opens).
            await publish(publisher, records(5, i * 5), budget=0.3)
        # let several drain attempts time out while Kafka is down
        registry = publisher._metrics.registry
        labels = {"source": "spool", "kind": "timeout"}
        await wait_for(
            lambda: (
                (registry.get_sample_value("presence_gateway_kafka_publish_failures_total", labels) or 0) >= 3
            )
        )
        kafka.set_up(True)
        await wait_for(lambda: publisher.spool is not None and publisher.spool.records == 0, 15)
        values = [int(v) for _, v in kafka.topic(RAW)]
        assert sorted(set(values)) == list(range(30))
        # The first request's records were handed to the producer before its budget ran out, so they arrive
        # twice (live and from the spool); the drainer itself never re-sent a chunk still queued in the producer.
        assert sorted(values) == sorted([*range(30), *range(5)])
        # Oldest first within each partition (Kafka orders nothing across partitions).
        by_partition: dict[int, list[int]] = {}
        for (_, partition, _), value in zip(kafka.placed, values, strict=True):
            by_partition.setdefault(partition, []).append(value)
        for in_partition in by_partition.values():
            first_seen = sorted(set(in_partition), key=in_partition.index)
            assert first_seen == sorted(first_seen)
    finally:
        await publisher.stop(drain_seconds=0)


async def test_g7_spool_survives_restart_and_drains_on_next_start(tmp_path: Path) -> None:
    s = settings(tmp_path)
    down = MemoryKafka(up=False)
    first = make_publisher(s, down)
    await first.start()
    await publish(first, records(4), budget=0.05)
    await first.stop(drain_seconds=0.1)
    kafka = MemoryKafka()
    second = make_publisher(s, kafka)
    await second.start()
    try:
        await wait_for(lambda: len(kafka.topic(RAW)) == 4)
    finally:
        await second.stop(drain_seconds=0)


async def test_g7_stop_drains_within_grace(tmp_path: Path) -> None:
    kafka = MemoryKafka(up=False)
    publisher = make_publisher(settings(tmp_path), kafka)
    await publisher.start()
    await publish(publisher, records(20), budget=0.05)
    kafka.set_up(True)
    await publisher.stop(drain_seconds=5)
    assert publisher.spool is not None and publisher.spool.records == 0
    assert {int(v) for _, v in kafka.topic(RAW)} == set(range(20))
    assert not publisher.ready()


class RefusingProducer:
    """Kafka answering with an error for every record (e.g. a missing topic or an ACL)."""

    def __init__(self, *, raise_on_send: bool) -> None:
        self.raise_on_send = raise_on_send

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1}

    def create_batch(self) -> MemoryBatch:
        return MemoryBatch(capacity=100)

    async def send_batch(self, batch: MemoryBatch, topic: str, *, partition: int) -> asyncio.Future[Any]:
        if self.raise_on_send:
            raise RuntimeError("unexpected client failure")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.set_exception(OSError("refused"))
        return future


@pytest.mark.parametrize("raise_on_send", [False, True])
async def test_g7_refused_records_are_spooled_not_lost(tmp_path: Path, raise_on_send: bool) -> None:
    s = settings(tmp_path)
    store = Spool(
        s.gateway_spool_dir, max_bytes=s.gateway_spool_max_bytes, segment_bytes=4096, clock_ms=lambda: 0
    )
    publisher = Publisher(
        s,
        GatewayMetrics(process_metrics=False),
        producer_factory=lambda: RefusingProducer(raise_on_send=raise_on_send),
        spool=store,
    )
    await publisher.start()
    try:
        assert await publish(publisher, records(3), budget=0.3) is Delivery.SPOOLED
        assert store.records == 3
        assert publisher.breaker.state is BreakerState.OPEN
    finally:
        await publisher.stop(drain_seconds=0)


async def test_g7_too_little_time_left_goes_to_the_spool_without_judging_kafka(tmp_path: Path) -> None:
    kafka = MemoryKafka()
    publisher = make_publisher(settings(tmp_path), kafka)
    await publisher.start()
    try:
        # Less than MIN_DIRECT_PUBLISH_SECONDS left of the request's budget: no time to wait for an ack.
        assert await publish(publisher, records(2), budget=0.1) is Delivery.SPOOLED
        assert publisher.breaker.closed
        assert kafka.batches_taken == 0
        await wait_for(lambda: len(kafka.topic(RAW)) == 2)  # the drainer publishes them
    finally:
        await publisher.stop(drain_seconds=0)
