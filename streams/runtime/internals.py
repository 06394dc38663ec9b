"""Every private name of faust-streaming and aiokafka the worker uses, each behind one small function.

The worker bypasses Faust's table and producer paths for speed and for the processing guarantee (S10, see
:mod:`streams.runtime.table` and :mod:`streams.runtime.fixes`); what it reaches for to do so is listed here and
nowhere else, so an upgrade of the pinned versions (:mod:`streams.runtime.versions`) knows exactly what to
re-read. Public API (``app.producer``, ``store.set_persisted_offset``, ``app.router.table_metadata``...) is used
where it is needed and is not listed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from typing import Any

from faust.types.tuples import ack_lock
from mode.utils.futures import notify

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
    "faust.transport.consumer.Consumer._drain_messages (replaced per consumer by streams.runtime.delivery; "
    "called by the Fetcher service as consumer._drain_messages(fetcher))",
    "faust.transport.consumer.Consumer._wait_next_records / _read_offset / _buffered_partitions / _commit_every "
    "/ _n_acked / _add_gap / _to_message (what _drain_messages and getmany use per record)",
    "faust.transport.consumer.Consumer.ack's bookkeeping: _committed_offset / _acked_index / _acked / _n_acked "
    "/ _unacked_messages / _waiting_for_ack under faust.types.tuples.ack_lock (acking a batch's offsets)",
    "faust.transport.drivers.aiokafka.AIOKafkaConsumerThread._seek_wait (Consumer.seek_wait: seeks in the consumer "
    "thread and sets _read_offset, the read offset the batch delivery filters with)",
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


# --- batch delivery (streams.runtime.delivery) -----------------------------------------------------------------


def replace_drain_messages(consumer: Any, drain_messages: Callable[[Any], Awaitable[None]]) -> None:
    """Make ``consumer``'s Fetcher run ``drain_messages(fetcher)`` instead of Faust's ``_drain_messages``.

    An instance attribute shadows the class's method for this consumer only; the Fetcher service calls it
    through the instance (``consumer._drain_messages(self)``).
    """
    consumer._drain_messages = drain_messages


async def next_records(consumer: Any, timeout: float) -> tuple[Any, Any]:
    """One fetch: ``(records by TP or None, active partitions or None)``, as ``Consumer.getmany`` gets them."""
    return await consumer._wait_next_records(timeout)  # type: ignore[no-any-return]


def read_offsets(consumer: Any) -> MutableMapping[Any, int | None]:
    """The consumer's last delivered offset per TP (a defaultdict of None); Faust's seek resets it."""
    offsets: MutableMapping[Any, int | None] = consumer._read_offset
    return offsets


def buffered_partitions(consumer: Any) -> Any:
    """TPs whose stream buffer is full: already fetched records of them are still delivered."""
    return consumer._buffered_partitions


def commit_every(consumer: Any) -> int | None:
    """``broker_commit_every`` as the consumer holds it."""
    value: int | None = consumer._commit_every
    return value


async def seek_and_wait(consumer: Any, tp: Any, offset: int) -> None:
    """Seek ``tp`` to ``offset`` in the consumer's thread (``Consumer.seek_wait``), which also sets the read
    offset there, and wait until the position is known."""
    await consumer.seek_wait({tp: offset})


def take_acked_count(consumer: Any, limit: int) -> bool:
    """True (and the count reset) once ``limit`` offsets were acked since the last such commit."""
    if consumer._n_acked >= limit:
        consumer._n_acked = 0
        return True
    return False


async def add_gap(consumer: Any, tp: Any, offset_from: int, offset_to: int) -> None:
    """Record offsets ``offset_from..offset_to`` (inclusive) as never delivered, so commits may pass them."""
    await consumer._add_gap(tp, offset_from, offset_to)


def to_message(consumer: Any, tp: Any, record: Any) -> Any:
    """The ``ConsumerMessage`` Faust builds from an aiokafka record."""
    return consumer._to_message(tp, record)


def ack_offsets(consumer: Any, message: Any, offsets: Iterable[int]) -> bool:
    """``Consumer.ack`` for every offset in ``offsets`` of ``message``'s TP, at once; True if any was new.

    The same bookkeeping as ``Consumer.ack`` does for one message (under the same lock): an offset at or above the
    committed one joins the TP's acked offsets unless it is there already, counts towards ``broker_commit_every``,
    and ``wait_empty`` is woken.
    """
    with ack_lock:
        message.acked = True
        consumer._unacked_messages.discard(message)
        tp = message.tp
        added = 0
        try:
            if consumer.app.topics.acks_enabled_for(message.topic):
                committed = consumer._committed_offset[tp]
                acked_index = consumer._acked_index[tp]
                acked = consumer._acked[tp]
                for offset in offsets:
                    if (committed is None or offset >= committed) and offset not in acked_index:
                        acked_index.add(offset)
                        acked.append(offset)
                        added += 1
                consumer._n_acked += added
        finally:
            notify(consumer._waiting_for_ack)
        return added > 0


def new_write_batch(store: Any) -> Any:
    """An empty RocksDB write batch of the binding ``store`` uses (rocksdict in raw mode, or python-rocksdb)."""
    if store.use_rocksdict:
        import rocksdict

        return rocksdict.WriteBatch(raw_mode=True)
    import rocksdb  # type: ignore[import-not-found]

    return rocksdb.WriteBatch()
