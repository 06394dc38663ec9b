"""Every private name of faust-streaming and aiokafka the worker uses, each behind one small function.

The worker bypasses Faust's table and producer paths for speed and for the processing guarantee (S10, see
:mod:`streams.runtime.table` and :mod:`streams.runtime.fixes`); what it reaches for to do so is listed here and
nowhere else, so an upgrade of the pinned versions (:mod:`streams.runtime.versions`) knows exactly what to
re-read. Public API (``app.producer``, ``store.set_persisted_offset``, ``app.router.table_metadata``...) is used
where it is needed and is not listed.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

#: What each function below relies on, for the version guard's message and for whoever upgrades.
TOUCHED = (
    "faust.tables.base.Collection._new_changelog_topic (rebuild the changelog topic with raw serializers)",
    "faust.stores.rocksdb.Store._db_for_partition (the partition's RocksDB handle)",
    "faust.stores.rocksdb.Store._key_index (key -> partition cache that Store.get consults)",
    "faust.stores.rocksdb.Store._visible_items (one partition's pairs, without the offset key)",
    "faust.transport.drivers.aiokafka.Producer._ensure_producer (the aiokafka client behind Faust's producer)",
    "faust.transport.drivers.aiokafka.Consumer._committed_offset (last offset Faust committed, per partition)",
    "faust.transport.producer.ProducerBuffer.pending / _send_pending / message_sent / put / flush "
    "(the buffer the commit path flushes; patched per app by streams.runtime.fixes)",
    "aiokafka.AIOKafkaProducer.send (returns a future resolved with RecordMetadata on acknowledgement)",
)


def rebuild_changelog_topic(table: Any) -> Any:
    """A fresh changelog topic object for ``table``, built with its current key/value serializers."""
    return table._new_changelog_topic()


def partition_db(store: Any, partition: int) -> Any:
    """The RocksDB handle of one partition of a Faust RocksDB ``store`` (opened on first use)."""
    return store._db_for_partition(partition)


def key_index(store: Any) -> MutableMapping[bytes, int]:
    """The store's key -> partition cache; a write must update it as Faust's own ``_set`` does."""
    index: MutableMapping[bytes, int] = store._key_index
    return index


def partition_items(store: Any, partition: int) -> Iterator[tuple[bytes, bytes]]:
    """One partition's (key, value) pairs in key order, Faust's offset bookkeeping key left out."""
    items: Iterator[tuple[bytes, bytes]] = store._visible_items(partition_db(store, partition))
    return items


def kafka_client(producer: Any) -> Any:
    """The ``aiokafka.AIOKafkaProducer`` behind Faust's producer (created on first use)."""
    return producer._ensure_producer()


def committed_offset(consumer: Any, tp: Any) -> int | None:
    """The last offset Faust committed for ``tp`` (not the next to read), None if nothing was committed."""
    offset = consumer._committed_offset.get(tp)
    return None if offset is None else int(offset)


async def drain_producer_buffer(buffer: Any) -> None:
    """Hand every message queued in a ``ProducerBuffer`` to the Kafka client now, as its background task would."""
    while not buffer.pending.empty():
        await buffer._send_pending(buffer.pending.get_nowait())
        buffer.message_sent.set()
