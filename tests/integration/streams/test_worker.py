"""The worker against a real broker: transitions, state, queries, metrics, invalid input (S1-S9, Q1-Q2, M2)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from core.settings import CommonSettings
from core.topics import ensure_topics
from streams.config import WorkerSettings
from streams.main import worker_topics

from .harness import (
    WorkerProcess,
    check_s10,
    model_run,
    produce_raw,
    raw_event,
    read_topic,
    scenario,
    validator,
    wait_until,
    worker_env,
)


@pytest.fixture
def topics(settings_for: Callable[..., dict[str, Any]], unique: Callable[[str], str]) -> dict[str, Any]:
    values = settings_for()
    app_id = unique("worker")
    settings = WorkerSettings(**values, worker_app_id=app_id)
    asyncio.run(ensure_topics(settings, extra=worker_topics(settings)))
    return {"values": values, "app_id": app_id, "settings": settings}


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()


def _start(
    workers: list[WorkerProcess], topics: dict[str, Any], tmp_path: Path, name: str, **env: str
) -> WorkerProcess:
    worker = WorkerProcess(
        env=worker_env(topics["values"], topics["app_id"], **env),
        data_dir=tmp_path / name,
        log_path=tmp_path / f"{name}.log",
    )
    workers.append(worker)
    worker.start()
    worker.wait_ready()
    return worker


def _committed(bootstrap: str, group: str, topic: str) -> int:
    """The sum over ``topic``'s partitions of ``group``'s committed offsets (0 where none)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        committed = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        return sum(max(0, tp.offset) for tp in committed)
    finally:
        consumer.close()


def _transitions_of(bootstrap: str, topic: str) -> list[bytes]:
    return [value for _, _, _, value in asyncio.run(read_topic(bootstrap, topic)) if value is not None]


def _wait_for_transitions(
    bootstrap: str, topic: str, expected: dict[str, Any], timeout: float
) -> dict[str, int]:
    """Wait until TRANSITIONS holds every expected (userid, epoch, seq), then check it under S10."""
    wanted = {(p["userid"], p["epoch"], p["seq"]) for ps in expected["transitions"].values() for p in ps}

    def complete() -> bool:
        seen = {
            (p["userid"], p["epoch"], p["seq"]) for p in map(orjson.loads, _transitions_of(bootstrap, topic))
        }
        return wanted <= seen

    try:
        wait_until(complete, timeout, f"{len(wanted)} transitions", interval=0.5)
    finally:
        # On a time-out this says which transitions are missing or wrong.
        counts = check_s10(expected["transitions"], _transitions_of(bootstrap, topic))
    return counts


def test_s1_s9_noisy_traffic_gives_the_uninterrupted_model_output(
    kafka_bootstrap: str, topics: dict[str, Any], workers: list[WorkerProcess], tmp_path: Path
) -> None:
    settings: CommonSettings = topics["settings"]
    events = scenario(users=40, rounds=4, seed=7, start_ms=int(time.time() * 1000) - 60_000)
    asyncio.run(produce_raw(kafka_bootstrap, settings.topic_raw, events))
    raw = asyncio.run(read_topic(kafka_bootstrap, settings.topic_raw))
    expected = model_run(raw)
    wanted = sum(len(v) for v in expected["transitions"].values())
    assert wanted > 100, "the scenario should cause plenty of transitions"

    worker = _start(workers, topics, tmp_path, "w1")
    wait_until(
        lambda: len(_transitions_of(kafka_bootstrap, settings.topic_transitions)) >= wanted,
        90,
        f"{wanted} transitions",
        interval=0.5,
    )
    actual = _transitions_of(kafka_bootstrap, settings.topic_transitions)
    counts = check_s10(expected["transitions"], actual)
    assert counts["repeats"] == 0, "an uninterrupted run repeats nothing"

    transition_schema = validator("transitions.v1.schema.json")
    for value in actual:
        transition_schema.validate(orjson.loads(value))

    # S9: the last STATE record of each user equals the model's final record, and validates.
    state_schema = validator("state.v1.schema.json")
    final: dict[str, Any] = {}
    for _, _, key, value in asyncio.run(read_topic(kafka_bootstrap, settings.topic_state)):
        final[key.decode()] = orjson.loads(value) if value else None
        if value:
            state_schema.validate(orjson.loads(value))
    assert final == expected["state"]

    # Q1/Q2: the query API answers what STATE says.
    some = sorted(final)[:5]
    for userid in some:
        answer = httpx.get(f"{worker.url}/presence/{userid}", timeout=5)
        assert answer.status_code == 200
        assert answer.json() == final[userid]
    missing = httpx.get(f"{worker.url}/presence/nobody-here", timeout=5)
    assert missing.status_code == 404
    batch = httpx.post(f"{worker.url}/presence:batch", json={"userids": [*some, "nobody-here"]}, timeout=5)
    assert batch.status_code == 200
    assert batch.json()["records"] == {u: final[u] for u in some}

    # M2: outcomes are counted, the lag is measured and reaches zero.
    assert worker.metric("presence_worker_events_total", 'outcome="applied"') > 0
    assert worker.metric("presence_worker_events_total", 'outcome="duplicate"') > 0
    assert worker.metric("presence_worker_transitions_total") == wanted
    wait_until(
        lambda: (
            worker.metric("presence_worker_consumer_lag_messages") == 0
            and "presence_worker_consumer_lag_messages{" in httpx.get(f"{worker.url}/metrics").text
        ),
        30,
        "consumer lag to be reported as 0",
    )
    # Offsets are committed up to the end of RAW (batches are acknowledged record by record).
    wait_until(
        lambda: _committed(kafka_bootstrap, topics["app_id"], settings.topic_raw) == len(raw),
        30,
        "the group's committed offsets to reach the end of RAW",
        interval=0.5,
    )


def test_invalid_raw_goes_to_the_dead_letter_topic_and_processing_goes_on(
    kafka_bootstrap: str, topics: dict[str, Any], workers: list[WorkerProcess], tmp_path: Path
) -> None:
    settings: CommonSettings = topics["settings"]
    now = int(time.time() * 1000)

    async def produce() -> None:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(settings.topic_raw, key=b"u-bad", value=b"{not json")
            await producer.send_and_wait(
                settings.topic_raw, key=b"u-bad", value=orjson.dumps({"userid": "u-bad", "status": 7})
            )
            good = raw_event("u-good", "s1", 0, now)
            await producer.send_and_wait(settings.topic_raw, key=b"u-good", value=orjson.dumps(good))
        finally:
            await producer.stop()

    asyncio.run(produce())
    worker = _start(workers, topics, tmp_path, "w1", PRESENCE_WORKER_QUERY_TOKEN="let-me-in")
    transitions = wait_until(
        lambda: _transitions_of(kafka_bootstrap, settings.topic_transitions),
        60,
        "the good event's transition",
    )
    assert [orjson.loads(t)["userid"] for t in transitions] == ["u-good"]
    dead = wait_until(
        lambda: [v for *_, v in asyncio.run(read_topic(kafka_bootstrap, settings.topic_dlq)) if v], 30, "DLQ"
    )
    reasons = sorted(orjson.loads(v)["reason"] for v in dead)
    assert reasons == ["invalid_raw", "undecodable_raw"]
    dlq_schema = validator("dlq.v1.schema.json")
    for value in dead:
        dlq_schema.validate(orjson.loads(value))

    # Q3: with a token set, the query API answers only requests that carry it.
    assert httpx.get(f"{worker.url}/presence/u-good", timeout=5).status_code == 401
    wrong = httpx.get(f"{worker.url}/presence/u-good", headers={"Authorization": "Bearer nope"}, timeout=5)
    assert wrong.status_code == 401
    right = httpx.get(
        f"{worker.url}/presence/u-good", headers={"Authorization": "Bearer let-me-in"}, timeout=5
    )
    assert right.status_code == 200 and right.json()["status"] == "online"
    assert (
        httpx.post(f"{worker.url}/presence:batch", json={"userids": ["u-good"]}, timeout=5).status_code == 401
    )


def test_s10_two_workers_share_partitions_and_answer_for_each_other(
    kafka_bootstrap: str, topics: dict[str, Any], workers: list[WorkerProcess], tmp_path: Path
) -> None:
    settings: CommonSettings = topics["settings"]
    first = _start(workers, topics, tmp_path, "w1")
    second = _start(workers, topics, tmp_path, "w2")
    wait_until(
        lambda: (
            first.metric("presence_worker_assigned_partitions") > 0
            and second.metric("presence_worker_assigned_partitions") > 0
            and first.metric("presence_worker_assigned_partitions")
            + second.metric("presence_worker_assigned_partitions")
            == settings.topic_partitions
        ),
        60,
        "both workers to own partitions",
    )
    events = scenario(users=30, rounds=2, seed=11, start_ms=int(time.time() * 1000) - 60_000)
    asyncio.run(produce_raw(kafka_bootstrap, settings.topic_raw, events))
    raw = asyncio.run(read_topic(kafka_bootstrap, settings.topic_raw))
    expected = model_run(raw)
    wanted = sum(len(v) for v in expected["transitions"].values())
    wait_until(
        lambda: len(_transitions_of(kafka_bootstrap, settings.topic_transitions)) >= wanted, 90, "transitions"
    )
    users = sorted(u for u, s in expected["state"].items() if s is not None)
    # Q1/Q2 routing: every user is answered by either worker, whichever owns the partition.
    for worker in (first, second):
        batch = httpx.post(f"{worker.url}/presence:batch", json={"userids": users}, timeout=10)
        assert batch.status_code == 200
        assert batch.json()["records"] == {u: expected["state"][u] for u in users}
        for userid in users[:8]:
            single = httpx.get(f"{worker.url}/presence/{userid}", timeout=10)
            assert single.status_code == 200, single.text
            assert single.json() == expected["state"][userid]

    # Stopping one moves its partitions to the other; traffic after that is processed without loss.
    second.stop()
    wait_until(
        lambda: first.metric("presence_worker_assigned_partitions") == settings.topic_partitions,
        60,
        "the remaining worker to own every partition",
    )
    more = scenario(users=30, rounds=1, seed=12, start_ms=int(time.time() * 1000))
    asyncio.run(produce_raw(kafka_bootstrap, settings.topic_raw, more))
    raw = asyncio.run(read_topic(kafka_bootstrap, settings.topic_raw))
    expected = model_run(raw)
    wanted = sum(len(v) for v in expected["transitions"].values())
    _wait_for_transitions(kafka_bootstrap, settings.topic_transitions, expected, timeout=90)


def test_s6_s8_retention_and_damping_run_from_the_stream_and_ticks(
    kafka_bootstrap: str, settings_for: Callable[..., dict[str, Any]], unique: Callable[[str], str],
    workers: list[WorkerProcess], tmp_path: Path,
) -> None:  # fmt: skip
    values = settings_for(topic_partitions=1)
    app_id = unique("worker")
    settings = WorkerSettings(**values, worker_app_id=app_id)
    asyncio.run(ensure_topics(settings, extra=worker_topics(settings)))
    worker = WorkerProcess(
        env=worker_env(
            values,
            app_id,
            PRESENCE_WORKER_OFFLINE_GRACE_SECONDS="2",
            PRESENCE_WORKER_TICK_INTERVAL_SECONDS="0.2",
            PRESENCE_WORKER_ENDED_SESSION_RETENTION_SECONDS="60",
            PRESENCE_WORKER_USER_RETENTION_SECONDS="600",
        ),
        data_dir=tmp_path / "w",
        log_path=tmp_path / "w.log",
    )
    workers.append(worker)
    worker.start()
    worker.wait_ready()
    t = int(time.time() * 1000) - 3_600_000
    events = [
        raw_event("flappy", "s1", 0, t),
        raw_event("flappy", "s1", 1, t + 100),  # held (S8)...
        raw_event("flappy", "s2", 0, t + 1_000),  # ...and cancelled: back within the grace window
        raw_event("gone", "g1", 0, t),
        raw_event("gone", "g1", 1, t + 10),  # held, released once stream time passes t + 10 + 2 s
        raw_event("clock", "c1", 0, t + 5_000),
    ]
    asyncio.run(produce_raw(kafka_bootstrap, settings.topic_raw, events))

    def summary() -> list[tuple[str, str, str]]:
        return [(p["userid"], p["from"], p["to"]) for p in map(orjson.loads, _transitions_of(kafka_bootstrap,
                settings.topic_transitions))]  # fmt: skip

    wait_until(lambda: ("gone", "online", "offline") in summary(), 60, "the held offline to be released")
    assert [s for s in summary() if s[0] == "flappy"] == [("flappy", "offline", "online")], (
        "a flap emits nothing"
    )

    # The partition is idle now: the tick releases the clock user's offline after 2 s of wall time.
    asyncio.run(produce_raw(kafka_bootstrap, settings.topic_raw, [raw_event("clock", "c1", 1, t + 5_100)]))
    wait_until(
        lambda: ("clock", "online", "offline") in summary(), 60, "a tick to release an idle partition's hold"
    )

    # S6: ten minutes of stream time later the ended users are deleted, each with a last transition (S7) and a
    # STATE tombstone.
    asyncio.run(produce_raw(kafka_bootstrap, settings.topic_raw, [raw_event("late", "l1", 0, t + 700_000)]))

    def tombstones() -> set[str]:
        records = asyncio.run(read_topic(kafka_bootstrap, settings.topic_state))
        return {key.decode() for _, _, key, value in records if value is None}

    wait_until(lambda: {"gone", "clock"} <= tombstones(), 60, "tombstones for the idle users")
    assert "flappy" not in tombstones(), "a user with a session online is never deleted"
    assert httpx.get(f"{worker.url}/presence/gone", timeout=5).status_code == 404

    def deletions() -> list[tuple[str, str, str, int]]:
        return sorted((p["userid"], p["from"], p["to"], p["seq"]) for p in map(orjson.loads, _transitions_of(
            kafka_bootstrap, settings.topic_transitions)) if p["cause"]["event"] == "deleted")  # fmt: skip

    # Sent before the tombstone, but the two topics promise no order between them: wait for it too.
    wait_until(lambda: len(deletions()) == 2, 60, "the deletion transitions")
    assert deletions() == [("clock", "offline", "offline", 3), ("gone", "offline", "offline", 3)]
