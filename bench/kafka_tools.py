"""Fast Kafka helpers for the benchmarks (librdkafka through confluent-kafka): bulk produce, offsets."""

from __future__ import annotations

import time
from collections.abc import Iterable

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition


def produce(bootstrap: str, topic: str, records: Iterable[tuple[bytes, bytes | None]],
            partition_of: dict[bytes, int] | None = None) -> int:  # fmt: skip
    """Produce (key, value) records, keyed like the Java client (murmur2), and wait for all acks."""
    producer = Producer({
        "bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 20,
        "batch.num.messages": 10_000, "queue.buffering.max.messages": 500_000,
        "partitioner": "murmur2_random",
    })  # fmt: skip
    count = 0
    for key, value in records:
        while True:
            try:
                if partition_of is not None:
                    producer.produce(topic, value=value, key=key, partition=partition_of[key])
                else:
                    producer.produce(topic, value=value, key=key)
                break
            except BufferError:
                producer.poll(0.05)
        count += 1
        if count % 10_000 == 0:
            producer.poll(0)
    remaining = producer.flush(120)
    if remaining:
        raise RuntimeError(f"{remaining} records not acknowledged")
    return count


def produce_to(bootstrap: str, topic: str, records: Iterable[tuple[int, bytes, bytes | None]]) -> int:
    """Produce (partition, key, value) records to explicit partitions and wait for all acks."""
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 20,
                         "batch.num.messages": 10_000, "queue.buffering.max.messages": 500_000})  # fmt: skip
    count = 0
    for partition, key, value in records:
        while True:
            try:
                producer.produce(topic, value=value, key=key, partition=partition)
                break
            except BufferError:
                producer.poll(0.05)
        count += 1
        if count % 10_000 == 0:
            producer.poll(0)
    if producer.flush(120):
        raise RuntimeError("records not acknowledged")
    return count


_COORDINATOR_ERRORS = {
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
}


class Offsets:
    """Committed offsets of consumer groups and end offsets of topics."""

    def __init__(self, bootstrap: str) -> None:
        self._bootstrap = bootstrap
        self._consumers: dict[str, Consumer] = {}

    def _consumer(self, group: str) -> Consumer:
        if group not in self._consumers:
            self._consumers[group] = Consumer({"bootstrap.servers": self._bootstrap, "group.id": group,
                                               "enable.auto.commit": False})  # fmt: skip
        return self._consumers[group]

    def committed(self, group: str, topic: str, partitions: int, retry_for: float = 30.0) -> int:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        deadline = time.monotonic() + retry_for
        while True:
            try:
                return sum(max(0, tp.offset) for tp in self._consumer(group).committed(tps, timeout=10))
            except KafkaException as exc:
                # The group coordinator may be loading or moving (NOT_COORDINATOR, COORDINATOR_LOAD_IN_PROGRESS).
                error = exc.args[0]
                transient = error.retriable() or error.code() in _COORDINATOR_ERRORS
                if not transient or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def committed_each(self, group: str, topic: str, partitions: int) -> list[int]:
        """The group's committed offset of each partition (0 where none is committed)."""
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        return [max(0, tp.offset) for tp in self._consumer(group).committed(tps, timeout=10)]

    def end_each(self, topic: str, partitions: int) -> list[int]:
        consumer = self._consumer("bench-offsets")
        return [
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions)
        ]

    def end(self, topic: str, partitions: int) -> int:
        consumer = self._consumer("bench-offsets")
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions)
        )

    def close(self) -> None:
        for consumer in self._consumers.values():
            consumer.close()
        self._consumers.clear()
