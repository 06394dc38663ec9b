"""The users table glue on Faust's real RocksDB store (a temporary directory), no broker (S10).

A write lands in the partition's RocksDB and queues one changelog message with the raw key, the value (None
for a delete) and the partition of the message being processed; sending it holds the next commit until Kafka
acknowledges it, and the acknowledged offset is persisted where a warm restart resumes the changelog.
"""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.errors import KafkaTimeoutError
from aiokafka.structs import TopicPartition

from core.contract import changelog_topic
from streams.runtime.app import Worker

from .conftest import RecordedClient


def test_the_changelog_is_the_contracts_topic_with_raw_keys_and_values(worker: Worker) -> None:
    users = worker.table._table
    assert worker.table.changelog == changelog_topic("unit-worker")
    assert users.changelog_topic.get_topic_name() == changelog_topic("unit-worker")
    # JSON (Faust's default) would quote the keys: '"u1"' hashes to another partition than 'u1'.
    assert users.changelog_topic.key_serializer == "raw"
    assert users.changelog_topic.value_serializer == "raw"


def test_writes_land_in_the_partitions_rocksdb_and_are_read_back(worker: Worker) -> None:
    table = worker.table
    table.partition = 3
    table["u1"] = b"record-1"
    table.partition = 1
    table["u2"] = b"record-2"

    assert table.get("u1") == b"record-1" and table["u2"] == b"record-2"
    assert "u1" in table and "nobody" not in table and table.get("nobody") is None
    assert list(table.records(3)) == [("u1", b"record-1")]
    assert list(table.records(1)) == [("u2", b"record-2")]
    assert list(table.records(0)) == []
    # Faust's own store API sees the same data (its reads go through the key index the write updated).
    assert worker.table._table.data[b"u1"] == b"record-1"

    table.partition = 3
    assert table.pop("u1") == b"record-1"
    assert table.get("u1") is None and list(table.records(3)) == []
    assert table.pop("u1", "gone") == "gone"
    with pytest.raises(KeyError):
        table["u1"]


async def test_each_write_queues_one_changelog_message_sent_with_key_partition_and_value(
    worker: Worker,
) -> None:
    table, client = worker.table, RecordedClient()
    table.partition = 2
    table["u1"] = b"v1"
    table["u1"] = b"v2"
    del table["u1"]
    assert client.sent == [], "nothing is sent before the message's outputs are"

    await table.flush_changelog(client)
    changelog = changelog_topic("unit-worker")
    assert [(topic, key, value, partition) for topic, key, value, partition, _ in client.sent] == [
        (changelog, b"u1", b"v1", 2),
        (changelog, b"u1", b"v2", 2),
        (changelog, b"u1", None, 2),  # a delete is a tombstone
    ]
    await table.flush_changelog(client)
    assert len(client.sent) == 3, "a flush sends each queued message once"


async def test_the_commit_waits_for_the_changelog_and_the_offset_is_persisted_on_acknowledgement(
    worker: Worker,
) -> None:
    table, client = worker.table, RecordedClient()
    store = table._table.data
    tp = TopicPartition(changelog_topic("unit-worker"), 1)
    table.partition = 1
    table["u1"] = b"v1"
    table["u2"] = b"v2"
    await table.flush_changelog(client)

    # Faust awaits this before committing offsets (Consumer._commit_offsets).
    committing = asyncio.ensure_future(worker.app.producer.flush())
    await asyncio.sleep(0)
    assert not committing.done()
    assert store.persisted_offset(tp) is None

    client.acknowledge_batch(0, offset=40)
    await asyncio.wait_for(committing, timeout=5)
    # The batch's future carries its first record's offset; the persisted offset is its last record's.
    assert store.persisted_offset(tp) == 41

    table["u3"] = b"v3"
    await table.flush_changelog(client)
    committing = asyncio.ensure_future(worker.app.producer.flush())
    await asyncio.sleep(0)
    assert not committing.done(), "the next write is not acknowledged yet"
    client.acknowledge_batch(1, offset=42)
    await asyncio.wait_for(committing, timeout=5)
    assert store.persisted_offset(tp) == 42


async def test_a_failed_changelog_send_fails_the_commit_and_persists_no_offset(worker: Worker) -> None:
    table, client = worker.table, RecordedClient()
    table.partition = 0
    table["u1"] = b"v1"
    await table.flush_changelog(client)
    client.sent[0][4].set_exception(KafkaTimeoutError())
    with pytest.raises(KafkaTimeoutError):
        await asyncio.wait_for(worker.app.producer.flush(), timeout=5)
    assert table._table.data.persisted_offset(TopicPartition(changelog_topic("unit-worker"), 0)) is None


async def test_the_processor_writes_through_the_table_and_its_changelog(worker: Worker) -> None:
    """The agent's path minus Kafka: an event applied by the processor becomes a record and a changelog write."""
    import orjson

    at = 1_700_000_000_000
    raw = orjson.dumps({"schema": 1, "userid": "u1", "status": 0, "time": at, "sessionId": "s1", "os": "iOS",
                        "clientIp": "1.2.3.4:5", "received_at": at, "delivery_id": "d"})  # fmt: skip
    worker.table.partition = 2
    outgoing = worker.processor.on_raw(2, 7, b"u1", raw, now_ms=at + 5)
    assert {message.topic for message in outgoing} >= {"transitions", "state"}
    assert [key for key, _ in worker.table.records(2)] == ["u1"]

    client = RecordedClient()
    await worker.table.flush_changelog(client)
    assert [(key, partition) for _, key, _, partition, _ in client.sent] == [(b"u1", 2)]
