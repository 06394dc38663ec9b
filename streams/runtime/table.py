"""The users table: Faust's RocksDB store, written directly, with its changelog sent by the worker itself.

Faust's table would send every write through its producer buffer and look every key up twice. :class:`UsersTable`
does what a table write does, directly: write the partition's RocksDB, queue the changelog message (sent by
:meth:`UsersTable.flush_changelog` after each message, held against the next offset commit), and record the
changelog offset in RocksDB once Kafka acknowledges it, which is where a warm restart resumes reading. The
partition written is the one of the message being processed (``partition``), as in Faust.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, MutableMapping, Sequence
from typing import Any

from core.contract import USERS_TABLE
from streams.config import WorkerSettings
from streams.envelope import Headers
from streams.runtime import internals
from streams.runtime.fixes import CommitGate


def create_users_table(app: Any, settings: WorkerSettings) -> Any:
    """Register the users table on ``app``: raw bytes keys and values, RocksDB sized by the settings."""
    users = app.Table(
        USERS_TABLE,
        default=None,
        partitions=settings.topic_partitions,
        recovery_buffer_size=CHANGELOG_BUFFER,
        standby_buffer_size=CHANGELOG_BUFFER,
        key_type=bytes,
        value_type=bytes,
        options={
            "block_cache_size": settings.worker_rocksdb_block_cache_bytes,
            "block_cache_compressed_size": 0,
            "write_buffer_size": settings.worker_rocksdb_write_buffer_bytes,
            "max_write_buffer_number": 2,
            "max_open_files": settings.worker_rocksdb_max_open_files,
        },
    )
    # Faust takes table serializers from model types only and falls back to JSON, which would quote the keys:
    # '"u1"' hashes to another partition than 'u1', and standby/recovery would try to JSON-decode records.
    # Keys are the raw userid bytes, as on RAW; records are already encoded by the processor. The changelog
    # topic object was built with the JSON defaults when the table registered itself, so build it again.
    users.key_serializer = "raw"
    users.value_serializer = "raw"
    users.changelog_topic = internals.rebuild_changelog_topic(users)
    _apply_changelog_batches(users)
    return users


#: Changelog batches (one per fetched partition batch, see :mod:`streams.runtime.delivery`) Faust's recovery
#: collects before it applies them; each holds up to a whole fetch of records.
CHANGELOG_BUFFER = 4


def _apply_changelog_batches(users: Any) -> None:
    """Make ``users`` restore changelog records delivered in batches, one RocksDB write batch per partition.

    With batch delivery of the changelog, Faust's recovery (active restore and standby replicas alike) sees one
    event per fetched partition batch: it tracks the batch's last offset as read, buffers the event and hands the
    buffer to ``Table.apply_changelog_batch``, replaced here for this table only to write every record of every
    batch (a tombstone deletes) and persist each partition's last offset, as Faust's own method does per record.
    """
    store = users.data
    original = users.apply_changelog_batch

    def apply_changelog_batch(events: Iterable[Any]) -> None:
        plain: list[Any] = []
        batches: dict[int, Any] = {}
        offsets: dict[Any, int] = {}
        for event in events:
            message = event.message
            records = getattr(message, "records", None)
            if records is None:
                plain.append(event)  # delivered one by one (not expected with batch delivery; kept correct)
                continue
            batch = batches.get(message.partition)
            if batch is None:
                batch = batches[message.partition] = internals.new_write_batch(store)
            for record in records:
                if record.value is None:
                    batch.delete(record.key)
                else:
                    batch.put(record.key, record.value)
            offsets[message.tp] = max(records[-1].offset, offsets.get(message.tp, -1))
        if plain:
            original(plain)
        for partition, batch in batches.items():
            internals.partition_db(store, partition).write(batch)
        for tp, offset in offsets.items():
            store.set_persisted_offset(tp, offset)

    users.apply_changelog_batch = apply_changelog_batch


class UsersTable(MutableMapping[str, Any]):
    """The users table seen as a plain ``MutableMapping[str, bytes]`` (keys stored as UTF-8 bytes)."""

    def __init__(self, table: Any, gate: CommitGate) -> None:
        self._table = table
        self._store = table.data
        self._gate = gate
        self.changelog = table.changelog_topic.get_topic_name()
        self.partition = 0
        self._pending: list[tuple[bytes, bytes | None, int]] = []
        # The open batch's writes (key -> value, None for a deletion), read before the partition's RocksDB.
        self._overlay: dict[bytes, bytes | None] | None = None
        self._db: Any = None

    # --- batches ----------------------------------------------------------------------------------------------

    def begin_batch(self, partition: int) -> None:
        """Collect the writes that follow (all of ``partition``) in memory; reads see them first."""
        self.partition = partition
        self._db = internals.partition_db(self._store, partition)
        self._overlay = {}

    def end_batch(self) -> int:
        """Write the batch to the partition's RocksDB at once and queue one changelog record per key written.

        Each key's changelog record is its last value in the batch, so a warm or cold restore ends where this
        write ends. Returns the number of keys written.
        """
        overlay, self._overlay = self._overlay, None
        if overlay is None:
            return 0
        batch = internals.new_write_batch(self._store)
        index = internals.key_index(self._store)
        partition = self.partition
        pending = self._pending
        for raw, value in overlay.items():
            if value is None:
                batch.delete(raw)
                index.pop(raw, None)
            else:
                batch.put(raw, value)
                index[raw] = partition
            pending.append((raw, value, partition))
        self._db.write(batch)
        return len(overlay)

    def abort_batch(self) -> None:
        """Forget the open batch's writes (processing failed; the batch will be delivered again)."""
        self._overlay = None

    # --- mapping ----------------------------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        raw = key.encode()
        overlay = self._overlay
        if overlay is not None:
            value = overlay[raw] if raw in overlay else self._db.get(raw)
        else:
            value = self._store.get(raw)
        return default if value is None else value

    def __getitem__(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        raw = key.encode()
        if self._overlay is not None:
            self._overlay[raw] = value
            return
        internals.partition_db(self._store, self.partition).put(raw, value)
        internals.key_index(self._store)[raw] = self.partition
        self._pending.append((raw, value, self.partition))

    def __delitem__(self, key: str) -> None:
        raw = key.encode()
        if self._overlay is not None:
            self._overlay[raw] = None
            return
        internals.partition_db(self._store, self.partition).delete(raw)
        internals.key_index(self._store).pop(raw, None)
        self._pending.append((raw, None, self.partition))

    def pop(self, key: str, default: Any = None) -> Any:
        value = self.get(key)
        if value is None:
            return default
        del self[key]
        return value

    def __iter__(self) -> Iterator[str]:
        return (key.decode() for key in self._table.keys())

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def records(self, partition: int) -> Iterator[tuple[str, bytes]]:
        """One partition's (key, value) pairs, read straight from that partition's RocksDB.

        Faust's own iteration covers every partition's database and a lookup per key would follow; this is one
        sequential scan of the partition asked for.
        """
        for key, value in internals.partition_items(self._store, partition):
            yield key.decode(), value

    async def flush_changelog(self, client: Any) -> list[Any]:
        """Send the queued changelog messages with ``client`` (an ``aiokafka.AIOKafkaProducer``), one batch per
        partition, each held against the next offset commit; the partition's changelog offset is persisted in
        RocksDB once Kafka acknowledges it (where a warm restart resumes reading). Returns the futures held."""
        held: list[Any] = []
        if not self._pending:
            return held
        by_partition: dict[int, list[tuple[bytes | None, bytes | None, Headers | None]]] = {}
        for key, value, partition in self._pending:
            by_partition.setdefault(partition, []).append((key, value, None))
        self._pending.clear()
        for partition, messages in by_partition.items():
            for sent, count in await send_batches(client, self.changelog, partition, messages):
                self._gate.hold(sent)
                held.append(sent)
                sent.add_done_callback(functools.partial(self._persist_offset, count))
        return held

    def _persist_offset(self, count: int, sent: Any) -> None:
        if not sent.cancelled() and sent.exception() is None:
            metadata = sent.result()
            # A batch's future carries the offset of its first record.
            self._store.set_persisted_offset(metadata.topic_partition, metadata.offset + count - 1)


async def send_batches(
    client: Any,
    topic: str,
    partition: int,
    messages: Sequence[tuple[bytes | None, bytes | None, Headers | None]],
) -> list[tuple[Any, int]]:
    """Hand ``messages`` (key, value, headers) to ``client`` as produce batches for one partition, in order.

    Returns each batch's future (resolved with the first record's metadata on acknowledgement) and its size.
    Appending to a batch costs a fraction of ``send()`` per message.
    """
    sent: list[tuple[Any, int]] = []
    batch = client.create_batch()
    count = 0
    for key, value, headers in messages:
        if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
            if count == 0:
                raise ValueError(f"a message of {len(value or b'')} bytes does not fit in a produce batch")
            sent.append((await client.send_batch(batch, topic, partition=partition), count))
            batch = client.create_batch()
            count = 0
            if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                raise ValueError(f"a message of {len(value or b'')} bytes does not fit in a produce batch")
        count += 1
    if count:
        sent.append((await client.send_batch(batch, topic, partition=partition), count))
    return sent
