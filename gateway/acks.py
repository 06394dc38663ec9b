"""How records reach Kafka and which of them Kafka has acknowledged (G6): the one place that accounts for it.

Records of concurrent requests (and the drainer's chunks) are coalesced into one producer batch per
topic-partition, handed to the client with aiokafka's ``create_batch``/``send_batch``: appending a record to a
batch costs about a microsecond where a keyed ``send()`` costs about fifteen, and one future per batch replaces one
per record. Each record's partition is computed once, with Kafka's default partitioner over the topic's partition
count as the producer's metadata has it (:func:`core.contract.partition_of`), so every record lands where a keyed
``send()`` would have put it and the worker finds each user where it expects.

A batch takes records until it is handed to the client: while the client still holds the partition's previous
batch (it sends one produce request per broker at a time), the next one fills with the records of every request
arriving meanwhile. Batches of one topic-partition are handed to the client in order by one submitter; the client
retries them as it would retry a ``send()``.

A :class:`Handover` is one request's (or one drain chunk's) records in those batches: it tells when every batch
holding one of them has been acknowledged or refused, and which records are unacknowledged.
:meth:`Acknowledgements.settle` counts the outcome in the breaker and the publish metrics.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, Protocol

from core.contract import partition_of
from gateway.breaker import Breaker
from gateway.metrics import GatewayMetrics
from gateway.spool import SpoolRecord

log = logging.getLogger(__name__)

Failure = Literal["timeout", "kafka_error"]
Source = Literal["request", "spool"]
TopicPartition = tuple[str, int]


class BatchBuilder(Protocol):
    """A producer batch being filled (aiokafka's ``BatchBuilder``)."""

    def append(self, *, timestamp: int | None, key: bytes | None, value: bytes | None) -> object | None:
        """Metadata of the appended record, or None once the batch is full or built (closed)."""

    def close(self) -> None: ...


class Producer(Protocol):
    """What the gateway needs of a Kafka producer (aiokafka's, or an in-memory one in unit tests)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def partitions_for(self, topic: str) -> set[int]: ...

    def create_batch(self) -> BatchBuilder: ...

    async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int) -> asyncio.Future[Any]: ...


class _Batch:
    """One producer batch of one topic-partition and the handovers with records in it."""

    __slots__ = ("builder", "handovers", "settled", "error")

    def __init__(self, builder: BatchBuilder) -> None:
        self.builder = builder
        self.handovers: list[Handover] = []
        self.settled = False
        self.error: BaseException | None = None

    def settle(self, error: BaseException | None) -> None:
        if self.settled:
            return
        self.settled, self.error = True, error
        # A batch refused before the client built it would otherwise keep taking records nobody sends.
        self.builder.close()
        handovers, self.handovers = self.handovers, []
        for handover in handovers:
            handover._batch_settled(error)

    def sent(self, future: asyncio.Future[Any]) -> None:
        """The client's future for this batch is done: acknowledged, or refused for good."""
        if future.cancelled():
            self.settle(asyncio.CancelledError("the producer dropped the batch"))
        else:
            # Retrieving the exception here also keeps asyncio from logging it as never retrieved.
            self.settle(future.exception())


class PartitionBatches:
    """The open batch of each topic-partition of one producer, and the submitters handing batches to it."""

    def __init__(self, producer: Producer, partitions: dict[str, int], *, linger: float = 0.0) -> None:
        """``partitions``: partition count per topic, as the producer's metadata has it. ``linger``: seconds a new
        batch waits for more records before it is handed to the producer."""
        self.producer = producer
        self._partitions = partitions
        self._linger = linger
        self._open: dict[TopicPartition, _Batch] = {}
        self._queued: dict[TopicPartition, deque[_Batch]] = {}
        self._submitters: dict[TopicPartition, asyncio.Task[None]] = {}
        self._unkeyed = 0

    @classmethod
    async def for_topics(
        cls, producer: Producer, topics: Iterable[str], *, linger: float
    ) -> PartitionBatches:
        batches = cls(producer, {}, linger=linger)
        await batches.learn(topics)
        return batches

    async def learn(self, topics: Iterable[str]) -> None:
        """Look up the partition count of topics not seen yet (waits for the producer's metadata)."""
        for topic in set(topics) - self._partitions.keys():
            self._partitions[topic] = len(await self.producer.partitions_for(topic))

    def hand_over(self, records: Sequence[SpoolRecord]) -> Handover:
        """Append the records to their topic-partitions' open batches (every topic must be learnt)."""
        handover = Handover(self, records)
        for record in records:
            tp = (record.topic, self._partition(record))
            batch = self._open.get(tp)
            if (
                batch is None
                or batch.builder.append(timestamp=None, key=record.key, value=record.value) is None
            ):
                # No open batch, or it is full or already built: a new one. An empty batch takes any record.
                batch = self._new_batch(tp)
                batch.builder.append(timestamp=None, key=record.key, value=record.value)
            handover._in(batch)
        handover._all_handed_over()
        return handover

    def close(self) -> None:
        """The producer is going away: batches not handed to it yet are refused."""
        for task in self._submitters.values():
            task.cancel()
        error = ConnectionError("the producer was closed before this batch was handed to it")
        for queue in self._queued.values():
            while queue:
                queue.popleft().settle(error)
        self._open.clear()

    def _partition(self, record: SpoolRecord) -> int:
        partitions = self._partitions[record.topic]
        if record.key is not None:
            return partition_of(record.key, partitions)
        # No key (a dead letter without a readable userid): any partition will do; take turns.
        self._unkeyed += 1
        return self._unkeyed % partitions

    def _new_batch(self, tp: TopicPartition) -> _Batch:
        batch = _Batch(self.producer.create_batch())
        self._open[tp] = batch
        queue = self._queued.get(tp)
        if queue is None:
            queue = self._queued[tp] = deque()
        queue.append(batch)
        if tp not in self._submitters:
            self._submitters[tp] = asyncio.create_task(self._submit(tp, queue), name=f"gateway-batches-{tp}")
        return batch

    async def _submit(self, tp: TopicPartition, queue: deque[_Batch]) -> None:
        # One submitter per topic-partition hands its batches over in order; send_batch waits while the client
        # still holds an earlier batch of the partition, and meanwhile the next batch keeps filling.
        topic, partition = tp
        try:
            while queue:
                batch = queue[0]
                if self._linger > 0 and self._open.get(tp) is batch:
                    # A batch still filling gathers records a moment longer (PRESENCE_GATEWAY_KAFKA_LINGER_MS).
                    await asyncio.sleep(self._linger)
                try:
                    future = await self.producer.send_batch(batch.builder, topic, partition=partition)
                except Exception as exc:  # noqa: BLE001 - whatever the client raises, the batch is not acknowledged
                    queue.popleft()
                    self._stop_filling(tp, batch)
                    batch.settle(exc)
                    continue
                # Closed at once, before anything else runs: an idempotent producer numbers a batch's records when
                # it takes the batch for sending, which may be before it builds it, so a record added in between
                # would break the sequence (OutOfOrderSequenceNumber).
                self._stop_filling(tp, batch)
                queue.popleft()
                future.add_done_callback(batch.sent)
        finally:
            del self._submitters[tp]

    def _stop_filling(self, tp: TopicPartition, batch: _Batch) -> None:
        batch.builder.close()
        if self._open.get(tp) is batch:
            del self._open[tp]


class Handover:
    """Records handed to one producer's batches, and which of them Kafka has acknowledged."""

    def __init__(self, batches: PartitionBatches, records: Sequence[SpoolRecord]) -> None:
        self.batches = batches
        self.records = records
        self._batch_of: list[_Batch] = []
        self._unsettled = 0
        self._refusal: BaseException | None = None
        self._handed_over = False
        self._waiter: asyncio.Future[None] | None = None

    @property
    def finished(self) -> bool:
        """Every record acknowledged, or at least one refused: nothing more to wait for."""
        return self._handed_over and (self._unsettled == 0 or self._refusal is not None)

    async def acknowledged(self) -> None:
        """Until every record is acknowledged or one is refused. Cancelling the wait (a timeout) leaves the
        handover intact: it can be waited for again."""
        if self.finished:
            return
        if self._waiter is None or self._waiter.done():
            self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter

    def unacknowledged(self) -> list[SpoolRecord]:
        """The records Kafka has not acknowledged: still pending, or refused."""
        return [
            record
            for record, batch in zip(self.records, self._batch_of, strict=True)
            if not batch.settled or batch.error is not None
        ]

    @property
    def refusal(self) -> BaseException | None:
        """What the client or Kafka refused one of the batches with, if it did."""
        return self._refusal

    def _in(self, batch: _Batch) -> None:
        self._batch_of.append(batch)
        # Records are handed over in one go (no await in between), so a batch that already holds one of this
        # handover's records has it last in its list.
        if not batch.handovers or batch.handovers[-1] is not self:
            batch.handovers.append(self)
            self._unsettled += 1

    def _all_handed_over(self) -> None:
        self._handed_over = True
        self._wake()

    def _batch_settled(self, error: BaseException | None) -> None:
        self._unsettled -= 1
        if error is not None and self._refusal is None:
            self._refusal = error
        self._wake()

    def _wake(self) -> None:
        if self.finished and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Acknowledgements:
    """Counts what became of each handover in the breaker and the publish metrics."""

    def __init__(self, breaker: Breaker, metrics: GatewayMetrics, monotonic: Callable[[], float]) -> None:
        self._breaker = breaker
        self._metrics = metrics
        self._monotonic = monotonic

    def settle(self, handover: Handover, *, source: Source, started: float) -> Failure | None:
        """None when Kafka acknowledged every record of the handover, else why not; the breaker learns of it."""
        failure: Failure | None = None
        if handover.refusal is not None:
            failure = "kafka_error"
            log.warning("kafka refused a publish", extra={"error": repr(handover.refusal), "source": source})
        elif not handover.finished:
            failure = "timeout"
        if failure is None:
            self._metrics.publish_duration_by_source[source].observe(self._monotonic() - started)
            self._breaker.success()
        else:
            self.fail(source, failure)
        return failure

    def fail(self, source: Source, failure: Failure) -> None:
        """Count a failed attempt (also one that failed before its records could be handed over)."""
        self._metrics.publish_failures_by[source, failure].inc()
        self._breaker.failure()
