"""Producer supervision: the one shared Kafka producer, connected, replaced when it dies or keeps failing, closed.

Connecting and replacing drive the breaker (G7): no producer means open, a fresh one means closed. Each producer
comes with its own :class:`gateway.acks.PartitionBatches`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from gateway.acks import PartitionBatches, Producer
from gateway.breaker import Breaker
from gateway.config import GatewaySettings
from gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)

# Failed publishes in a row (breaker not closed) after which the producer is replaced by a new one.
_REPLACE_AFTER_FAILURES = 5


ProducerFactory = Callable[[], Producer]


def kafka_producer_factory(settings: GatewaySettings) -> ProducerFactory:
    def create() -> Producer:
        producer: Producer = AIOKafkaProducer(
            client_id=f"{settings.kafka_client_id_prefix}-gateway",
            acks="all",
            enable_idempotence=True,
            request_timeout_ms=int(settings.gateway_kafka_request_timeout_seconds * 1000),
            retry_backoff_ms=100,
            **settings.aiokafka_options(),
        )
        return producer

    return create


def _sender_is_dead(producer: Producer) -> bool:
    # aiokafka's producer stops for good when its sender task dies (e.g. OutOfOrderSequenceNumber); it exposes
    # no public health check, so look at the task and tolerate its absence.
    sender = getattr(producer, "_sender", None)
    task = getattr(sender, "sender_task", None)
    return isinstance(task, asyncio.Task) and task.done()


class ProducerSupervisor:
    """Holds the current producer and its batches (None while Kafka cannot be reached) and keeps them usable."""

    def __init__(
        self,
        factory: ProducerFactory,
        breaker: Breaker,
        metrics: GatewayMetrics,
        *,
        topics: Sequence[str],
        linger: float,
        connect_timeout: float,
        retry_delay: float,
        prepare: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``topics``: what requests publish to, whose partition counts the batches need before the first request.
        ``prepare`` runs before the producer first connects, until it succeeds (e.g. creating topics)."""
        self._factory = factory
        self._topics = topics
        self._linger = linger
        self._breaker = breaker
        self._metrics = metrics
        self._connect_timeout = connect_timeout
        self._retry_delay = retry_delay
        self._prepare = prepare
        self.batches: PartitionBatches | None = None

    async def connect(self) -> bool:
        """Prepare Kafka if still needed and start a producer; close the breaker on success."""
        if self._prepare is not None:
            try:
                await asyncio.wait_for(self._prepare(), self._connect_timeout * 3)
            except (KafkaError, OSError, TimeoutError) as exc:
                log.warning("kafka not ready for the producer yet", extra={"error": repr(exc)})
                return False
            self._prepare = None
        producer = self._factory()
        try:
            async with asyncio.timeout(self._connect_timeout):
                await producer.start()
                batches = await PartitionBatches.for_topics(producer, self._topics, linger=self._linger)
        except (KafkaError, OSError, TimeoutError) as exc:
            self._metrics.producer_restarts.labels("failed").inc()
            log.warning("kafka producer could not start; spooling until it can", extra={"error": repr(exc)})
            await close_producer(producer, timeout=1.0)
            return False
        self._metrics.producer_restarts.labels("started").inc()
        self.batches = batches
        self._breaker.success()
        return True

    async def maintain(self, *, stopping: bool) -> float | None:
        """Connect, or replace a dead or failing producer. The delay before the next step if it had to act (the
        producer is not usable yet), None when the current producer is fine."""
        if self.batches is None:
            if stopping:
                return 0.0
            if not await self.connect():
                self._breaker.force_open()
                return self._retry_delay
            return 0.0
        if _sender_is_dead(self.batches.producer) or (
            self._breaker.consecutive_failures >= _REPLACE_AFTER_FAILURES and not self._breaker.closed
        ):
            log.warning(
                "recreating the kafka producer", extra={"failures": self._breaker.consecutive_failures}
            )
            self._breaker.force_open()
            self._breaker.forget_failures()
            await self.close(timeout=1.0)
            return 0.0
        return None

    async def close(self, *, timeout: float) -> None:
        if self.batches is not None:
            old, self.batches = self.batches, None
            old.close()
            await close_producer(old.producer, timeout=timeout)


async def close_producer(producer: Producer, *, timeout: float) -> None:
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
