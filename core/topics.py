"""The product's Kafka topics, created by the product itself with explicit configs (rule D2).

Brokers in production usually refuse auto-creation, and an auto-created topic gets the broker's defaults
(one partition, delete policy) — wrong for every topic here. So each component calls :func:`ensure_topics`
at start: missing topics are created, existing ones are checked, and a partition-count mismatch is an error
because it would silently move users to other partitions (and break per-user ordering).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from core.settings import CommonSettings

log = logging.getLogger(__name__)


class TopicError(RuntimeError):
    """A topic exists with a layout the product cannot work with; the message says what to do."""


class KafkaUnreachable(TopicError):
    """Kafka did not answer, or its partitions had no leader in time: worth trying again later."""


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int
    config: dict[str, str] = field(default_factory=dict)


def min_insync_replicas(replication_factor: int) -> int:
    """Two in-sync replicas when there are three (survives one broker loss with acks=all), else one."""
    return max(1, min(2, replication_factor - 1))


def state_compaction(settings: CommonSettings) -> dict[str, str]:
    """STATE's compaction configs: how much churn a bootstrap reads, how long tombstones stay (D2)."""
    return {
        "cleanup.policy": "compact",
        "segment.ms": str(settings.topic_state_segment_ms),
        "min.cleanable.dirty.ratio": str(settings.topic_state_min_cleanable_dirty_ratio),
        "delete.retention.ms": str(settings.topic_state_delete_retention_ms),
    }


def product_topics(settings: CommonSettings) -> list[TopicSpec]:
    """RAW, DLQ, TRANSITIONS and STATE with the configs D2 asks for."""
    rf = settings.topic_replication_factor
    base = {"min.insync.replicas": str(min_insync_replicas(rf))}
    return [
        TopicSpec(
            settings.topic_raw,
            settings.topic_partitions,
            rf,
            {**base, "cleanup.policy": "delete", "retention.ms": str(settings.topic_raw_retention_ms)},
        ),
        TopicSpec(
            settings.topic_dlq,
            settings.topic_partitions,
            rf,
            {**base, "cleanup.policy": "delete", "retention.ms": str(settings.topic_dlq_retention_ms)},
        ),
        TopicSpec(
            settings.topic_transitions,
            settings.topic_partitions,
            rf,
            {
                **base,
                "cleanup.policy": "delete",
                "retention.ms": str(settings.topic_transitions_retention_ms),
            },
        ),
        TopicSpec(
            settings.topic_state,
            settings.topic_partitions,
            rf,
            # Compacted: the newest record per user is kept forever, so a new consumer rebuilds everyone's
            # presence from this topic alone (docs/consuming.md).
            {**base, **state_compaction(settings)},
        ),
    ]


async def ensure_topics(
    settings: CommonSettings, extra: Iterable[TopicSpec] = (), timeout: float = 30.0
) -> list[str]:
    """Create the product's topics (plus ``extra``) where missing; return the names created.

    With ``PRESENCE_TOPIC_CREATE=false`` nothing is created (Describe rights suffice): a missing topic is a
    :class:`TopicError` naming each one with its partitions, replication factor and configs.
    """
    specs = [*product_topics(settings), *extra]
    admin = AIOKafkaAdminClient(
        client_id=f"{settings.kafka_client_id_prefix}-admin", request_timeout_ms=int(timeout * 1000),
        **settings.aiokafka_options(),
    )  # fmt: skip
    try:
        await asyncio.wait_for(admin.start(), timeout)
    except (KafkaError, TimeoutError, OSError) as exc:
        raise KafkaUnreachable(
            f"cannot reach Kafka at {settings.kafka_bootstrap_servers} ({exc!r}); check "
            "PRESENCE_KAFKA_BOOTSTRAP_SERVERS and the security settings, or start a local broker with "
            "`presence kafka start`"
        ) from exc
    try:
        existing = set(await admin.list_topics())
        missing = [spec for spec in specs if spec.name not in existing]
        if missing and not settings.topic_create:
            raise TopicError(_missing_message(missing))
        if missing:
            new_topics = [
                NewTopic(spec.name, spec.partitions, spec.replication_factor, topic_configs=spec.config)
                for spec in missing
            ]
            try:
                await admin.create_topics(new_topics, timeout_ms=int(timeout * 1000))
            except TopicAlreadyExistsError:
                # Another replica created them between our list and create: that is fine.
                pass
        await _check_partitions(admin, [spec for spec in specs if spec.name in existing])
        await _wait_for_leaders(admin, [spec.name for spec in specs], timeout)
        for spec in missing:
            log.info("created topic", extra={"topic": spec.name, "partitions": spec.partitions})
        return [spec.name for spec in missing]
    finally:
        await admin.close()


def _missing_message(missing: list[TopicSpec]) -> str:
    wanted = "; ".join(
        f"{spec.name} (partitions {spec.partitions}, replication factor {spec.replication_factor}"
        + "".join(f", {key}={value}" for key, value in sorted(spec.config.items()))
        + ")"
        for spec in missing
    )
    return (
        f"PRESENCE_TOPIC_CREATE is false and {len(missing)} topic(s) do not exist: {wanted}. Create them "
        "(`presence create-topics` with the same settings and a user allowed to create topics, or the chart's "
        "strimzi.topics), or set PRESENCE_TOPIC_CREATE=true"
    )


async def _check_partitions(admin: AIOKafkaAdminClient, specs: list[TopicSpec]) -> None:
    if not specs:
        return
    described = await admin.describe_topics([spec.name for spec in specs])
    counts = {item["topic"]: len(item["partitions"]) for item in described}
    for spec in specs:
        actual = counts.get(spec.name)
        if actual is not None and actual != spec.partitions:
            raise TopicError(
                f"topic {spec.name} has {actual} partitions but PRESENCE_TOPIC_PARTITIONS is "
                f"{spec.partitions}; set PRESENCE_TOPIC_PARTITIONS={actual} (changing the partition count "
                "of a keyed topic moves users between partitions and needs a migration)"
            )


async def _wait_for_leaders(admin: AIOKafkaAdminClient, names: list[str], timeout: float) -> None:
    """Right after creation a partition may have no leader yet; producing then fails, so wait here."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        described = await admin.describe_topics(names)
        if all(
            item.get("error_code", 0) == 0 and item["partitions"]
            and all(p.get("leader", -1) >= 0 for p in item["partitions"])
            for item in described
        ):  # fmt: skip
            return
        if loop.time() > deadline:
            raise KafkaUnreachable(f"topics {names} have partitions without a leader after {timeout:.0f} s")
        await asyncio.sleep(0.1)
