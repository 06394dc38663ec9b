"""Broker-free fixtures for the Faust glue: real ``faust.App`` objects, RocksDB in a temporary directory, and a
recorded stand-in for the aiokafka producer methods the glue calls (``send``, ``create_batch``, ``send_batch``,
``partitions_for``).

Nothing here connects anywhere: the bootstrap address is a port nothing listens on, and every test fails if
the code under test tried to reach it (the stand-in client is the only way out).
"""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.structs import RecordMetadata, TopicPartition

from streams.config import WorkerSettings
from streams.runtime.app import Worker, create_app

_SEND = inspect.signature(AIOKafkaProducer.send)
_SEND_BATCH = inspect.signature(AIOKafkaProducer.send_batch)
_APPEND = inspect.signature(BatchBuilder.append)


class RecordedBatch:
    """A real ``BatchBuilder`` (so "full" means what it means in aiokafka) that remembers what was appended."""

    def __init__(self, batch_size: int) -> None:
        self.builder = BatchBuilder(batch_size, 0)
        self.messages: list[tuple[bytes | None, bytes | None]] = []

    def append(self, **kwargs: Any) -> Any:
        _APPEND.bind(None, **kwargs)
        metadata = self.builder.append(**kwargs)
        if metadata is not None:
            self.messages.append((kwargs["key"], kwargs["value"]))
        return metadata


class RecordedClient:
    """Stands in for the aiokafka producer: records each send, answers with a future the test resolves.

    ``sent`` lists every message handed over, in order, as (topic, key, value, partition, future); the messages
    of one ``send_batch`` share its future. Every call is checked against the real method's signature, so the
    glue cannot call it in a way the real client would refuse.
    """

    def __init__(self, batch_size: int = 256 * 1024, partitions: int = 4) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, int | None, asyncio.Future[Any]]] = []
        self.batches: list[tuple[str, int, list[tuple[bytes | None, bytes | None]], asyncio.Future[Any]]] = []
        self.batch_size = batch_size
        self.partitions = partitions

    def create_batch(self) -> RecordedBatch:
        return RecordedBatch(self.batch_size)

    async def send_batch(self, batch: RecordedBatch, topic: str, *, partition: int) -> asyncio.Future[Any]:
        _SEND_BATCH.bind(None, batch, topic, partition=partition)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.batches.append((topic, partition, batch.messages, future))
        self.sent.extend((topic, key, value, partition, future) for key, value in batch.messages)
        return future

    async def partitions_for(self, topic: str) -> set[int]:
        return set(range(self.partitions))

    def acknowledge_batch(self, index: int, offset: int) -> RecordMetadata:
        """Resolve the ``index``-th batch as Kafka does: with its first record's offset."""
        topic, partition, _, future = self.batches[index]
        metadata = RecordMetadata(topic, partition, TopicPartition(topic, partition), offset, -1, 0, 0)
        future.set_result(metadata)
        return metadata

    async def send(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                   partition: int | None = None, **rest: Any) -> asyncio.Future[Any]:  # fmt: skip
        _SEND.bind(None, topic, value, key=key, partition=partition, **rest)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.sent.append((topic, key, value, partition, future))
        return future

    def acknowledge(self, index: int, offset: int) -> RecordMetadata:
        topic, _, _, partition, future = self.sent[index]
        assert partition is not None
        metadata = RecordMetadata(topic, partition, TopicPartition(topic, partition), offset, -1, 0, 0)
        future.set_result(metadata)
        return metadata


@pytest.fixture
def settings(tmp_path: Path) -> WorkerSettings:
    return WorkerSettings(
        kafka_bootstrap_servers="127.0.0.1:9",
        worker_data_dir=tmp_path / "state",
        worker_app_id="unit-worker",
        topic_partitions=4,
    )


@pytest.fixture
def worker(settings: WorkerSettings) -> Worker:
    """The worker's whole Faust app as ``presence worker`` builds it, never started."""
    return create_app(settings)
