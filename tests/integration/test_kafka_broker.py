"""The local broker is a real Apache Kafka: topics are created by the product, keyed records stay per key."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.partitioner import DefaultPartitioner

from core.settings import CommonSettings
from core.topics import TopicError, ensure_topics, product_topics


async def _consume_all(settings: CommonSettings, topic: str, expected: int) -> list[tuple[int, bytes, bytes]]:
    consumer = AIOKafkaConsumer(topic, auto_offset_reset="earliest", enable_auto_commit=False,
                                **settings.aiokafka_options())  # fmt: skip
    await consumer.start()
    seen: list[tuple[int, bytes, bytes]] = []
    try:
        async with asyncio.timeout(30):
            while len(seen) < expected:
                batch = await consumer.getmany(timeout_ms=500)
                for tp, records in batch.items():
                    seen.extend((tp.partition, r.key, r.value) for r in records)  # type: ignore[misc]
    finally:
        await consumer.stop()
    return seen


async def test_d2_product_creates_its_topics_with_explicit_configs(common_settings: CommonSettings) -> None:
    created = await ensure_topics(common_settings)
    assert sorted(created) == sorted(spec.name for spec in product_topics(common_settings))
    # A second call is a no-op: replicas of the gateway and workers all call it at start.
    assert await ensure_topics(common_settings) == []

    admin = AIOKafkaAdminClient(**common_settings.aiokafka_options())
    await admin.start()
    try:
        described = await admin.describe_topics([common_settings.topic_raw, common_settings.topic_state])
        assert {len(t["partitions"]) for t in described} == {common_settings.topic_partitions}
        configs = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, common_settings.topic_state),
             ConfigResource(ConfigResourceType.TOPIC, common_settings.topic_raw)]
        )  # fmt: skip
        # DescribeConfigs resources are (error_code, error_message, type, name, [(key, value, ...), ...]).
        by_topic = {
            resource[3]: {entry[0]: entry[1] for entry in resource[4]}
            for response in configs
            for resource in response.resources
        }
        assert by_topic[common_settings.topic_state]["cleanup.policy"] == "compact"
        # STATE's compaction tuning (D2): bounded churn for a bootstrap, tombstones kept for a day.
        assert by_topic[common_settings.topic_state]["segment.ms"] == "3600000"
        assert by_topic[common_settings.topic_state]["min.cleanable.dirty.ratio"] == "0.1"
        assert by_topic[common_settings.topic_state]["delete.retention.ms"] == "86400000"
        assert by_topic[common_settings.topic_raw]["cleanup.policy"] == "delete"
        assert by_topic[common_settings.topic_raw]["retention.ms"] == str(
            common_settings.topic_raw_retention_ms
        )
    finally:
        await admin.close()


async def test_d2_partition_count_mismatch_is_an_error_that_says_what_to_do(
    common_settings: CommonSettings,
) -> None:
    await ensure_topics(common_settings)
    wrong = common_settings.model_copy(update={"topic_partitions": common_settings.topic_partitions + 2})
    try:
        await ensure_topics(wrong)
    except TopicError as exc:
        assert f"PRESENCE_TOPIC_PARTITIONS={common_settings.topic_partitions}" in str(exc)
    else:
        raise AssertionError("a partition-count mismatch must be refused")


async def test_d2_without_topic_creation_missing_topics_are_an_error_naming_what_to_create(
    common_settings: CommonSettings,
) -> None:
    """PRESENCE_TOPIC_CREATE=false (Describe rights only): nothing is created, the error lists each missing topic
    with its layout and configs; once an administrator created them, the same call passes."""
    describe_only = common_settings.model_copy(update={"topic_create": False})
    try:
        await ensure_topics(describe_only)
    except TopicError as exc:
        message = str(exc)
    else:
        raise AssertionError("missing topics must be refused when creation is off")
    for spec in product_topics(common_settings):
        assert f"{spec.name} (partitions {spec.partitions}, replication factor 1" in message
    assert "cleanup.policy=compact" in message and "presence create-topics" in message
    admin = AIOKafkaAdminClient(**common_settings.aiokafka_options())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
    finally:
        await admin.close()
    assert not existing & {spec.name for spec in product_topics(common_settings)}, "nothing was created"

    assert len(await ensure_topics(common_settings)) == 4
    assert await ensure_topics(describe_only) == []


async def test_unreachable_broker_error_names_the_setting(common_settings: CommonSettings) -> None:
    from presence.localkafka import free_port

    nowhere = common_settings.model_copy(update={"kafka_bootstrap_servers": f"127.0.0.1:{free_port()}"})
    try:
        await ensure_topics(nowhere, timeout=3)
    except TopicError as exc:
        assert "PRESENCE_KAFKA_BOOTSTRAP_SERVERS" in str(exc)
    else:
        raise AssertionError("an unreachable broker must be reported")


async def test_same_userid_always_lands_on_the_same_partition(common_settings: CommonSettings) -> None:
    await ensure_topics(common_settings)
    users = [f"user-{i}" for i in range(40)]
    producer = AIOKafkaProducer(enable_idempotence=True, acks="all", **common_settings.aiokafka_options())
    await producer.start()
    try:
        sends = [
            await producer.send(common_settings.topic_raw, key=user.encode(), value=f"{user}:{n}".encode())
            for n in range(5)
            for user in users
        ]
        await asyncio.gather(*sends)
    finally:
        await producer.stop()

    records = await _consume_all(common_settings, common_settings.topic_raw, expected=len(users) * 5)
    partitions_by_user: dict[bytes, set[int]] = defaultdict(set)
    order_by_user: dict[bytes, list[bytes]] = defaultdict(list)
    for partition, key, value in records:
        partitions_by_user[key].add(partition)
        order_by_user[key].append(value)
    all_partitions = list(range(common_settings.topic_partitions))
    for user in users:
        key = user.encode()
        # One partition per user, and it is the one Kafka's Java clients would pick (murmur2), so any
        # producer — ours, a replay tool, another team's — agrees on where a user lives.
        assert partitions_by_user[key] == {DefaultPartitioner()(key, all_partitions, all_partitions)}
        assert order_by_user[key] == [f"{user}:{n}".encode() for n in range(5)]
    assert len(set().union(*partitions_by_user.values())) > 1, "keys should spread over partitions"
