"""Broker-free fixtures for the Faust glue: real ``faust.App`` objects, RocksDB in a temporary directory, and a
recorded stand-in for the one aiokafka method the glue calls (``AIOKafkaProducer.send``).

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
from aiokafka.structs import RecordMetadata, TopicPartition

from streams.config import WorkerSettings
from streams.runtime.app import Worker, create_app

_SEND = inspect.signature(AIOKafkaProducer.send)


class RecordedClient:
    """Stands in for ``AIOKafkaProducer.send``: records each call, answers with a future the test resolves.

    Every call is checked against the real method's signature, so the glue cannot call it in a way the real
    client would refuse.
    """

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, int | None, asyncio.Future[Any]]] = []

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
