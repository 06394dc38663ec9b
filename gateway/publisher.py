"""Publishing to Kafka behind a circuit breaker, with the durable spool as the fallback (G6, G7).

A request's records go to Kafka directly while the breaker is closed (in batches shared with concurrent requests,
:mod:`gateway.acks`); the request is answered once Kafka has acknowledged all of them. If Kafka has not within the publish budget (or refuses), the records that are still
unacknowledged are appended to the spool, the breaker opens, and the request is answered as if published. While
the breaker is open, requests go straight to the spool without waiting on Kafka. One background task keeps the
producer (:mod:`gateway.producer`) and drains the spool (:mod:`gateway.drainer`); the drainer's first success
closes the breaker again.

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

from gateway.acks import Acknowledgements, Handover
from gateway.breaker import Breaker, BreakerState
from gateway.config import GatewaySettings
from gateway.drainer import SpoolDrainer
from gateway.metrics import BREAKER_STATES, GatewayMetrics
from gateway.producer import ProducerFactory, ProducerSupervisor
from gateway.spool import Spool, SpoolFull, SpoolRecord

log = logging.getLogger(__name__)

# Room a request needs in the spool for the gateway to call itself ready.
READY_SPOOL_HEADROOM_BYTES = 256 * 1024
# Below this much time left, a direct publish could not succeed anyway: spool without judging Kafka by it.
MIN_DIRECT_PUBLISH_SECONDS = 0.25


class Unavailable(Exception):
    """Kafka did not acknowledge and the spool cannot take the records (disabled, full or failing): 503."""


class Delivery(StrEnum):
    PUBLISHED = "published"
    SPOOLED = "spooled"


@dataclass(slots=True)
class Publication:
    """One request's records on their way: handed to Kafka (``handover``), or bound for the spool."""

    records: Sequence[SpoolRecord]
    started: float
    handover: Handover | None = None

    async def acknowledged(self) -> None:
        """Until Kafka has acknowledged every record or refused one; at once for records bound for the spool.

        Cancelling the wait (the request's deadline) is how a request stops waiting for Kafka.
        """
        if self.handover is not None:
            await self.handover.acknowledged()


class Publisher:
    """The request path (Kafka while the breaker is closed, else the spool), and the background task."""

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
        self._metrics = metrics
        self.spool = spool
        self._monotonic = monotonic
        self.breaker = Breaker(
            cooldown=settings.gateway_breaker_cooldown_seconds,
            max_cooldown=settings.gateway_breaker_max_cooldown_seconds,
            clock=monotonic,
            on_change=self._breaker_changed,
        )
        self._acks = Acknowledgements(self.breaker, metrics, monotonic)
        self._producers = ProducerSupervisor(
            producer_factory,
            self.breaker,
            metrics,
            topics=(settings.topic_raw, settings.topic_dlq),
            linger=settings.gateway_kafka_linger_ms / 1000,
            connect_timeout=settings.gateway_publish_budget_seconds,
            retry_delay=settings.gateway_breaker_max_cooldown_seconds / 4,
            prepare=prepare,
        )
        self._drainer = (
            SpoolDrainer(spool, settings, metrics, self.breaker, self._acks, monotonic)
            if spool is not None
            else None
        )
        self._background: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._draining_deadline: float | None = None
        self._spool_lock = asyncio.Lock()
        if spool is not None:
            metrics.spool_max_bytes.set(spool.max_bytes)
            metrics.spool_bytes.set_function(lambda: spool.bytes)
            metrics.spool_records.set_function(lambda: spool.records)
            metrics.spool_oldest_age.set_function(lambda: spool.oldest_age_ms() / 1000)
        metrics.ready.set_function(lambda: 1.0 if self.ready() else 0.0)

    # -- lifecycle --------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the spool and try to connect; an unreachable Kafka is retried in the background."""
        if self.spool is not None:
            await asyncio.to_thread(self.spool.open)
        self.breaker.force_open()
        await self._producers.connect()
        self._background = asyncio.create_task(self._run_background(), name="gateway-publisher")

    async def stop(self, *, drain_seconds: float) -> None:
        """Drain the spool for up to ``drain_seconds`` (if Kafka is there), then close everything."""
        self._stopping = True
        self._draining_deadline = self._monotonic() + drain_seconds
        self._wake.set()
        if self._background is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._background), drain_seconds + 1.0)
            self._background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._background
        await self._producers.close(timeout=max(1.0, min(drain_seconds, 5.0)))
        if self.spool is not None:
            await asyncio.to_thread(self.spool.close)
            if self.spool.records:
                log.warning(
                    "stopping with records left in the spool; they are published after the next start",
                    extra={"records": self.spool.records, "bytes": self.spool.bytes},
                )

    def ready(self) -> bool:
        """Can accept a request now: Kafka is healthy, or the spool has room (G9)."""
        if self._stopping:
            return False
        if self.breaker.closed and self._producers.batches is not None:
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

    # -- the request path -------------------------------------------------------------------------------------

    def begin(self, records: Sequence[SpoolRecord], *, deadline: float) -> Publication:
        """Hand the records to Kafka if the breaker lets them through and there is time to wait for it before
        ``deadline`` (monotonic); otherwise they are bound for the spool. Await the publication's
        :meth:`~Publication.acknowledged` until at most the deadline, then :meth:`finish` it."""
        publication = Publication(records, self._monotonic())
        batches = self._producers.batches
        if (
            records
            and batches is not None
            and not self._stopping
            and deadline - publication.started >= MIN_DIRECT_PUBLISH_SECONDS
        ):
            spool_empty = self.spool is None or self.spool.records == 0
            if self.breaker.closed or (spool_empty and self.breaker.try_trial()):
                publication.handover = batches.hand_over(records)
        return publication

    async def finish(self, publication: Publication) -> Delivery:
        """Kafka-acknowledged or durably spooled when this returns; :class:`Unavailable` otherwise."""
        records = publication.records
        if not records:
            return Delivery.PUBLISHED
        handover = publication.handover
        if handover is not None:
            if self._acks.settle(handover, source="request", started=publication.started) is None:
                return Delivery.PUBLISHED
            records = handover.unacknowledged()
        await self._to_spool(records)
        return Delivery.SPOOLED

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

    # -- the background task: keep the producer, drain the spool ----------------------------------------------

    async def _run_background(self) -> None:
        while True:
            # Cleared before the step, so a wake-up during the step is not lost.
            self._wake.clear()
            try:
                delay = await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the background task must outlive any one bad step
                log.exception("publisher background step failed")
                if self.breaker.state is BreakerState.HALF_OPEN:
                    # A trial that died must still end, or no further trial would ever be allowed.
                    self.breaker.failure()
                delay = 1.0
            if self._stopping:
                drained = self._drainer is None or self._drainer.idle
                past_deadline = (
                    self._draining_deadline is not None and self._monotonic() > self._draining_deadline
                )
                if drained or past_deadline or self._producers.batches is None:
                    return
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)

    async def _step(self) -> float:
        """One unit of background work; returns how long to wait before the next."""
        delay = await self._producers.maintain(stopping=self._stopping)
        if delay is not None:
            return delay
        batches = self._producers.batches
        if self._drainer is None or batches is None:
            return 5.0
        return await self._drainer.step(batches, stopping=self._stopping)
