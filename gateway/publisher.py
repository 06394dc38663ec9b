"""Publishing to Kafka behind a circuit breaker, with the durable spool as the fallback (G6, G7).

A request's records go to Kafka directly while the breaker is closed; the request is answered once Kafka has
acknowledged all of them. If Kafka has not within the publish budget (or refuses), the records that are still
unacknowledged are appended to the spool, the breaker opens, and the request is answered as if published. While
the breaker is open, requests go straight to the spool without waiting on Kafka. One background task (the
drainer) republishes the spool oldest first; its first success closes the breaker again.

The producer is idempotent with ``acks=all`` and retries undelivered batches until they are delivered, so a
record that timed out may still reach Kafka later *and* be republished from the spool: delivery is at least
once, and the stream ignores the duplicate (rule S1).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from gateway.config import GatewaySettings
from gateway.metrics import BREAKER_STATES, GatewayMetrics
from gateway.spool import SegmentContents, Spool, SpoolFull, SpoolRecord

log = logging.getLogger(__name__)

# Room a request needs in the spool for the gateway to call itself ready.
READY_SPOOL_HEADROOM_BYTES = 256 * 1024
_RECREATE_AFTER_FAILURES = 5


class Producer(Protocol):
    """What the publisher needs of a Kafka producer (aiokafka's, or an in-memory one in unit tests)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def send(
        self, topic: str, value: bytes | None = None, key: bytes | None = None
    ) -> asyncio.Future[Any]: ...


ProducerFactory = Callable[[], Producer]


def kafka_producer_factory(settings: GatewaySettings) -> ProducerFactory:
    def create() -> Producer:
        producer: Producer = AIOKafkaProducer(
            client_id=f"{settings.kafka_client_id_prefix}-gateway",
            acks="all",
            enable_idempotence=True,
            linger_ms=settings.gateway_kafka_linger_ms,
            request_timeout_ms=int(settings.gateway_kafka_request_timeout_seconds * 1000),
            retry_backoff_ms=100,
            **settings.aiokafka_options(),
        )
        return producer

    return create


class Unavailable(Exception):
    """Kafka did not acknowledge and the spool cannot take the records (disabled, full or failing): 503."""


class Delivery(StrEnum):
    PUBLISHED = "published"
    SPOOLED = "spooled"


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Breaker:
    """Closed: publish to Kafka. Open: don't, until a cooldown has passed; then one trial (half-open) decides.

    The cooldown doubles after each failed trial, up to a maximum, and resets on success.
    """

    def __init__(
        self,
        *,
        cooldown: float,
        max_cooldown: float,
        clock: Callable[[], float],
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self._base_cooldown = cooldown
        self._max_cooldown = max_cooldown
        self._cooldown = cooldown
        self._clock = clock
        self._on_change = on_change
        self.state = BreakerState.CLOSED
        self._opened_at = 0.0
        self.consecutive_failures = 0

    def _set(self, state: BreakerState) -> None:
        if state is not self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(state)

    @property
    def closed(self) -> bool:
        return self.state is BreakerState.CLOSED

    def seconds_until_trial(self) -> float:
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self._cooldown - self._clock())

    def try_trial(self, *, force: bool = False) -> bool:
        """True (and half-open) if the cooldown is over (or ``force``) and no other trial is running."""
        if self.state is BreakerState.OPEN and (force or self.seconds_until_trial() <= 0):
            self._set(BreakerState.HALF_OPEN)
            return True
        return False

    def success(self) -> None:
        self.consecutive_failures = 0
        self._cooldown = self._base_cooldown
        self._set(BreakerState.CLOSED)

    def failure(self) -> None:
        self.consecutive_failures += 1
        if self.state is BreakerState.HALF_OPEN:
            self._cooldown = min(self._cooldown * 2, self._max_cooldown)
        self._opened_at = self._clock()
        self._set(BreakerState.OPEN)

    def force_open(self) -> None:
        """Open without counting a failure (no producer yet)."""
        self._opened_at = self._clock()
        self._set(BreakerState.OPEN)


@dataclass(slots=True)
class _SendResult:
    unacked: list[SpoolRecord]
    kind: str | None  # None on success, else "timeout" / "kafka_error" / "no_producer"


def _consume_exception(future: asyncio.Future[Any]) -> None:
    # Late failures of abandoned sends are expected (their records are in the spool); don't log them as
    # "exception was never retrieved".
    if not future.cancelled():
        future.exception()


def _sender_is_dead(producer: Producer) -> bool:
    # aiokafka's producer stops for good when its sender task dies (e.g. OutOfOrderSequenceNumber); it exposes
    # no public health check, so look at the task and tolerate its absence.
    sender = getattr(producer, "_sender", None)
    task = getattr(sender, "sender_task", None)
    return isinstance(task, asyncio.Task) and task.done()


class Publisher:
    """The one shared producer, its breaker, the spool and the drainer."""

    def __init__(
        self,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        *,
        producer_factory: ProducerFactory,
        spool: Spool | None,
        prepare: Callable[[], Awaitable[None]] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``prepare`` runs before the producer first connects, until it succeeds (e.g. creating topics)."""
        self._settings = settings
        self._metrics = metrics
        self._factory = producer_factory
        self._prepare = prepare
        self.spool = spool
        self._monotonic = monotonic
        self.breaker = Breaker(
            cooldown=settings.gateway_breaker_cooldown_seconds,
            max_cooldown=settings.gateway_breaker_max_cooldown_seconds,
            clock=monotonic,
            on_change=self._breaker_changed,
        )
        self._producer: Producer | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._draining_deadline: float | None = None
        self._spool_lock = asyncio.Lock()
        # The drainer's current chunk: records of the oldest segment sent but not yet known to be acknowledged.
        self._drain_segment: SegmentContents | None = None
        self._drain_done = 0
        self._drain_inflight: list[asyncio.Future[Any]] = []
        self._drain_inflight_producer: Producer | None = None
        if spool is not None:
            metrics.spool_max_bytes.set(spool.max_bytes)
            metrics.spool_bytes.set_function(lambda: spool.bytes)
            metrics.spool_records.set_function(lambda: spool.records)
            metrics.spool_oldest_age.set_function(lambda: spool.oldest_age_ms() / 1000)
        metrics.ready.set_function(lambda: 1.0 if self.ready() else 0.0)

    # -- lifecycle --------------------------------------------------------------------------------------------

    async def start(self, *, connect_timeout: float) -> None:
        """Open the spool and try to connect; an unreachable Kafka is retried in the background."""
        if self.spool is not None:
            await asyncio.to_thread(self.spool.open)
        self.breaker.force_open()
        await self._connect(connect_timeout)
        self._supervisor = asyncio.create_task(self._supervise(), name="gateway-publisher")

    async def stop(self, *, drain_seconds: float) -> None:
        """Drain the spool for up to ``drain_seconds`` (if Kafka is there), then close everything."""
        self._stopping = True
        self._draining_deadline = self._monotonic() + drain_seconds
        self._wake.set()
        if self._supervisor is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._supervisor), drain_seconds + 1.0)
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if self._producer is not None:
            await self._close_producer(self._producer, timeout=max(1.0, min(drain_seconds, 5.0)))
            self._producer = None
        if self.spool is not None:
            await asyncio.to_thread(self.spool.close)
            if self.spool.records:
                log.warning(
                    "stopping with records left in the spool; they are published after the next start",
                    extra={"records": self.spool.records, "bytes": self.spool.bytes},
                )

    @property
    def stopping(self) -> bool:
        return self._stopping

    def ready(self) -> bool:
        """Can accept a request now: Kafka is healthy, or the spool has room (G9)."""
        if self._stopping:
            return False
        if self.breaker.closed and self._producer is not None:
            return True
        if self.spool is None:
            return False
        return self.spool.has_room(min(READY_SPOOL_HEADROOM_BYTES, self.spool.max_bytes // 4))

    def _breaker_changed(self, state: BreakerState) -> None:
        for name in BREAKER_STATES:
            self._metrics.breaker_state.labels(name).set(1 if name == state.value else 0)
        self._metrics.breaker_transitions.labels(state.value).inc()
        level = logging.INFO if state is BreakerState.CLOSED else logging.WARNING
        log.log(level, "kafka circuit breaker changed", extra={"state": state.value})
        self._wake.set()

    async def _connect(self, timeout: float) -> bool:
        if self._prepare is not None:
            try:
                await asyncio.wait_for(self._prepare(), timeout * 3)
            except (KafkaError, OSError, TimeoutError) as exc:
                log.warning("kafka not ready for the producer yet", extra={"error": repr(exc)})
                return False
            self._prepare = None
        producer = self._factory()
        try:
            await asyncio.wait_for(producer.start(), timeout)
        except (KafkaError, OSError, TimeoutError) as exc:
            self._metrics.producer_restarts.labels("failed").inc()
            log.warning("kafka producer could not start; spooling until it can", extra={"error": repr(exc)})
            await self._close_producer(producer, timeout=1.0)
            return False
        self._metrics.producer_restarts.labels("started").inc()
        self._producer = producer
        self.breaker.success()
        return True

    async def _close_producer(self, producer: Producer, *, timeout: float) -> None:
        # stop() flushes, which waits for Kafka; the records it holds are in the spool already if unacknowledged.
        try:
            await asyncio.wait_for(producer.stop(), timeout)
        except (KafkaError, OSError, TimeoutError) as exc:
            log.info("kafka producer did not close cleanly", extra={"error": repr(exc)})
            sender = getattr(producer, "_sender", None)
            task = getattr(sender, "sender_task", None)
            if isinstance(task, asyncio.Task):
                task.cancel()
            client = getattr(producer, "client", None)
            close = getattr(client, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(close(), 1.0)

    # -- the request path -------------------------------------------------------------------------------------

    async def publish(self, records: Sequence[SpoolRecord], *, budget: float) -> Delivery:
        """Kafka-acknowledged or durably spooled when this returns; :class:`Unavailable` otherwise."""
        if not records:
            return Delivery.PUBLISHED
        if self._producer is not None and not self._stopping:
            spool_empty = self.spool is None or self.spool.records == 0
            if self.breaker.closed or (spool_empty and self.breaker.try_trial()):
                result = await self._send(list(records), timeout=budget, source="request")
                if result.kind is None:
                    return Delivery.PUBLISHED
                records = result.unacked
        await self._to_spool(records)
        return Delivery.SPOOLED

    async def publish_to_spool(self, records: Sequence[SpoolRecord]) -> Delivery:
        """Spool without trying Kafka (too little of the request's budget is left to wait for an ack)."""
        if not records:
            return Delivery.PUBLISHED
        await self._to_spool(records)
        return Delivery.SPOOLED

    async def _send(self, records: list[SpoolRecord], *, timeout: float, source: str) -> _SendResult:
        producer = self._producer
        if producer is None:
            return _SendResult(records, "no_producer")
        started = self._monotonic()
        futures: list[asyncio.Future[Any]] = []

        kind: str | None = None
        try:
            # One deadline over handing the records to the client and waiting for their acknowledgements
            # (a timeout context rather than wait_for: no extra task per request).
            async with asyncio.timeout(timeout):
                for record in records:
                    futures.append(await producer.send(record.topic, value=record.value, key=record.key))
                for future in futures:
                    # One at a time: the records of a request mostly share a batch, so after the first
                    # acknowledgement the rest are done too. asyncio.wait neither raises nor cancels the
                    # client's future on timeout.
                    if not future.done():
                        await asyncio.wait((future,))
        except TimeoutError:
            kind = "timeout"
        except Exception as exc:  # noqa: BLE001 - whatever the client raises, the records still go to the spool
            kind = "kafka_error"
            log.warning("kafka refused a publish", extra={"error": repr(exc), "source": source})

        for future in futures:
            if not future.done():
                future.add_done_callback(_consume_exception)
        unacked = [
            record
            for index, record in enumerate(records)
            if index >= len(futures)
            or not futures[index].done()
            or futures[index].cancelled()
            or futures[index].exception() is not None
        ]
        if kind is None and unacked:
            kind = "kafka_error"
            errors = [f.exception() for f in futures if f.done() and not f.cancelled() and f.exception()]
            log.warning("kafka refused a publish", extra={"error": repr(errors[:1]), "source": source})
        if kind is None:
            self._metrics.publish_duration.labels(source).observe(self._monotonic() - started)
            self.breaker.success()
        else:
            self._metrics.publish_failures.labels(source, kind).inc()
            self.breaker.failure()
        return _SendResult(unacked, kind)

    async def _to_spool(self, records: Sequence[SpoolRecord]) -> None:
        spool = self.spool
        if spool is None:
            raise Unavailable("kafka did not acknowledge and the spool is disabled")
        started = self._monotonic()
        try:
            # One writer at a time keeps appends in arrival order and the fsyncs from piling up on threads.
            async with self._spool_lock:
                await asyncio.to_thread(spool.append, records)
        except SpoolFull as exc:
            raise Unavailable(str(exc)) from exc
        except OSError as exc:
            log.error("spool append failed", extra={"error": repr(exc)})
            raise Unavailable(f"spool append failed: {exc!r}") from exc
        self._metrics.spool_append_duration.observe(self._monotonic() - started)
        self._metrics.spool_appended.inc(len(records))
        self._wake.set()

    # -- the drainer ------------------------------------------------------------------------------------------

    async def _supervise(self) -> None:
        while True:
            # Cleared before the step, so a wake-up during the step is not lost.
            self._wake.clear()
            try:
                delay = await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the drainer must outlive any one bad step
                log.exception("spool drainer step failed")
                if self.breaker.state is BreakerState.HALF_OPEN:
                    # A trial that died must still end, or no further trial would ever be allowed.
                    self.breaker.failure()
                delay = 1.0
            if self._stopping:
                spool_empty = self.spool is None or self.spool.records == 0
                past_deadline = (
                    self._draining_deadline is not None and self._monotonic() > self._draining_deadline
                )
                if spool_empty or past_deadline or self._producer is None:
                    return
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)

    async def _step(self) -> float:
        """One unit of background work; returns how long to wait before the next."""
        if self._producer is None:
            if self._stopping:
                return 0.0
            if not await self._connect(self._settings.gateway_publish_budget_seconds):
                self.breaker.force_open()
                return self._settings.gateway_breaker_max_cooldown_seconds / 4
            return 0.0
        if _sender_is_dead(self._producer) or (
            self.breaker.consecutive_failures >= _RECREATE_AFTER_FAILURES and not self.breaker.closed
        ):
            log.warning(
                "recreating the kafka producer", extra={"failures": self.breaker.consecutive_failures}
            )
            old, self._producer = self._producer, None
            self._drain_inflight = []
            self.breaker.force_open()
            self.breaker.consecutive_failures = 0
            await self._close_producer(old, timeout=1.0)
            return 0.0
        spool = self.spool
        if spool is None or (spool.records == 0 and self._drain_segment is None):
            return 5.0
        if not self.breaker.closed and not self.breaker.try_trial(force=self._stopping):
            return max(0.05, self.breaker.seconds_until_trial())
        if await self._drain_chunk(spool):
            return 0.0
        # Not stopping: the open breaker's cooldown paces the next attempt. Stopping: trials are forced, so pace.
        return 0.2 if self._stopping else 0.0

    async def _drain_chunk(self, spool: Spool) -> bool:
        if self._drain_segment is None:
            contents = await asyncio.to_thread(spool.oldest)
            if contents is None:
                self.breaker.success()
                return True
            self._drain_segment, self._drain_done, self._drain_inflight = contents, 0, []
        contents = self._drain_segment
        chunk = contents.records[
            self._drain_done : self._drain_done + self._settings.gateway_spool_drain_batch
        ]
        # A drain attempt doubles as the breaker's trial; give Kafka longer than a request gets, but not forever.
        timeout = max(
            self._settings.gateway_publish_budget_seconds,
            min(10.0, self._settings.gateway_kafka_request_timeout_seconds),
        )
        if self._drain_inflight and self._drain_inflight_producer is self._producer:
            # The previous attempt's records are still queued in the producer, which retries them by itself:
            # wait for those instead of sending the chunk again (which would duplicate it).
            ok = await self._await_inflight(timeout)
        else:
            ok = await self._send_chunk(chunk, timeout)
        if not ok:
            return False
        self._drain_inflight = []
        self._drain_done += len(chunk)
        self._metrics.spool_drained.inc(len(chunk))
        if self._drain_done >= len(contents.records):
            await asyncio.to_thread(spool.remove, contents)
            if contents.damaged:
                self._metrics.spool_damaged_segments.inc()
            self._drain_segment = None
            log.info(
                "spool segment drained",
                extra={"segment": contents.segment.path.name, "records": len(contents.records)},
            )
        return True

    async def _send_chunk(self, chunk: list[SpoolRecord], timeout: float) -> bool:
        producer = self._producer
        assert producer is not None  # noqa: S101 - _step checked it
        started = self._monotonic()
        futures: list[asyncio.Future[Any]] = []
        try:
            for record in chunk:
                remaining = timeout - (self._monotonic() - started)
                future = await asyncio.wait_for(
                    producer.send(record.topic, value=record.value, key=record.key), max(0.001, remaining)
                )
                future.add_done_callback(_consume_exception)
                futures.append(future)
        except Exception as exc:  # noqa: BLE001 - any client failure is a failed attempt, retried later
            self._metrics.publish_failures.labels(
                "spool", "timeout" if isinstance(exc, TimeoutError) else "kafka_error"
            ).inc()
            self.breaker.failure()
            # Whatever was handed to the producer is retried by it; the rest is sent on the next attempt.
            self._drain_inflight = []
            return False
        self._drain_inflight = futures
        self._drain_inflight_producer = producer
        return await self._await_inflight(timeout - (self._monotonic() - started), started=started)

    async def _await_inflight(self, timeout: float, *, started: float | None = None) -> bool:
        started = self._monotonic() if started is None else started
        _, pending = await asyncio.wait(self._drain_inflight, timeout=max(0.0, timeout))
        if pending:
            self._metrics.publish_failures.labels("spool", "timeout").inc()
            self.breaker.failure()
            return False
        failed = [f for f in self._drain_inflight if f.cancelled() or f.exception() is not None]
        if failed:
            log.warning(
                "kafka refused spooled records",
                extra={"error": repr(failed[0].exception()), "count": len(failed)},
            )
            self._metrics.publish_failures.labels("spool", "kafka_error").inc()
            self._drain_inflight = []
            self.breaker.failure()
            return False
        self._metrics.publish_duration.labels("spool").observe(self._monotonic() - started)
        self.breaker.success()
        return True
