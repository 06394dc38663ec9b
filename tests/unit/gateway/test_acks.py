"""Records in shared per-partition batches and the accounting of their acknowledgements (G6), with an in-memory
Kafka that numbers a batch's records when it takes the batch, as the idempotent producer does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from aiokafka.errors import OutOfOrderSequenceNumber

from core.contract import partition_of
from gateway.acks import PartitionBatches
from gateway.spool import SpoolRecord

from .fakes import MemoryKafka

TOPIC = "raw"


def record(user: str, value: str = "v") -> SpoolRecord:
    return SpoolRecord(TOPIC, user.encode(), value.encode())


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.001)


async def batches_for(kafka: MemoryKafka, linger: float = 0.0) -> PartitionBatches:
    return await PartitionBatches.for_topics(kafka.producer(), [TOPIC], linger=linger)


async def test_g6_records_go_to_the_partition_of_their_key_and_concurrent_handovers_share_batches() -> None:
    kafka = MemoryKafka(partitions=4)
    batches = await batches_for(kafka)
    users = [f"user-{i}" for i in range(40)]
    first = batches.hand_over([record(user) for user in users[:20]])
    second = batches.hand_over([record(user) for user in users[20:]])
    await asyncio.wait_for(asyncio.gather(first.acknowledged(), second.acknowledged()), 5)
    assert first.unacknowledged() == [] and second.unacknowledged() == []
    assert sorted(key for _, _, key in kafka.placed) == sorted(user.encode() for user in users)
    for _, partition, key in kafka.placed:
        assert key is not None and partition == partition_of(key, 4)
    # One batch per partition for both handovers together, not one per record nor per request.
    assert kafka.batches_taken == len({partition_of(user.encode(), 4) for user in users})


async def test_g6_a_batch_the_client_took_takes_no_more_records() -> None:
    kafka = MemoryKafka(partitions=1, hold=True)
    batches = await batches_for(kafka)
    first = batches.hand_over([record("a")])
    await wait_for(lambda: kafka.batches_taken == 1)
    # The client holds the first batch but has not built it yet: a record added to it now would break the
    # idempotent producer's sequence numbers.
    second = batches.hand_over([record("b")])
    kafka.release()
    await asyncio.wait_for(asyncio.gather(first.acknowledged(), second.acknowledged()), 5)
    assert first.refusal is None and second.refusal is None
    assert [key for _, _, key in kafka.placed] == [b"a", b"b"]
    assert kafka.batches_taken == 2


async def test_g6_a_full_batch_is_followed_by_the_next_in_order() -> None:
    kafka = MemoryKafka(partitions=1, batch_capacity=3)
    batches = await batches_for(kafka)
    handover = batches.hand_over([record("u", str(i)) for i in range(7)])
    await asyncio.wait_for(handover.acknowledged(), 5)
    assert [value for _, value in kafka.topic(TOPIC)] == [str(i).encode() for i in range(7)]
    assert kafka.batches_taken == 3


async def test_g6_records_without_key_are_spread_over_partitions() -> None:
    kafka = MemoryKafka(partitions=4)
    batches = await batches_for(kafka)
    handover = batches.hand_over([SpoolRecord(TOPIC, None, b"letter")] * 8)
    await asyncio.wait_for(handover.acknowledged(), 5)
    assert {partition for _, partition, _ in kafka.placed} == {0, 1, 2, 3}


async def test_g7_a_refused_batch_leaves_only_its_records_unacknowledged_and_ends_the_wait() -> None:
    kafka = MemoryKafka(partitions=2, hold=True)
    batches = await batches_for(kafka)
    users = ["u1", "u2", "u3", "u4", "u5", "u6"]
    assert len({partition_of(user.encode(), 2) for user in users}) == 2
    handover = batches.hand_over([record(user) for user in users])
    await wait_for(lambda: kafka.batches_taken == 2)
    refused_future, refused_batch = kafka.held.pop(0)
    refused_future.set_exception(OutOfOrderSequenceNumber())
    # The other batch is still unanswered, but one refusal is enough to stop waiting.
    await asyncio.wait_for(handover.acknowledged(), 5)
    assert isinstance(handover.refusal, OutOfOrderSequenceNumber)
    refused_keys = {key for key, _ in refused_batch.records}
    assert {record.key for record in handover.unacknowledged()} == {user.encode() for user in users}
    kafka.release()
    await wait_for(lambda: len(handover.unacknowledged()) < len(users))
    assert {record.key for record in handover.unacknowledged()} == refused_keys
    assert {key for _, _, key in kafka.placed} == {user.encode() for user in users} - refused_keys


async def test_g7_a_wait_cut_short_can_be_resumed() -> None:
    kafka = MemoryKafka(partitions=1, up=False)
    batches = await batches_for(kafka)
    handover = batches.hand_over([record("a")])
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await handover.acknowledged()
    assert [r.key for r in handover.unacknowledged()] == [b"a"]
    kafka.set_up(True)
    await asyncio.wait_for(handover.acknowledged(), 5)
    assert handover.unacknowledged() == [] and handover.refusal is None


async def test_g7_closing_refuses_batches_not_yet_taken_by_the_client() -> None:
    kafka = MemoryKafka(partitions=1)
    batches = await batches_for(kafka, linger=10.0)
    handover = batches.hand_over([record("a")])
    batches.close()
    await asyncio.wait_for(handover.acknowledged(), 5)
    assert handover.refusal is not None
    assert [r.key for r in handover.unacknowledged()] == [b"a"]
    assert kafka.batches_taken == 0
