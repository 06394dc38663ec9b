"""Look into a running pipeline: read TRANSITIONS or STATE, describe the topics and the workers' lag, ask the
query API. Every Kafka read here uses manual assignment (no consumer group), so looking never moves anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from core.contract import MAX_QUERY_BATCH, partition_of
from core.settings import CommonSettings


class InspectError(RuntimeError):
    """Something the user must fix (broker unreachable, topic missing, worker down); the message says what."""


def unreachable(settings: CommonSettings, exc: BaseException) -> InspectError:
    return InspectError(
        f"cannot reach Kafka at {settings.kafka_bootstrap_servers} ({type(exc).__name__}); check "
        "PRESENCE_KAFKA_BOOTSTRAP_SERVERS (or --bootstrap), or start a local broker with `presence kafka start`"
    )


@contextlib.asynccontextmanager
async def admin_client(settings: CommonSettings, timeout: float = 10.0) -> AsyncIterator[AIOKafkaAdminClient]:
    admin = AIOKafkaAdminClient(
        client_id=f"{settings.kafka_client_id_prefix}-cli", request_timeout_ms=int(timeout * 1000),
        **settings.aiokafka_options(),
    )  # fmt: skip
    async with _running(settings, admin.start, admin.close, timeout):
        yield admin


@contextlib.asynccontextmanager
async def consumer_client(settings: CommonSettings, timeout: float = 10.0) -> AsyncIterator[AIOKafkaConsumer]:
    consumer = AIOKafkaConsumer(
        client_id=f"{settings.kafka_client_id_prefix}-cli", enable_auto_commit=False,
        isolation_level="read_committed", request_timeout_ms=int(timeout * 1000) + 30_000,
        **settings.aiokafka_options(),
    )  # fmt: skip
    async with _running(settings, consumer.start, consumer.stop, timeout):
        yield consumer


@contextlib.asynccontextmanager
async def _running(
    settings: CommonSettings,
    start: Callable[[], Awaitable[Any]],
    stop: Callable[[], Awaitable[Any]],
    timeout: float,
) -> AsyncIterator[None]:
    """A started client, stopped on the way out; one that cannot start is an :class:`InspectError`."""
    try:
        await asyncio.wait_for(start(), timeout)
    except (KafkaError, TimeoutError, OSError) as exc:
        with contextlib.suppress(Exception):
            await stop()
        raise unreachable(settings, exc) from exc
    try:
        yield
    finally:
        await stop()


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        await consumer._client.force_metadata_update()
        partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        raise InspectError(
            f"topic {topic} does not exist on this broker; create the product's topics with "
            "`presence create-topics` (gateways and workers also create them at start), or check the PRESENCE_TOPIC_* "
            "settings"
        )
    return [TopicPartition(topic, p) for p in sorted(partitions)]


# --- tail ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    partition: int
    offset: int
    timestamp_ms: int
    key: str
    value: dict[str, Any] | None  # None: a tombstone (deleted user)


async def tail(
    settings: CommonSettings,
    topic: str,
    *,
    user: str | None,
    last: int,
    from_beginning: bool,
    follow: bool,
    emit: Callable[[Message], None],
    count: int = 0,
    idle_timeout: float = 0.0,
    ready: Callable[[], None] = lambda: None,
) -> int:
    """Print (through ``emit``) the messages of ``topic``; return how many were shown.

    Without ``from_beginning`` each partition starts ``last`` messages before its end, so the newest ``last``
    messages of the topic are among what is shown first (a user filter shows up to ``last`` of that user's).
    With ``follow`` it keeps reading until cancelled, ``count`` messages were shown, or nothing came for
    ``idle_timeout`` seconds (0: wait forever).
    """
    async with consumer_client(settings) as consumer:
        partitions = await partitions_of(consumer, topic)
        if user is not None:
            partitions = [partitions[partition_of(user.encode(), len(partitions))]]
        consumer.assign(partitions)
        begins = await consumer.beginning_offsets(partitions)
        ends = await consumer.end_offsets(partitions)
        for tp in partitions:
            if from_beginning:
                consumer.seek(tp, begins[tp])
            else:
                # A user filter reads further back: that user's messages are a fraction of the partition.
                back = last * (50 if user is not None else 1)
                consumer.seek(tp, max(begins[tp], ends[tp] - back))
        backlog: list[Message] = []
        pending = {tp for tp in partitions if await consumer.position(tp) < ends[tp]}
        while pending:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                backlog.extend(_decode(r) for r in records)
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
        backlog = [m for m in backlog if user is None or m.key == user]
        backlog.sort(key=lambda m: (m.timestamp_ms, m.partition, m.offset))
        if not from_beginning:
            backlog = backlog[-last:] if last else []
        shown = 0
        for message in backlog:
            emit(message)
            shown += 1
            if count and shown >= count:
                return shown
        if not follow:
            return shown
        ready()
        loop = asyncio.get_running_loop()
        idle_since = loop.time()
        while True:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    message = _decode(record)
                    if user is not None and message.key != user:
                        continue
                    emit(message)
                    shown += 1
                    idle_since = loop.time()
                    if count and shown >= count:
                        return shown
            if idle_timeout and loop.time() - idle_since > idle_timeout:
                return shown


def _decode(record: Any) -> Message:
    value: dict[str, Any] | None = None
    if record.value is not None:
        try:
            value = orjson.loads(record.value)
        except orjson.JSONDecodeError:
            value = {"undecodable": record.value[:200].decode("utf-8", "replace")}
    key = record.key.decode("utf-8", "replace") if record.key is not None else ""
    return Message(record.partition, record.offset, record.timestamp, key, value)


def clock(ms: int) -> str:
    """Local wall-clock time of an epoch-ms value, to the millisecond."""
    return dt.datetime.fromtimestamp(ms / 1000).strftime("%H:%M:%S.%f")[:-3]


def format_transition(message: Message) -> str:
    value = message.value
    if value is None:
        return f"{clock(message.timestamp_ms)}  {message.key}  (tombstone)"
    if "undecodable" in value:
        return f"{clock(message.timestamp_ms)}  {message.key}  undecodable: {value['undecodable']!r}"
    cause = value.get("cause") or {}
    platforms = ",".join(value.get("platforms") or []) or "-"
    return (
        f"{clock(int(value.get('at', message.timestamp_ms)))}  {value.get('userid', message.key)}  "
        f"{value.get('from')} → {value.get('to')}  by {cause.get('event')} on {cause.get('os') or '?'} "
        f"(session {cause.get('sessionId')})  online on {platforms} ({value.get('online_sessions', 0)} sessions)  "
        f"seq {value.get('epoch')}/{value.get('seq')}"
    )


def format_state(message: Message) -> str:
    value = message.value
    if value is None:
        return f"{clock(message.timestamp_ms)}  {message.key}  deleted (tombstone after the idle retention)"
    if "undecodable" in value:
        return f"{clock(message.timestamp_ms)}  {message.key}  undecodable: {value['undecodable']!r}"
    platforms = ",".join(value.get("platforms") or []) or "-"
    return (
        f"{clock(message.timestamp_ms)}  {value.get('userid', message.key)}  {value.get('status')}  "
        f"on {platforms} ({len(value.get('sessions') or [])} sessions)  "
        f"last seen {clock(int(value.get('last_seen', 0)))}  seq {value.get('epoch')}/{value.get('seq')}"
    )


# --- topics -------------------------------------------------------------------------------------------------


@dataclass
class TopicInfo:
    name: str
    role: str
    exists: bool
    partitions: int = 0
    replication: int = 0
    messages: int = 0  # end minus beginning offsets: what the topic holds (compaction/retention aside)
    config: dict[str, str] | None = None
    lag: dict[str, int] | None = None  # consumer group -> messages not yet committed
    lag_by_partition: dict[str, dict[int, int]] | None = None


_SHOWN_CONFIGS = (
    "cleanup.policy",
    "retention.ms",
    "min.insync.replicas",
    # STATE's compaction (D2): how much churn a bootstrap reads and how long tombstones stay.
    "segment.ms",
    "min.cleanable.dirty.ratio",
    "delete.retention.ms",
)


async def describe(
    settings: CommonSettings, topics: Sequence[tuple[str, str]], groups: dict[str, Sequence[str]]
) -> list[TopicInfo]:
    """Partitions, replication, configs, message counts and each group's lag for ``topics`` (name, role).

    ``groups`` maps a topic name to the consumer groups whose lag to report on it.
    """
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    infos: list[TopicInfo] = []
    async with admin_client(settings) as admin, consumer_client(settings) as consumer:
        existing = set(await admin.list_topics())
        names = [name for name, _ in topics if name in existing]
        described = {item["topic"]: item for item in await admin.describe_topics(names)} if names else {}
        configs: dict[str, dict[str, str]] = {}
        if names:
            resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
            for response in await admin.describe_configs(resources):
                for resource in response.to_object()["resources"]:
                    configs[resource["resource_name"]] = {
                        c["config_names"]: c["config_value"]
                        for c in resource["config_entries"]
                        if c["config_names"] in _SHOWN_CONFIGS
                    }
        committed: dict[str, dict[TopicPartition, int]] = {}
        for group in {g for gs in groups.values() for g in gs}:
            offsets = await admin.list_consumer_group_offsets(group)
            committed[group] = {tp: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}
        for name, role in topics:
            if name not in existing:
                infos.append(TopicInfo(name, role, exists=False))
                continue
            item = described[name]
            tps = [TopicPartition(name, p["partition"]) for p in item["partitions"]]
            begins = await consumer.beginning_offsets(tps)
            ends = await consumer.end_offsets(tps)
            info = TopicInfo(
                name, role, exists=True, partitions=len(tps),
                replication=max((len(p["replicas"]) for p in item["partitions"]), default=0),
                messages=sum(ends[tp] - begins[tp] for tp in tps), config=configs.get(name, {}),
            )  # fmt: skip
            if name in groups:
                info.lag, info.lag_by_partition = {}, {}
                for group in groups[name]:
                    done = committed.get(group, {})
                    per = {tp.partition: ends[tp] - done.get(tp, begins[tp]) for tp in tps}
                    info.lag[group] = sum(per.values())
                    info.lag_by_partition[group] = per
            infos.append(info)
    return infos


async def worker_groups(settings: CommonSettings) -> list[str]:
    """Consumer groups that look like presence workers (they commit offsets on RAW)."""
    async with admin_client(settings) as admin:
        groups = [g[0] for g in await admin.list_consumer_groups()]
        found = []
        for group in sorted(groups):
            offsets = await admin.list_consumer_group_offsets(group)
            if any(tp.topic == settings.topic_raw for tp in offsets):
                found.append(group)
        return found


# --- query --------------------------------------------------------------------------------------------------


async def query(url: str, userids: Sequence[str], token: str | None) -> dict[str, dict[str, Any] | None]:
    """Each user's record from the worker's query API (None: no record), in the order asked."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    found: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as client:
        try:
            unique = list(dict.fromkeys(userids))
            for start in range(0, len(unique), MAX_QUERY_BATCH):
                chunk = unique[start : start + MAX_QUERY_BATCH]
                response = await _post_batch(client, chunk)
                found.update(response)
        except httpx.TransportError as exc:
            raise InspectError(
                f"cannot reach the worker's query API at {url} ({type(exc).__name__}); is a worker running "
                "(`presence worker` or `presence up`)? Point --url at one (PRESENCE_WORKER_WEB_PORT)"
            ) from exc
    return {u: found.get(u) for u in userids}


async def _post_batch(client: httpx.AsyncClient, userids: list[str]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while True:
        response = await client.post("/presence:batch", content=orjson.dumps({"userids": userids}))
        if response.status_code == 200:
            records: dict[str, Any] = response.json()["records"]
            return records
        if response.status_code == 503 and loop.time() < deadline:
            await asyncio.sleep(0.5)  # partitions being reassigned: the API says to retry
            continue
        if response.status_code == 401:
            raise InspectError(
                "the worker wants a bearer token: pass --token (or set PRESENCE_WORKER_QUERY_TOKEN)"
            )
        raise InspectError(f"the worker answered {response.status_code}: {response.text[:300]}")
