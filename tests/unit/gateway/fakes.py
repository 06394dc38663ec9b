"""An in-memory stand-in for Kafka, for unit tests of the HTTP layer and the publisher (never for integration)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any


class BrokerDown(Exception):
    pass


@dataclass
class MemoryKafka:
    """Records acknowledged so far; while ``up`` is False sends stay unacknowledged until it is back."""

    up: bool = True
    start_fails: bool = False
    acked: list[tuple[str, bytes | None, bytes]] = field(default_factory=list)
    pending: list[tuple[asyncio.Future[Any], tuple[str, bytes | None, bytes]]] = field(default_factory=list)
    producers_started: int = 0

    def set_up(self, up: bool) -> None:
        self.up = up
        if up:
            for future, record in self.pending:
                if not future.done():
                    self.acked.append(record)
                    future.set_result(None)
            self.pending.clear()

    def producer(self) -> MemoryProducer:
        return MemoryProducer(self)

    def topic(self, name: str) -> list[tuple[bytes | None, bytes]]:
        return [(key, value) for topic, key, value in self.acked if topic == name]


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

    async def send(
        self, topic: str, value: bytes | None = None, key: bytes | None = None
    ) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        record = (topic, key, value or b"")
        if self.kafka.up:
            self.kafka.acked.append(record)
            future.set_result(None)
        else:
            self.kafka.pending.append((future, record))
        return future
