"""Delivery of fetched records to the agent as one message per topic-partition batch, for chosen topics.

Faust's consumer hands every record to the conductor on its own (its ``_drain_messages`` loop): a
``wait_first(callback(message), suspend_flow.wait())`` per record (four tasks, an ``asyncio.wait``, three
cancellations), the conductor's lock and flow control, a queue put, and in the stream a ``sleep(0)``, a queue get,
sensor calls and an ack. That chain costs several times what the worker does with a record. :func:`install`
replaces ``_drain_messages`` on one app's consumer with :func:`drain`, which does what Faust's does, except that
for the ``batched`` topics (RAW and ticks) the records one fetch returned for a topic-partition travel as one
:class:`BatchMessage`: one flow-control wait, one conductor call, one stream step and one ack per batch.

Kept per record, as in Faust: the read offset (a record below it is dropped, as after a seek), gaps (an offset
skipped by the fetch is recorded so commits can pass it), and the generation check (a batch is built only while
the consumer generation of the fetch is current; the stream drops a batch of an older generation, as it drops a
message). Acknowledging a :class:`BatchMessage` acknowledges every offset in it, with ``Consumer.ack``'s
bookkeeping (:func:`streams.runtime.internals.ack_offsets`), so commits advance exactly as if each record had
been acked, and never past a batch still being processed. The agent acknowledges a batch itself (it iterates its
stream without Faust's acks): Faust's compiled stream iterator acks a message by inlining ``Consumer.ack`` for its
one offset, which a batch must not rely on.

Rebalances stay safe the way Faust makes them safe: on revocation Faust stops the flow (the ``wait_first`` above
returns), clears the agents' queues (batches not yet started are dropped, never acked, and re-fetched from the
committed offset by whoever owns the partition next) and waits until every message a stream has taken is acked
(``stream_wait_empty``): the batch the agent is processing is finished, its outputs sent and its offsets acked
before the partitions go. A crash mid-batch leaves its offsets unacked, so the whole batch is delivered again
(S10: the same transitions are sent again, identical).

Faust's rebalance is not airtight, though (nor is its per-record path): the seek to the committed offsets runs in
the consumer's thread while the drain delivers a batch fetched before it, which the flow's resumption then clears
from the agent's queue. The drain keeps a read offset a seek set during the delivery (Faust would overwrite it
with the batch's last offset and drop the records fetched again), but the fetch position may also stay past the
cleared batch. So the agent admits every batch through a :class:`Sequencer`: a batch starting beyond the next
offset of its partition not processed yet is released and the partition seeked back to that offset; what the
partition's fetches returned before that seek does not move its read offset.

The table's changelog is batched the same way: Faust's recovery (the restore of active partitions and the
standby replicas) then takes one event per fetched batch instead of one per record, each with its own
``wait_for`` on the recovery queue, and :mod:`streams.runtime.table` writes each batch's records to RocksDB at
once. Every other topic keeps Faust's per-record path below, line for line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from faust.transport.consumer import CONSUMER_FETCHING
from faust.types import ConsumerMessage

from streams.runtime import internals

log = logging.getLogger(__name__)

#: Faust's per-record path gives the loop a turn every this many records.
_YIELD_EVERY = 100


class BatchMessage(ConsumerMessage):
    """The records one fetch returned for one topic-partition, delivered as one message.

    ``records`` are aiokafka's ``ConsumerRecord`` objects in offset order. The agent that processes the batch
    acknowledges it itself: :meth:`acknowledge` acks every offset once everything the batch caused is handed to
    Kafka, :meth:`release` acks none (processing stopped part-way: the records are delivered again). Faust's own
    ack of a message (``Message.ack``, or the compiled stream iterator's inlined copy of ``Consumer.ack``, which
    never calls a message's methods) acks one offset; it reaches a batch only for a batch the stream drops (a
    stale generation), so on an acked topic ``offset`` is the first record's: that drop then acks what it would
    for one message. Elsewhere (the changelog) it is the last record's: Faust's recovery takes a message's offset
    as the position read up to.
    """

    __slots__ = ("records", "fetched_after")

    def __init__(
        self,
        tp: Any,
        records: list[Any],
        generation_id: int | None,
        acked: bool = True,
        fetched_after: int = 0,
    ) -> None:
        which = records[0] if acked else records[-1]
        timestamp: Any = None if which.timestamp is None else which.timestamp / 1000.0
        super().__init__(
            tp.topic,
            tp.partition,
            which.offset,
            timestamp,
            which.timestamp_type,
            None,
            None,
            None,
            None,
            0,
            0,
            tp,
            generation_id=generation_id,
        )
        self.records = records
        #: How many of :class:`Sequencer`'s seeks of ``tp`` had completed when the fetch that returned the
        #: records began.
        self.fetched_after = fetched_after

    @property
    def offsets(self) -> list[int]:
        return [record.offset for record in self.records]

    def acknowledge(self, consumer: Any) -> bool:
        """Processing finished: every offset of the batch becomes committable, as if each record were acked."""
        if self.acked:
            return False
        return internals.ack_offsets(consumer, self, self.offsets)

    def release(self, consumer: Any) -> None:
        """Processing stopped part-way (cancelled at shutdown, or failed): stop waiting for the batch, ack none
        of its offsets, so a commit never covers records whose outputs were not all sent."""
        if not self.acked:
            internals.ack_offsets(consumer, self, ())

    def on_final_ack(self, consumer: Any) -> bool:
        # Faust's pure-Python ack path (a dropped batch): ack nothing.
        self.release(consumer)
        return False


class Seeks:
    """The seeks a :class:`Sequencer` made, counted per topic-partition: a delivery of records of a partition
    fetched before its last seek does not move the partition's read offset."""

    def __init__(self) -> None:
        self._completed: dict[Any, int] = {}

    def of(self, tp: Any) -> int:
        """How many seeks of ``tp`` have completed."""
        return self._completed.get(tp, 0)

    def done(self, tp: Any) -> int:
        """Count a completed seek of ``tp``; return the new count."""
        count = self._completed[tp] = self.of(tp) + 1
        return count

    def snapshot(self) -> dict[Any, int]:
        """The counts now (a fetch's records of a partition predate any seek of it counted later)."""
        return dict(self._completed)


class Sequencer:
    """Keeps what the agent processes of each batched partition contiguous: no batch starting beyond the next offset
    the agent has not processed yet (S10).

    The processor applies a partition's records in offset order and takes a record at or below a user's applied
    offset for a redelivery. A record skipped while a later one of the same partition is applied is therefore lost
    for good, even after a restart delivers it again. Faust's delivery can skip records: a batch fetched before the
    seek to the committed offsets that ends a rebalance may be queued, then dropped when the flow resumes (the
    agents' queues are cleared), while the delivery's read offset is set past it after the seek (the seek and the
    fetch run in the consumer's thread, the delivery in the app's loop) or the fetch position stays past it; and
    a batch whose processing failed is not delivered again while the later ones are.

    So a batch starting beyond the next offset expected (after the last batch processed in this generation, else
    the committed offset) is not processed: the partition is seeked back to that offset, batches fetched before the
    seek are released too, and the records are delivered again. A batch fetched after that seek and still starting
    beyond it is processed: those offsets are not in the log (removed by retention, or transaction markers).
    """

    def __init__(self, seeks: Seeks) -> None:
        self._seeks = seeks
        # TP -> (generation, next offset to process) after the last batch processed.
        self._next: dict[Any, tuple[int | None, int]] = {}
        # TP -> (generation, offset seeked to, seek count once done; None while it runs).
        self._seeking: dict[Any, tuple[int | None, int, int | None]] = {}

    def expected(self, consumer: Any, batch: BatchMessage) -> int | None:
        """The next offset of ``batch``'s partition to process (None: any, nothing known yet)."""
        known = self._next.get(batch.tp)
        if known is not None and known[0] == batch.generation_id:
            return known[1]
        return internals.committed_offset(consumer, batch.tp)

    async def admit(self, consumer: Any, batch: BatchMessage) -> bool:
        """Whether to process ``batch`` now; if not, the caller releases it (its records come again)."""
        tp = batch.tp
        first = batch.records[0].offset
        expected = self.expected(consumer, batch)
        if expected is None or first <= expected:
            return True
        seeking = self._seeking.get(tp)
        if seeking is not None and seeking[:2] == (batch.generation_id, expected):
            done = seeking[2]
            if done is not None and batch.fetched_after >= done:
                log.warning(
                    "offsets missing from the log after a seek back: processing from the first one present",
                    extra={
                        "topic": tp.topic,
                        "partition": tp.partition,
                        "expected": expected,
                        "first": first,
                    },
                )
                return True
            return False  # fetched before the seek back: the records come again
        self._seeking[tp] = (batch.generation_id, expected, None)
        log.warning(
            "records skipped by the delivery: seeking back to the next offset to process",
            extra={"topic": tp.topic, "partition": tp.partition, "expected": expected, "first": first},
        )
        try:
            await internals.seek_and_wait(consumer, tp, expected)
        except Exception:
            # Revoked meanwhile, or the consumer is stopping: the partition's next owner starts at the commit.
            log.warning(
                "seeking back failed", exc_info=True, extra={"topic": tp.topic, "partition": tp.partition}
            )
            self._seeking.pop(tp, None)
            return False
        # In one step with counting the seek: a delivery of an earlier fetch that moved the read offset past
        # ``expected`` meanwhile would make the drain drop the records fetched again.
        internals.read_offsets(consumer)[tp] = expected
        self._seeking[tp] = (batch.generation_id, expected, self._seeks.done(tp))
        return False

    def processed(self, batch: BatchMessage) -> None:
        """``batch`` was processed whole: its partition continues after its last record."""
        self._next[batch.tp] = (batch.generation_id, batch.records[-1].offset + 1)
        self._seeking.pop(batch.tp, None)


def install(consumer: Any, batched: Iterable[str]) -> Seeks:
    """Make ``consumer`` (one app's Faust consumer) deliver the ``batched`` topics' records as batches; return the
    seek count a :class:`Sequencer` of the same consumer must share."""
    topics = frozenset(batched)
    seeks = Seeks()

    async def drain_messages(fetcher: Any) -> None:
        await drain(consumer, fetcher, topics, seeks)

    internals.replace_drain_messages(consumer, drain_messages)
    return seeks


async def drain(consumer: Any, fetcher: Any, batched: frozenset[str], seeks: Seeks | None = None) -> None:
    """Faust's ``_drain_messages`` (faust-streaming 0.15.3), with batches for the ``batched`` topics."""
    app = consumer.app
    seeks = Seeks() if seeks is None else seeks
    set_flag = consumer.diag.set_flag
    unset_flag = consumer.diag.unset_flag
    try:
        while not (consumer.should_stop or fetcher.should_stop):
            set_flag(CONSUMER_FETCHING)
            # Faust sleeps here too: a getmany loop must give other coroutines a turn.
            await consumer.sleep(0)
            if consumer.should_stop:
                continue
            fetched_after = seeks.snapshot()
            records, active = await internals.next_records(consumer, 1.0)
            if records is None or consumer.should_stop:
                continue
            if not consumer.flow_active:
                # As Consumer.getmany: records fetched while the flow is stopped (a rebalance) are not delivered;
                # the fetcher is moved back to the committed offsets.
                try:
                    await consumer.perform_seek()
                except Exception as exc:
                    log.warning("seek after a fetch while the flow was stopped failed: %r", exc)
                continue
            await _deliver(consumer, app, records, active, batched, seeks, fetched_after)
            unset_flag(CONSUMER_FETCHING)
    except consumer.consumer_stopped_errors:
        if app.should_stop:
            log.info("Broker stopped consumer, shutting down...")
            return
        raise
    except asyncio.CancelledError:
        if app.should_stop:
            log.info("Consumer shutting down for user cancel.")
            return
        raise
    except Exception as exc:
        log.exception("Drain messages raised: %r", exc)
        raise
    finally:
        unset_flag(CONSUMER_FETCHING)


async def _deliver(
    consumer: Any,
    app: Any,
    records: Any,
    active: Any,
    batched: frozenset[str],
    seeks: Seeks,
    fetched_after: dict[Any, int],
) -> None:
    generation_id = app.consumer_generation_id
    buffered = internals.buffered_partitions(consumer)
    for tp, tp_records in records.items():
        if not consumer.flow_active or app.consumer_generation_id != generation_id:
            return
        if not (active is None or tp in active or tp in buffered):
            continue
        app.monitor.track_tp_end_offset(tp, consumer.highwater(tp))
        if tp.topic in batched:
            await _deliver_batch(
                consumer, app, tp, tp_records, generation_id, seeks, fetched_after.get(tp, 0)
            )
        else:
            await _deliver_each(consumer, app, tp, tp_records, generation_id)


async def _deliver_batch(
    consumer: Any,
    app: Any,
    tp: Any,
    tp_records: list[Any],
    generation_id: int,
    seeks: Seeks,
    fetched_after: int,
) -> None:
    read_offsets = internals.read_offsets(consumer)
    acks_enabled = app.topics.acks_enabled_for(tp.topic)
    read = started = read_offsets[tp]
    kept: list[Any] = []
    for record in tp_records:
        offset = record.offset
        if read is None or offset >= read:
            # Faust's gap rule, applied to each record against the one delivered before it.
            if read and offset - read > 1 and acks_enabled:
                await internals.add_gap(consumer, tp, read + 1, offset)
            kept.append(record)
            read = offset
        else:
            log.debug("dropped a record below the read offset: %s@%d", tp, offset)
    if not kept:
        return
    await _maybe_commit(consumer)
    batch = BatchMessage(tp, kept, generation_id, acked=acks_enabled, fetched_after=fetched_after)
    await consumer.wait_first(consumer.callback(batch), consumer.suspend_flow.wait())
    # The read offset moves past the batch only if nothing seeked the partition since the fetch began: a seek
    # (Faust's to the committed offsets, or a Sequencer's) fetches records again from where it seeked to, and a
    # read offset past them would drop them. The batch itself is delivered either way (dropping fetched records
    # would leave the fetch position past them); the agent's Sequencer decides whether it is processed.
    if (
        seeks.of(tp) == fetched_after
        and app.consumer_generation_id == generation_id
        and read_offsets.get(tp) == started
    ):
        read_offsets[tp] = kept[-1].offset


async def _deliver_each(consumer: Any, app: Any, tp: Any, tp_records: list[Any], generation_id: int) -> None:
    # Faust's own per-record loop (Consumer.getmany and the ``_drain_messages`` loop), for the other topics.
    read_offsets = internals.read_offsets(consumer)
    callback = consumer.callback
    for since_yield, record in enumerate(tp_records, start=1):
        if not consumer.flow_active or app.consumer_generation_id != generation_id:
            return
        if since_yield % _YIELD_EVERY == 0:
            await asyncio.sleep(0)
        message = internals.to_message(consumer, tp, record)
        offset = message.offset
        read = read_offsets[tp]
        if read is None or offset >= read:
            gap = offset - (read or 0)
            if gap > 1 and read and app.topics.acks_enabled_for(message.topic):
                await internals.add_gap(consumer, tp, read + 1, offset)
            await _maybe_commit(consumer)
            await consumer.wait_first(callback(message), consumer.suspend_flow.wait())
            read_offsets[tp] = offset


async def _maybe_commit(consumer: Any) -> None:
    every = internals.commit_every(consumer)
    if every is not None and internals.take_acked_count(consumer, every):
        await consumer.commit()
