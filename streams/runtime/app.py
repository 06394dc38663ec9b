"""The Faust app: topics, the users table, the agent, the query API and the lag monitor, wired together.

``create_app(settings)`` builds everything on a fresh ``faust.App``; nothing happens at import time and nothing
connects until the app runs. The agent only decodes, calls :class:`streams.processor.Processor` and sends what
it returns. The pieces live beside this module: the table (:mod:`.table`), the commit fix (:mod:`.fixes`), the
query views (:mod:`.views`), readiness and lag (:mod:`.progress`); every private Faust or aiokafka name used is
in :mod:`.internals`.

Processing guarantee (S10): at-least-once with identical repeats. Faust flushes the producer (table changelog,
TRANSITIONS, STATE) before it commits an offset, and the flush waits for Kafka's acknowledgement of every
message sent so far (:mod:`.fixes`), so a crash re-delivers every message whose outputs may be missing.
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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import faust

from core.contract import GapMarker, Observation
from streams.checkonline import (
    ReconcileMetrics,
    Reconciler,
    client_from_settings,
    publish_observation,
    queue_from_settings,
)
from streams.config import WorkerSettings
from streams.metrics import WorkerMetrics
from streams.processor import Outgoing, Processor
from streams.reconcile import AgePolicy, offer_gap_checks
from streams.runtime import fixes, internals, versions
from streams.runtime.fixes import CommitGate
from streams.runtime.progress import Progress
from streams.runtime.table import UsersTable, create_users_table
from streams.runtime.views import register_views

log = logging.getLogger(__name__)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


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
    processor = Processor(
        table, settings.presence_config(), table.records, metrics, settings.worker_sweep_batch,
        source=settings.worker_app_id,
    )  # fmt: skip
    worker = Worker(app, settings, metrics, processor, table, gate, Progress(metrics))
    _add_agent(worker)
    _add_rebalance_handlers(worker)
    _add_ticker(worker)
    _add_reconciler(worker)
    register_views(
        app, settings, table, metrics, is_ready=lambda: worker.progress.ready and not app.rebalancing,
        reconciler=worker.reconciler,
    )  # fmt: skip
    return worker


def _add_agent(worker: Worker) -> None:
    app, settings, processor, table = worker.app, worker.settings, worker.processor, worker.table
    source = app.topic(
        settings.topic_raw, settings.ticks_topic, key_serializer="raw", value_serializer="raw", internal=False
    )
    out_topics = {
        "transitions": settings.topic_replay_transitions or settings.topic_transitions,
        "state": settings.topic_state,
        "dlq": settings.topic_dlq,
    }

    async def send_all(outgoing: list[Outgoing]) -> None:
        # Straight to the Kafka client: Faust's Topic.send costs several times the client's own send per
        # message. Each send is held against the next offset commit like the table's changelog writes.
        client = internals.kafka_client(app.producer)
        await table.flush_changelog(client)
        for message in outgoing:
            sent = await client.send(
                out_topics[message.topic], message.value, key=message.key, headers=message.headers
            )
            worker.gate.hold(sent)

    @app.agent(source, concurrency=1, name="presence")
    async def process(stream: Any) -> None:
        async for event in stream.events():
            message = event.message
            now = _now_ms()
            table.partition = message.partition
            try:
                if message.topic == settings.ticks_topic:
                    outgoing = processor.on_tick(message.partition, message.offset, now)
                else:
                    outgoing = processor.on_raw(
                        message.partition, message.offset, message.key, message.value, now
                    )
            except Exception:
                # A bug, not bad input (bad input goes to the DLQ): count it; Faust restarts the agent and the
                # uncommitted message is processed again.
                worker.metrics.processing_errors.inc()
                log.exception(
                    "processing failed",
                    extra={"topic": message.topic, "partition": message.partition, "offset": message.offset},
                )
                raise
            await send_all(outgoing)
            if message.topic != settings.ticks_topic:
                worker.progress.processed(message.partition, message.offset, message.timestamp / 1000)


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

    async def scan_gap(partition: int, marker: GapMarker) -> None:
        """One pass over the partition's records, pausing every few hundred so the agent keeps going."""
        ranked: list[tuple[str, int]] = []
        try:
            for n, (userid, rank) in enumerate(
                worker.processor.gap_candidates(partition, marker, lookback_ms)
            ):
                if rank is not None:
                    ranked.append((userid, rank))
                if n % 500 == 499:
                    await asyncio.sleep(0)
        except Exception:
            # The partition may have been revoked (its store closed) meanwhile; its new owner reads the marker.
            log.warning("scanning for an intake gap stopped", exc_info=True, extra={"partition": partition})
            return
        queued = offer_gap_checks(reconciler, marker.id, marker.end, ranked)
        log.info(
            "intake gap: users queued for a check",
            extra={"gap": marker.id, "reason": marker.reason, "partition": partition,
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
        for partition, marker in worker.processor.take_gaps():
            task = asyncio.create_task(scan_gap(partition, marker))
            scans.add(task)
            task.add_done_callback(scans.discard)
