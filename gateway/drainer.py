"""Spool draining (G7): republish the spool oldest segment first; an attempt after a cooldown is the breaker's
trial, and its success closes the breaker again."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiokafka.errors import KafkaError

from gateway.acks import Acknowledgements, Handover, PartitionBatches
from gateway.breaker import Breaker
from gateway.config import GatewaySettings
from gateway.metrics import GatewayMetrics
from gateway.spool import SegmentContents, Spool

log = logging.getLogger(__name__)


class SpoolDrainer:
    """Works through the spool one chunk of the oldest segment at a time; a segment is removed once drained."""

    def __init__(
        self,
        spool: Spool,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        breaker: Breaker,
        acknowledgements: Acknowledgements,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._spool = spool
        self._monotonic = monotonic
        self._metrics = metrics
        self._breaker = breaker
        self._acks = acknowledgements
        self._chunk_size = settings.gateway_spool_drain_batch
        # A drain attempt doubles as the breaker's trial; give Kafka longer than a request gets, but not forever.
        self._attempt_timeout = max(
            settings.gateway_publish_budget_seconds, min(10.0, settings.gateway_kafka_request_timeout_seconds)
        )
        # The segment being drained and how many of its records Kafka has acknowledged.
        self._segment: SegmentContents | None = None
        self._done = 0
        # The current chunk, as handed to a producer's batches, until all of it is acknowledged.
        self._handover: Handover | None = None

    @property
    def idle(self) -> bool:
        """Nothing spooled and nothing half drained."""
        return self._spool.records == 0 and self._segment is None

    async def step(self, batches: PartitionBatches, *, stopping: bool) -> float:
        """One drain attempt if one is due; returns how long to wait before the next step."""
        if self.idle:
            return 5.0
        if not self._breaker.closed and not self._breaker.try_trial(force=stopping):
            return max(0.05, self._breaker.seconds_until_trial())
        if await self._drain_chunk(batches):
            return 0.0
        # Not stopping: the open breaker's cooldown paces the next attempt. Stopping: trials are forced, so pace.
        return 0.2 if stopping else 0.0

    async def _drain_chunk(self, batches: PartitionBatches) -> bool:
        if self._segment is None:
            contents = await asyncio.to_thread(self._spool.oldest)
            if contents is None:
                self._breaker.success()
                return True
            self._segment, self._done, self._handover = contents, 0, None
        contents = self._segment
        started = self._monotonic()
        handover = self._handover
        try:
            async with asyncio.timeout(self._attempt_timeout):
                if handover is None or handover.batches is not batches:
                    # A chunk handed to a producer that has since been replaced is sent again in full.
                    chunk = contents.records[self._done : self._done + self._chunk_size]
                    # Spooled records name their topic as it was when they were spooled.
                    await batches.learn(record.topic for record in chunk)
                    handover = self._handover = batches.hand_over(chunk)
                await handover.acknowledged()
        except TimeoutError:
            pass
        except KafkaError as exc:
            log.warning("kafka could not describe a spooled record's topic", extra={"error": repr(exc)})
            self._acks.fail("spool", "kafka_error")
            return False
        if handover is None:
            self._acks.fail("spool", "timeout")
            return False
        failure = self._acks.settle(handover, source="spool", started=started)
        if failure is not None:
            if failure == "kafka_error":
                # Refused records are not retried by the producer: send the chunk again on the next attempt.
                self._handover = None
            # Timed out: the producer keeps retrying what it holds; the next attempt waits for those.
            return False
        self._handover = None
        drained = len(handover.records)
        self._done += drained
        self._metrics.spool_drained.inc(drained)
        if self._done >= len(contents.records):
            await asyncio.to_thread(self._spool.remove, contents)
            if contents.damaged:
                self._metrics.spool_damaged_segments.inc()
            self._segment = None
            log.info(
                "spool segment drained",
                extra={"segment": contents.segment.path.name, "records": len(contents.records)},
            )
        return True
