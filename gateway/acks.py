"""Acknowledgement accounting: which records handed to the producer Kafka has acknowledged (G6).

The request path and the spool drainer both publish through :meth:`Acknowledgements.deliver`, the one place that
hands records over, waits for their acknowledgements, tells which are still unacknowledged, and counts the
outcome (the breaker, the publish metrics).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

from gateway.breaker import Breaker
from gateway.metrics import GatewayMetrics
from gateway.producer import Producer
from gateway.spool import SpoolRecord

log = logging.getLogger(__name__)

Failure = Literal["timeout", "kafka_error"]
Source = Literal["request", "spool"]


def _consume_exception(future: asyncio.Future[Any]) -> None:
    # Late failures of abandoned sends are expected (their records are in the spool); don't log them as
    # "exception was never retrieved".
    if not future.cancelled():
        future.exception()


class Handover:
    """Records handed to one producer, and what Kafka made of each so far.

    Kept across attempts by the drainer: records the producer already holds are retried by the producer itself,
    so a later attempt waits for them (and hands over the rest) instead of sending them again.
    """

    def __init__(self, producer: Producer, records: Sequence[SpoolRecord]) -> None:
        self.producer = producer
        self.records = list(records)
        self._futures: list[asyncio.Future[Any]] = []

    async def hand_over(self) -> None:
        for record in self.records[len(self._futures) :]:
            self._futures.append(await self.producer.send(record.topic, value=record.value, key=record.key))

    async def acknowledged(self) -> None:
        for future in self._futures:
            # One at a time: records handed over together mostly share a batch, so after the first
            # acknowledgement the rest are done too. asyncio.wait neither raises nor cancels the client's
            # future on timeout.
            if not future.done():
                await asyncio.wait((future,))

    def unacknowledged(self) -> list[SpoolRecord]:
        """The records Kafka has not acknowledged: not handed over, still pending, or refused."""
        futures = self._futures
        return [
            record
            for index, record in enumerate(self.records)
            if index >= len(futures)
            or not futures[index].done()
            or futures[index].cancelled()
            or futures[index].exception() is not None
        ]

    def refusals(self) -> list[BaseException]:
        return [
            error
            for future in self._futures
            if future.done() and not future.cancelled() and (error := future.exception()) is not None
        ]

    def quiet_late_failures(self) -> None:
        """Records still pending may fail after nobody waits for them any more (they went to the spool, or the
        chunk is sent again): retrieve those errors so they are not logged as never retrieved."""
        for future in self._futures:
            if not future.done():
                future.add_done_callback(_consume_exception)


class Acknowledgements:
    """Delivers handovers within a deadline and counts each outcome in the breaker and the publish metrics."""

    def __init__(self, breaker: Breaker, metrics: GatewayMetrics, monotonic: Callable[[], float]) -> None:
        self._breaker = breaker
        self._metrics = metrics
        self._monotonic = monotonic

    async def deliver(self, handover: Handover, *, timeout: float, source: Source) -> Failure | None:
        """Hand over what is not yet handed over and wait for every acknowledgement, for at most ``timeout``.

        None when Kafka acknowledged every record, else why not; either way the breaker learns of it.
        """
        started = self._monotonic()
        failure: Failure | None = None
        try:
            # One deadline over handing the records to the client and waiting for their acknowledgements (a
            # timeout context rather than wait_for: no extra task).
            async with asyncio.timeout(timeout):
                await handover.hand_over()
                await handover.acknowledged()
        except TimeoutError:
            failure = "timeout"
        except Exception as exc:  # noqa: BLE001 - whatever the client raises, the records are not acknowledged
            failure = "kafka_error"
            log.warning("kafka refused a publish", extra={"error": repr(exc), "source": source})
        if failure is None and (refusals := handover.refusals()):
            failure = "kafka_error"
            log.warning(
                "kafka refused a publish",
                extra={"error": repr(refusals[0]), "count": len(refusals), "source": source},
            )
        if failure is None:
            self._metrics.publish_duration.labels(source).observe(self._monotonic() - started)
            self._breaker.success()
        else:
            handover.quiet_late_failures()
            self._metrics.publish_failures.labels(source, failure).inc()
            self._breaker.failure()
        return failure
