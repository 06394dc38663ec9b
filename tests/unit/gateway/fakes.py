"""An in-memory stand-in for Kafka, for unit tests of the HTTP layer and the publisher (never for integration)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiokafka.errors import OutOfOrderSequenceNumber

Record = tuple[str, bytes | None, bytes]


@dataclass
class MemoryKafka:
    """Records acknowledged so far; while ``up`` is False batches stay unacknowledged until it is back.

    Like aiokafka's idempotent producer, a batch's records are numbered when the client takes the batch
    (``send_batch``) and the batch is built later: a record added in between is refused with
    OutOfOrderSequenceNumber. While ``hold`` is True, taken batches wait to be built until :meth:`release`.
    """

    up: bool = True
    hold: bool = False
    start_fails: bool = False
    partitions: int = 4
    # Records a batch takes before it is full.
    batch_capacity: int = 100
    acked: list[Record] = field(default_factory=list)
    # (topic, partition, key) of every acknowledged record, in order.
    placed: list[tuple[str, int, bytes | None]] = field(default_factory=list)
    pending: list[tuple[asyncio.Future[Any], MemoryBatch]] = field(default_factory=list)
    held: list[tuple[asyncio.Future[Any], MemoryBatch]] = field(default_factory=list)
    batches_taken: int = 0
    producers_started: int = 0

    def release(self) -> None:
        self.hold = False
        held, self.held = self.held, []
        for future, batch in held:
            self._build(future, batch)

    def set_up(self, up: bool) -> None:
        self.up = up
        if up:
            for future, batch in self.pending:
                if not future.done():
                    self._ack(future, batch)
            self.pending.clear()

    def producer(self) -> MemoryProducer:
        return MemoryProducer(self)

    def topic(self, name: str) -> list[tuple[bytes | None, bytes]]:
        return [(key, value) for topic, key, value in self.acked if topic == name]

    def _build(self, future: asyncio.Future[Any], batch: MemoryBatch) -> None:
        batch.close()
        if len(batch.records) != batch.taken:
            future.set_exception(OutOfOrderSequenceNumber())
        elif self.up:
            self._ack(future, batch)
        else:
            self.pending.append((future, batch))

    def _ack(self, future: asyncio.Future[Any], batch: MemoryBatch) -> None:
        for key, value in batch.records:
            self.acked.append((batch.topic, key, value))
            self.placed.append((batch.topic, batch.partition, key))
        future.set_result(None)


class MemoryBatch:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.records: list[tuple[bytes | None, bytes]] = []
        self.closed = False
        self.topic = ""
        self.partition = -1
        self.taken = -1

    def append(self, *, timestamp: int | None, key: bytes | None, value: bytes | None) -> object | None:
        if self.closed or len(self.records) >= self.capacity:
            self.closed = True
            return None
        self.records.append((key, value or b""))
        return len(self.records)

    def close(self) -> None:
        self.closed = True


class MemoryProducer:
    def __init__(self, kafka: MemoryKafka) -> None:
        self.kafka = kafka
        self.stopped = False

    async def start(self) -> None:
        if self.kafka.start_fails:
            raise OSError("connection refused")
        self.kafka.producers_started += 1

    async def stop(self) -> None:
        self.stopped = True

    async def partitions_for(self, topic: str) -> set[int]:
        return set(range(self.kafka.partitions))

    def create_batch(self) -> MemoryBatch:
        return MemoryBatch(self.kafka.batch_capacity)

    async def send_batch(self, batch: MemoryBatch, topic: str, *, partition: int) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        batch.topic, batch.partition, batch.taken = topic, partition, len(batch.records)
        self.kafka.batches_taken += 1
        if self.kafka.hold:
            self.kafka.held.append((future, batch))
        else:
            # Built and sent on the loop's next turn.
            loop.call_soon(self.kafka._build, future, batch)
        return future
