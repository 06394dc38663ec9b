"""The Faust app: topics, the users table, the agent, the query API and the lag monitor.

``create_app(settings)`` builds everything on a fresh ``faust.App``; nothing happens at import time. The agent
only decodes, calls :class:`streams.processor.Processor` and sends what it returns.

Processing guarantee (S10): at-least-once with identical repeats. Faust flushes the producer (table changelog,
TRANSITIONS, STATE) before it commits an offset, so a crash re-delivers every message whose outputs may be
missing. Re-applying such a message either recomputes the same transitions from the same record (same epoch,
seq and content), or finds the event already applied and re-sends the transitions it caused from the record's
memory. ``emitted_at`` is the only field that may differ in a repeat.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import faust
import orjson
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from core.contract import MAX_QUERY_BATCH, USERS_TABLE, changelog_topic, partition_of
from streams.config import WorkerSettings
from streams.metrics import WorkerMetrics
from streams.processor import Outgoing, Processor, state_of
from streams.runtime import fixes

log = logging.getLogger(__name__)

_ROUTED_HEADER = "X-Presence-Routed"


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


@dataclass
class Worker:
    """Everything ``create_app`` built, for the CLI and the tests."""

    app: faust.App
    settings: WorkerSettings
    metrics: WorkerMetrics
    processor: Processor
    ready: bool = False
    rebalance_started: float | None = None
    last_processed: dict[int, tuple[int, float]] = field(default_factory=dict)


def create_app(settings: WorkerSettings, metrics: WorkerMetrics | None = None) -> Worker:
    """Build the worker's Faust app from settings."""
    fixes.install()
    metrics = metrics or WorkerMetrics()
    rocksdb_options = {
        "block_cache_size": settings.worker_rocksdb_block_cache_bytes,
        "block_cache_compressed_size": 0,
        "write_buffer_size": settings.worker_rocksdb_write_buffer_bytes,
        "max_write_buffer_number": 2,
        "max_open_files": settings.worker_rocksdb_max_open_files,
    }
    app = faust.App(
        settings.worker_app_id,
        **faust_broker_options(settings),
        store="rocksdb://",
        datadir=str(settings.worker_data_dir),
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication_factor,
        topic_allow_declare=True,
        web_enabled=True,
        web_bind=settings.worker_web_bind,
        web_port=settings.worker_web_port,
        canonical_url=settings.canonical_url,
        broker_session_timeout=settings.worker_session_timeout_seconds,
        broker_heartbeat_interval=settings.worker_heartbeat_interval_seconds,
        broker_commit_interval=settings.worker_commit_interval_seconds,
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

    source = app.topic(
        settings.topic_raw,
        settings.ticks_topic,
        key_serializer="raw",
        value_serializer="raw",
        internal=False,
    )
    transitions_topic = app.topic(
        settings.topic_replay_transitions or settings.topic_transitions,
        key_serializer="raw",
        value_serializer="raw",
        internal=False,
    )
    state_topic = app.topic(
        settings.topic_state, key_serializer="raw", value_serializer="raw", internal=False
    )
    dlq_topic = app.topic(settings.topic_dlq, key_serializer="raw", value_serializer="raw", internal=False)
    ticks_topic = app.topic(
        settings.ticks_topic, key_serializer="raw", value_serializer="raw", internal=False
    )
    out_topics = {"transitions": transitions_topic, "state": state_topic, "dlq": dlq_topic}

    users: Any = app.Table(
        USERS_TABLE,
        default=None,
        partitions=settings.topic_partitions,
        key_type=bytes,
        value_type=bytes,
        options=rocksdb_options,
    )
    # Faust takes table serializers from model types only and falls back to JSON, which would quote the keys:
    # '"u1"' hashes to another partition than 'u1', and standby/recovery would try to JSON-decode records.
    # Keys are the raw userid bytes, as on RAW; records are already encoded by the processor. The changelog
    # topic object was built with the JSON defaults when the table registered itself, so build it again.
    users.key_serializer = "raw"
    users.value_serializer = "raw"
    users.changelog_topic = users._new_changelog_topic()
    table = _StrTable(users)
    processor = Processor(
        table, settings.presence_config(), _records_of_partition(users), metrics, settings.worker_sweep_batch
    )
    worker = Worker(app, settings, metrics, processor)
    out_topic_names = {name: topic.get_topic_name() for name, topic in out_topics.items()}

    async def send_all(outgoing: list[Outgoing]) -> None:
        # Straight to the Kafka client: Faust's Topic.send costs several times the client's own send per
        # message. Each send is held against the next offset commit like the table's changelog writes.
        producer: Any = app.producer
        client = producer._ensure_producer()
        await table.flush_changelog(producer, client)
        for message in outgoing:
            sent = await client.send(out_topic_names[message.topic], message.value, key=message.key)
            fixes.hold_commit_until_acked(producer, sent)

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
                metrics.processing_errors.inc()
                log.exception(
                    "processing failed",
                    extra={"topic": message.topic, "partition": message.partition, "offset": message.offset},
                )
                raise
            await send_all(outgoing)
            if message.topic == settings.ticks_topic:
                continue
            worker.last_processed[message.partition] = (message.offset, message.timestamp / 1000)
            if not worker.ready:
                _mark_ready(worker)

    signals: Any = app

    @signals.on_partitions_revoked.connect  # type: ignore[untyped-decorator]
    async def on_revoked(sender: Any, revoked: Iterable[Any], **kwargs: Any) -> None:
        worker.ready = False
        worker.rebalance_started = time.monotonic()
        metrics.ready.set(0)
        metrics.rebalances.inc()

    @signals.on_partitions_assigned.connect  # type: ignore[untyped-decorator]
    async def on_assigned(sender: Any, assigned: Iterable[Any], **kwargs: Any) -> None:
        # Stream time, due index and gauges are rebuilt lazily from the (recovered) table per owned partition.
        processor.forget_all()
        owned = sorted(tp.partition for tp in assigned if tp.topic == settings.topic_raw)
        metrics.assigned_partitions.set(len(owned))
        for partition in list(worker.last_processed):
            if partition not in owned:
                del worker.last_processed[partition]
                metrics.consumer_lag_messages.remove(str(partition))
                metrics.consumer_lag_seconds.remove(str(partition))

    @signals.timer(settings.worker_tick_interval_seconds)  # type: ignore[untyped-decorator]
    async def tick_and_measure() -> None:
        if app.rebalancing or not app.consumer:
            return
        assigned = [tp for tp in app.consumer.assignment() if tp.topic == settings.topic_raw]
        if worker.ready is False and signals.tables.recovery.completed.is_set():
            _mark_ready(worker)
        if settings.worker_offline_grace_seconds > 0:
            # Idle partitions still release held offlines (S8): a tick per owned partition drives it.
            for tp in assigned:
                await ticks_topic.send(key=None, value=b"tick", partition=tp.partition)
        _measure_lag(worker, app, assigned)
        processor.publish_gauges()

    _register_views(worker, users)
    return worker


def _mark_ready(worker: Worker) -> None:
    worker.ready = True
    worker.metrics.ready.set(1)
    if worker.rebalance_started is not None:
        worker.metrics.recovery_seconds.observe(time.monotonic() - worker.rebalance_started)
        worker.rebalance_started = None


def _measure_lag(worker: Worker, app: faust.App, assigned: list[Any]) -> None:
    now = time.time()
    for tp in assigned:
        with contextlib.suppress(Exception):
            highwater = app.consumer.highwater(tp)
            if highwater is None:
                continue
            processed = worker.last_processed.get(tp.partition)
            next_offset = processed[0] + 1 if processed else _committed(app, tp)
            lag = max(0, highwater - next_offset)
            label = str(tp.partition)
            worker.metrics.consumer_lag_messages.labels(label).set(lag)
            # Upper bound of the oldest unprocessed message's age: it was produced after the last processed one.
            age = now - processed[1] if (processed and lag) else 0.0
            worker.metrics.consumer_lag_seconds.labels(label).set(max(0.0, age))


def _committed(app: Any, tp: Any) -> int:
    offset = app.consumer._committed_offset.get(tp)
    return int(offset) + 1 if offset is not None else 0


def _records_of_partition(users: Any) -> Callable[[int], Iterator[tuple[str, bytes]]]:
    """One partition's (key, value) pairs, read straight from that partition's RocksDB.

    Faust's own iteration covers every partition's database and a lookup per key would follow; this is one
    sequential scan of the partition asked for.
    """

    def records(partition: int) -> Iterator[tuple[str, bytes]]:
        store = users.data
        for key, value in store._visible_items(store._db_for_partition(partition)):
            yield key.decode(), value

    return records


class _StrTable(MutableMapping[str, Any]):
    """The users table seen as a plain ``MutableMapping[str, bytes]`` (keys stored as UTF-8 bytes).

    Faust's table would send every write through its producer buffer and look every key up twice; this does
    what a table write does, directly: write the partition's RocksDB, queue the changelog message (sent by
    :meth:`flush_changelog` after each message, held against the next offset commit), and record the changelog
    offset in RocksDB once Kafka acknowledges it, which is where a warm restart resumes reading. The partition
    is the one of the message being processed (``partition``), as in Faust.
    """

    def __init__(self, table: Any) -> None:
        self._table = table
        self._store = table.data
        self._changelog = table.changelog_topic.get_topic_name()
        self.partition = 0
        self._pending: list[tuple[bytes, bytes | None, int]] = []

    def get(self, key: str, default: Any = None) -> Any:
        value = self._store.get(key.encode())
        return default if value is None else value

    def __getitem__(self, key: str) -> Any:
        value = self._store.get(key.encode())
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        raw = key.encode()
        self._store._db_for_partition(self.partition).put(raw, value)
        self._store._key_index[raw] = self.partition
        self._pending.append((raw, value, self.partition))

    def __delitem__(self, key: str) -> None:
        raw = key.encode()
        self._store._db_for_partition(self.partition).delete(raw)
        self._store._key_index.pop(raw, None)
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

    async def flush_changelog(self, producer: Any, client: Any) -> None:
        """Send the queued changelog messages with ``client``, the Kafka client of Faust's ``producer``."""
        for key, value, partition in self._pending:
            sent = await client.send(self._changelog, value, key=key, partition=partition)
            fixes.hold_commit_until_acked(producer, sent)
            sent.add_done_callback(self._persist_offset)
        self._pending.clear()

    def _persist_offset(self, sent: Any) -> None:
        if not sent.cancelled() and sent.exception() is None:
            metadata = sent.result()
            self._store.set_persisted_offset(metadata.topic_partition, metadata.offset)


def _register_views(worker: Worker, users: Any) -> None:
    app: Any = worker.app
    settings = worker.settings
    token = settings.worker_query_token.get_secret_value() if settings.worker_query_token else None
    table = _StrTable(users)
    include_ip = settings.worker_include_client_ip

    def unauthorized(view: View, request: Request) -> Response | None:
        if token is None:
            return None
        if hmac.compare_digest(request.headers.get("Authorization", "").encode(), f"Bearer {token}".encode()):
            return None
        return view.json({"error": "missing or wrong bearer token"}, status=401)

    def owner_of(userid: str) -> str | None:
        """URL of the worker that owns the user's partition, None while the assignment is unknown.

        Computed from Kafka's partitioner and the assignment the group leader shared; Faust's own key routing
        asks the producer's metadata, which may not know the changelog topic yet and then guesses.
        """
        partition = partition_of(userid.encode(), settings.topic_partitions)
        changelog = changelog_topic(settings.worker_app_id)
        for url, topics in app.router.table_metadata(USERS_TABLE).items():
            if partition in topics.get(changelog, ()):
                return str(url).rstrip("/")
        return None

    def is_me(url: str) -> bool:
        return url == settings.canonical_url.rstrip("/")

    def forward_headers() -> dict[str, str]:
        headers = {_ROUTED_HEADER: "1"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    @app.page("/presence/{userid}")
    class PresenceView(View):
        """Q1: a user's current record, as on STATE."""

        async def get(self, request: Request, userid: str) -> Response:
            denied = unauthorized(self, request)
            if denied is not None:
                return denied
            if request.headers.get(_ROUTED_HEADER) is None:
                owner = owner_of(userid)
                if owner is None:
                    return self.json({"error": "partitions are being reassigned; retry"}, status=503)
                if not is_me(owner):
                    async with app.http_client.get(
                        f"{owner}/presence/{quote(userid, safe='')}", headers=forward_headers()
                    ) as response:
                        return self.bytes(
                            await response.read(), content_type="application/json", status=response.status
                        )
            record = state_of(table, userid, include_ip)
            if record is None:
                return self.json(
                    {"error": f"no presence record for {userid!r}", "userid": userid}, status=404
                )
            return self.json(record)

    @app.page("/presence:batch")
    class PresenceBatchView(View):
        """Q2: the records of up to 1,000 users; unknown users are left out."""

        async def post(self, request: Request) -> Response:
            denied = unauthorized(self, request)
            if denied is not None:
                return denied
            try:
                body = orjson.loads(await request.read())
            except orjson.JSONDecodeError:
                return self.json({"error": 'body must be JSON: {"userids": [...]}'}, status=400)
            userids = body.get("userids") if isinstance(body, dict) else None
            if not isinstance(userids, list) or not all(isinstance(u, str) and u for u in userids):
                return self.json({"error": 'body must be {"userids": [non-empty strings]}'}, status=400)
            if len(userids) > MAX_QUERY_BATCH:
                return self.json({"error": f"at most {MAX_QUERY_BATCH} user ids per request"}, status=413)
            records: dict[str, Any] = {}
            remote: dict[str, list[str]] = defaultdict(list)
            routed = request.headers.get(_ROUTED_HEADER) is not None
            for userid in dict.fromkeys(userids):
                owner = None if routed else owner_of(userid)
                if owner is None and not routed:
                    return self.json({"error": "partitions are being reassigned; retry"}, status=503)
                if owner is None or is_me(owner):
                    record = state_of(table, userid, include_ip)
                    if record is not None:
                        records[userid] = record
                else:
                    remote[owner].append(userid)
            for owner_url, ids in remote.items():
                async with app.http_client.post(
                    f"{owner_url}/presence:batch",
                    data=orjson.dumps({"userids": ids}),
                    headers=forward_headers(),
                ) as response:
                    if response.status != 200:
                        return self.json(
                            {"error": f"owner {owner_url} answered {response.status}"}, status=502
                        )
                    records.update((await response.json())["records"])
            return self.json({"records": records})

    @app.page("/metrics")
    class MetricsView(View):
        async def get(self, request: Request) -> Response:
            # aiohttp refuses a charset inside content_type; the exposition format is UTF-8 by definition.
            content_type = CONTENT_TYPE_LATEST.split(";")[0] + "; version=0.0.4"
            return self.bytes(generate_latest(worker.metrics.registry), content_type=content_type)

    @app.page("/healthz")
    class HealthView(View):
        async def get(self, request: Request) -> Response:
            return self.json({"status": "alive"})

    @app.page("/readyz")
    class ReadyView(View):
        async def get(self, request: Request) -> Response:
            if worker.ready and not app.rebalancing:
                return self.json({"status": "ready"})
            return self.json({"status": "recovering or rebalancing"}, status=503)
