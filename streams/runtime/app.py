"""The Faust app: topics, the users table, the agent, the query API and the lag monitor, wired together.

``create_app(settings)`` builds everything on a fresh ``faust.App``; nothing happens at import time and nothing
connects until the app runs. The agent takes RAW and ticks one fetched partition batch at a time
(:mod:`.delivery`), has :class:`streams.processor.Processor` process the batch over the table's overlay, writes
the table once, sends what it returned in produce batches and acknowledges the batch's offsets. The pieces live
beside this module: the batch delivery (:mod:`.delivery`), the table (:mod:`.table`), the commit fix
(:mod:`.fixes`), the query views (:mod:`.views`), readiness and lag (:mod:`.progress`); every private Faust or
aiokafka name used is in :mod:`.internals`.

Processing guarantee (S10): at-least-once with identical repeats. Faust flushes the producer (table changelog,
TRANSITIONS, STATE) before it commits an offset, and the flush waits for Kafka's acknowledgement of every
message sent so far (:mod:`.fixes`), and a batch's offsets are acknowledged only once all it caused is handed
to the client, so a crash re-delivers every record whose outputs may be missing.
Re-applying such a message either recomputes the same transitions from the same record (same epoch, seq and
content), or finds the event already applied and re-sends the transitions it caused from the record's memory.
``emitted_at`` is the only field that may differ in a repeat.

Reconciliation (docs/reconciliation.md), when active: a checker task asks RongCloud about the users the stream
doubts, within this worker's share of the deployment's budget (its share of the partitions, resized on every
rebalance), and publishes each answer to RAW with the worker's own producer; the agent applies it like an event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import faust

from core.contract import GapMarker, Observation, partition_of
from streams.checkonline import (
    ReconcileMetrics,
    Reconciler,
    client_from_settings,
    publish_observation,
    queue_from_settings,
)
from streams.config import WorkerSettings
from streams.envelope import Headers
from streams.metrics import WorkerMetrics
from streams.processor import MAX_TRANSITIONS_PER_RECORD, TICK, Outgoing, Processor, TransitionTally
from streams.reconcile import AgePolicy, GapGroups, offer_gap_checks
from streams.runtime import delivery, fixes, internals, versions
from streams.runtime.delivery import BatchMessage
from streams.runtime.fixes import CommitGate
from streams.runtime.progress import Progress
from streams.runtime.table import UsersTable, create_users_table, send_batches
from streams.runtime.views import register_views

log = logging.getLogger(__name__)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


#: Batches queued for the agent (and changelog batches for the table's recovery) before fetching pauses.
STREAM_BUFFER_BATCHES = 64


def faust_broker_options(settings: WorkerSettings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "broker": [f"kafka://{server}" for server in settings.kafka_bootstrap_servers.split(",")],
    }
    context = settings.ssl_context()
    if settings.kafka_security_protocol.startswith("SASL"):
        assert settings.kafka_sasl_password is not None  # noqa: S101 - enforced by the settings validator
        options["broker_credentials"] = faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password.get_secret_value(),
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=context,
        )
    elif context is not None:
        options["broker_credentials"] = faust.SSLCredentials(context)
    return options


def new_faust_app(settings: WorkerSettings) -> faust.App:
    """The bare ``faust.App`` with the worker's settings (no topics, tables or agents yet)."""
    return faust.App(
        settings.worker_app_id,
        **faust_broker_options(settings),
        store="rocksdb://",
        datadir=str(settings.worker_data_dir),
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication_factor,
        # The worker's own topics are made (or, with PRESENCE_TOPIC_CREATE=false, checked) before the app starts;
        # without Create rights Faust must not try to declare them again.
        topic_allow_declare=settings.topic_create,
        web_enabled=True,
        web_bind=settings.worker_web_bind,
        web_port=settings.worker_web_port,
        canonical_url=settings.canonical_url,
        broker_session_timeout=settings.worker_session_timeout_seconds,
        broker_heartbeat_interval=settings.worker_heartbeat_interval_seconds,
        broker_commit_interval=settings.worker_commit_interval_seconds,
        # Static group membership: a worker back under the same id within the session timeout gets its
        # partitions again without a rebalance of the whole group. None keeps dynamic membership.
        consumer_group_instance_id=settings.worker_group_instance_id,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        # A few milliseconds of batching turn the three or four messages of every event into shared produce
        # requests; without it the client sends a request per message.
        producer_linger=settings.worker_producer_linger_ms / 1000,
        producer_max_batch_size=256 * 1024,
        processing_guarantee="at_least_once",
        table_standby_replicas=1,
        # Recovery waits on the changelog; a worker must not flip to processing with a half-restored table.
        stream_wait_empty=True,
        # The agent's queue counts messages, and a message is a whole fetched batch (streams.runtime.delivery):
        # Faust's default of 4096 would let a backlog park millions of records in memory ahead of the agent.
        stream_buffer_maxsize=STREAM_BUFFER_BATCHES,
        autodiscover=False,
        logging_config=None,
    )


@dataclass
class Worker:
    """Everything ``create_app`` built, for the CLI and the tests."""

    app: faust.App
    settings: WorkerSettings
    metrics: WorkerMetrics
    processor: Processor
    table: UsersTable
    gate: CommitGate
    progress: Progress
    reconciler: Reconciler | None = None


def create_app(settings: WorkerSettings, metrics: WorkerMetrics | None = None) -> Worker:
    """Build the worker's Faust app from settings."""
    versions.check()
    metrics = metrics or WorkerMetrics()
    app = new_faust_app(settings)
    gate = fixes.install(app.producer)
    table = UsersTable(create_users_table(app, settings), gate)
    # RAW and ticks reach the agent, and the table's changelog reaches Faust's recovery (restore and standbys),
    # as one message per fetched topic-partition batch.
    seeks = delivery.install(app.consumer, (settings.topic_raw, settings.ticks_topic, table.changelog))
    processor = Processor(
        table, settings.presence_config(), table.records, metrics, settings.worker_sweep_batch,
        source=settings.worker_app_id,
    )  # fmt: skip
    worker = Worker(app, settings, metrics, processor, table, gate, Progress(metrics))
    _add_agent(worker, delivery.Sequencer(seeks))
    _add_rebalance_handlers(worker)
    _add_ticker(worker)
    _add_reconciler(worker)
    register_views(
        app, settings, table, metrics, is_ready=lambda: worker.progress.ready and not app.rebalancing,
        reconciler=worker.reconciler,
    )  # fmt: skip
    return worker


def _add_agent(worker: Worker, sequencer: delivery.Sequencer) -> None:
    app, settings, processor, table, gate = (
        worker.app,
        worker.settings,
        worker.processor,
        worker.table,
        worker.gate,
    )
    source = app.topic(
        settings.topic_raw, settings.ticks_topic, key_serializer="raw", value_serializer="raw", internal=False
    )
    outputs = Outputs(
        lambda: internals.kafka_client(app.producer),
        gate,
        {
            "transitions": settings.topic_replay_transitions or settings.topic_transitions,
            "state": settings.topic_state,
            "dlq": settings.topic_dlq,
        },
    )
    # Transitions sent per user since every output was last acknowledged (S10, see Processor.on_batch).
    tally = TransitionTally()

    async def send_all(outgoing: list[Outgoing]) -> list[asyncio.Future[Any]]:
        # Straight to the Kafka client, in produce batches per (topic, partition): Faust's Topic.send, and even
        # the client's send(), cost several times an append to a batch. Every batch is held against the next
        # offset commit (the changelog's too), so a commit never covers an output Kafka has not acknowledged.
        client = internals.kafka_client(app.producer)
        sent = await table.flush_changelog(client)
        sent.extend(await outputs.send(outgoing))
        return sent

    async def process_raw(partition: int, records: list[Any], now: int) -> None:
        pending = [(record.offset, record.key, record.value) for record in records]
        start = 0
        while start < len(pending):
            tally.retire()  # what is acknowledged by now no longer counts
            table.begin_batch(partition)
            processor.checkpoint(partition)
            try:
                outgoing, done = processor.on_batch(partition, pending[start:], now, tally)
            except Exception:
                table.abort_batch()
                # The in-memory stream time and sweep index may be ahead of the table now: rebuild them from it.
                processor.rebuild(partition)
                raise
            table.end_batch()
            sent = await send_all(outgoing)
            tally.seal(lambda sent=sent: all(future.done() for future in sent))  # type: ignore[misc]
            start += done
            if start < len(pending):
                # Cut (S10): one user would exceed the transition memory before these are acknowledged.
                await gate.wait()
                tally.clear()
                worker.metrics.batch_cuts.inc()

    async def process_ticks(partition: int, records: list[Any], now: int) -> None:
        # Ticks count in the tally too (S10): a release is a transition like any other. A tick sends at most one
        # per user, after its re-sends if it is the first tick since a (re)assignment; both wait for the
        # acknowledgements the memory needs, as a RAW batch's cut does.
        limit = settings.worker_transition_memory - MAX_TRANSITIONS_PER_RECORD
        if records and processor.starting(partition, TICK):
            await _acknowledged_below(limit)
            table.begin_batch(partition)
            processor.checkpoint(partition)
            try:
                resent = processor.start(partition, TICK, records[0].offset, now)
            except Exception:
                table.abort_batch()
                processor.rebuild(partition)
                raise
            table.end_batch()
            await _send_counted(resent)
        await _acknowledged_below(limit)
        table.begin_batch(partition)
        processor.checkpoint(partition)
        outgoing: list[Outgoing] = []
        try:
            for record in records:
                outgoing.extend(processor.on_tick(partition, record.offset, now))
        except Exception:
            table.abort_batch()
            processor.rebuild(partition)
            raise
        table.end_batch()
        await _send_counted(outgoing)

    async def _acknowledged_below(limit: int) -> None:
        tally.retire()
        if limit >= 0 and tally.top > limit:
            await gate.wait()
            tally.clear()

    async def _send_counted(outgoing: list[Outgoing]) -> None:
        tally.count(outgoing)
        sent = await send_all(outgoing)
        tally.seal(lambda sent=sent: all(future.done() for future in sent))  # type: ignore[misc]

    @app.agent(source, concurrency=1, name="presence")
    async def process(stream: Any) -> None:
        consumer = app.consumer
        # No acks from the stream: a batch is acknowledged here, all its offsets at once (see delivery).
        async for event in stream.noack().events():
            message = event.message
            # RAW and ticks arrive as one BatchMessage per fetched topic-partition (streams.runtime.delivery).
            batch = message if isinstance(message, BatchMessage) else None
            if batch is not None and not await sequencer.admit(consumer, batch):
                # It starts beyond records not processed yet (S10): they are delivered again first.
                batch.release(consumer)
                continue
            records = batch.records if batch is not None else [message]
            now = _now_ms()
            completed = False
            try:
                if message.topic == settings.ticks_topic:
                    await process_ticks(message.partition, records, now)
                else:
                    await process_raw(message.partition, records, now)
                completed = True
            except Exception:
                # A bug, not bad input (bad input goes to the DLQ): count it. Faust restarts the agent; the batch
                # stays unacknowledged, so commits of its partition stop there, and the partition's next batch
                # makes the sequencer seek back to it: it is delivered again before anything after it.
                worker.metrics.processing_errors.inc()
                log.exception(
                    "processing failed",
                    extra={"topic": message.topic, "partition": message.partition, "offset": message.offset},
                )
                raise
            finally:
                if batch is None:
                    await stream.ack(event)
                elif completed:
                    sequencer.processed(batch)
                    batch.acknowledge(consumer)
                else:
                    # Cancelled (shutdown) or failed part-way: released, none of its offsets acknowledged.
                    batch.release(consumer)
            if message.topic != settings.ticks_topic:
                last = records[-1]
                worker.progress.processed(message.partition, last.offset, last.timestamp / 1000)


class Outputs:
    """TRANSITIONS, STATE and DLQ messages handed to the Kafka client in batches per (topic, partition)."""

    def __init__(self, client: Callable[[], Any], gate: CommitGate, topics: dict[str, str]) -> None:
        self._client = client
        self._gate = gate
        self._topics = topics
        self._partitions: dict[str, int] = {}

    async def _partition_count(self, client: Any, topic: str) -> int:
        count = self._partitions.get(topic)
        if count is None:
            count = self._partitions[topic] = len(await client.partitions_for(topic))
        return count

    async def send(self, outgoing: list[Outgoing]) -> list[asyncio.Future[Any]]:
        """Hand ``outgoing`` to the client; return the futures held against the next commit."""
        held: list[asyncio.Future[Any]] = []
        if not outgoing:
            return held
        client = self._client()
        groups: dict[tuple[str, int], list[tuple[bytes | None, bytes | None, Headers | None]]] = {}
        where: dict[tuple[str, bytes], int] = {}
        for message in outgoing:
            topic = self._topics[message.topic]
            if message.key is None:
                # Unkeyed (a dead letter of a keyless record): the client picks the partition.
                sent = await client.send(topic, message.value, headers=message.headers)
                self._gate.hold(sent)
                held.append(sent)
                continue
            partition = where.get((topic, message.key))
            if partition is None:
                count = await self._partition_count(client, topic)
                # The partition Kafka's default partitioner gives the key, as the client's send() would.
                partition = where[(topic, message.key)] = partition_of(message.key, count)
            groups.setdefault((topic, partition), []).append((message.key, message.value, message.headers))
        for (topic, partition), messages in groups.items():
            for sent, _count in await send_batches(client, topic, partition, messages):
                self._gate.hold(sent)
                held.append(sent)
        return held


def _add_rebalance_handlers(worker: Worker) -> None:
    signals: Any = worker.app

    @signals.on_partitions_revoked.connect  # type: ignore[untyped-decorator]
    async def on_revoked(sender: Any, revoked: Iterable[Any], **kwargs: Any) -> None:
        worker.progress.revoked()

    @signals.on_partitions_assigned.connect  # type: ignore[untyped-decorator]
    async def on_assigned(sender: Any, assigned: Iterable[Any], **kwargs: Any) -> None:
        # Stream time, due index and gauges are rebuilt lazily from the (recovered) table per owned partition.
        worker.processor.forget_all()
        worker.progress.assigned(tp.partition for tp in assigned if tp.topic == worker.settings.topic_raw)


def _add_ticker(worker: Worker) -> None:
    app: Any = worker.app
    settings = worker.settings
    ticks_topic = app.topic(
        settings.ticks_topic, key_serializer="raw", value_serializer="raw", internal=False
    )

    @app.timer(settings.worker_tick_interval_seconds)  # type: ignore[untyped-decorator]
    async def tick_and_measure() -> None:
        if app.rebalancing or not app.consumer:
            return
        consumer = app.consumer
        assigned = [tp for tp in consumer.assignment() if tp.topic == settings.topic_raw]
        if not worker.progress.ready and app.tables.recovery.completed.is_set():
            worker.progress.mark_ready()
        if settings.worker_offline_grace_seconds > 0:
            # Idle partitions still release held offlines (S8): a tick per owned partition drives it.
            for tp in assigned:
                await ticks_topic.send(key=None, value=b"tick", partition=tp.partition)
        worker.progress.measure_lag(
            assigned, consumer.highwater, lambda tp: internals.committed_offset(consumer, tp)
        )
        worker.processor.publish_gauges()


def _add_reconciler(worker: Worker) -> None:
    """Reconciliation when active: the checker task, its budget share per rebalance, ``age`` offers on a timer."""
    app: Any = worker.app
    settings = worker.settings
    if not settings.reconcile_active:
        return
    metrics = ReconcileMetrics(worker.metrics.registry)
    # No partitions yet, so no share of the budget: nothing is checked before the first assignment.
    client = client_from_settings(settings, share=0.0, metrics=metrics)

    async def publish(observation: Observation) -> None:
        # The worker's own producer (the agent's client): the observation lands in the user's partition.
        await publish_observation(internals.kafka_client(app.producer), settings.topic_raw, observation)

    reconciler = Reconciler(
        queue_from_settings(settings, share=0.0),
        client,
        publish,
        concurrency=settings.reconcile_concurrency,
        metrics=metrics,
    )
    worker.reconciler = reconciler
    worker.processor.enable_reconciliation(
        reconciler,
        AgePolicy(
            max_silence_ms=int(settings.reconcile_max_silence_seconds * 1000),
            recheck_interval_ms=int(settings.reconcile_recheck_interval_seconds * 1000),
        ),
    )
    signals: Any = worker.app

    @signals.on_partitions_revoked.connect  # type: ignore[untyped-decorator]
    async def pause_checks(sender: Any, revoked: Iterable[Any], **kwargs: Any) -> None:
        reconciler.resize(0, settings.topic_partitions, gap_cap=settings.reconcile_gap_cap)

    @signals.on_partitions_assigned.connect  # type: ignore[untyped-decorator]
    async def take_share(sender: Any, assigned: Iterable[Any], **kwargs: Any) -> None:
        owned = {tp.partition for tp in assigned if tp.topic == settings.topic_raw}
        reconciler.resize(len(owned), settings.topic_partitions, gap_cap=settings.reconcile_gap_cap)

    @app.task  # type: ignore[untyped-decorator]
    async def check_users() -> None:
        try:
            await reconciler.run()
        finally:
            await client.aclose()

    lookback_ms = int(settings.reconcile_gap_lookback_seconds * 1000)
    scans: set[asyncio.Task[None]] = set()

    # Markers of one gap reach this worker's partitions a little apart: ranked together, the gap's cap goes to its
    # most urgent users across all of them.
    gap_groups = GapGroups(settle_ms=int(2 * settings.worker_tick_interval_seconds * 1000))

    async def scan_gap(group: list[tuple[int, GapMarker]]) -> None:
        """One pass over each partition's records, pausing every few hundred so the agent keeps going; then one
        offer of all the gap's candidates, most urgent first."""
        ranked: list[tuple[str, int]] = []
        scanned: list[int] = []
        for partition, marker in group:
            try:
                for n, (userid, rank) in enumerate(
                    worker.processor.gap_candidates(partition, marker, lookback_ms)
                ):
                    if rank is not None:
                        ranked.append((userid, rank))
                    if n % 500 == 499:
                        await asyncio.sleep(0)
                scanned.append(partition)
            except Exception:
                # The partition may have been revoked (its store closed) meanwhile; its new owner reads the marker.
                log.warning(
                    "scanning for an intake gap stopped", exc_info=True, extra={"partition": partition}
                )
        marker = group[0][1]
        queued = offer_gap_checks(reconciler, marker.id, marker.end, ranked)
        log.info(
            "intake gap: users queued for a check",
            extra={"gap": marker.id, "reason": marker.reason, "partitions": scanned,
                   "candidates": len(ranked), "queued": queued},
        )  # fmt: skip

    @app.timer(settings.worker_tick_interval_seconds)  # type: ignore[untyped-decorator]
    async def offer_checks() -> None:
        # Only with the table recovered: the indexes are built from it.
        if app.rebalancing or not app.consumer or not worker.progress.ready:
            return
        owned = [tp.partition for tp in app.consumer.assignment() if tp.topic == settings.topic_raw]
        worker.processor.ensure_indexed(owned)
        # At most what the budget checks in a few ticks; the rest wait in the index, not in the queue.
        worker.processor.age_checks(
            _now_ms(), limit=reconciler.room_for_age(4 * settings.worker_tick_interval_seconds)
        )
        now = _now_ms()
        for partition, marker in worker.processor.take_gaps():
            gap_groups.add(partition, marker, now)
        for group in gap_groups.ready(now):
            task = asyncio.create_task(scan_gap(group))
            scans.add(task)
            task.add_done_callback(scans.discard)
