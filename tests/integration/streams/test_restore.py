"""Restore across releases against a real broker: a changelog filled by the previous release (table values without
the record's summary) restores into a wiped state dir, and the worker serves it: queries (Q1), gauges, stream time
and the S6 sweep index come out of those records; a warm restart on the mixed table (old values, and the ones
rewritten since, with summaries) serves the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from confluent_kafka import Producer

from core.contract import Event, changelog_topic
from core.topics import ensure_topics
from presence.children import wait_until
from streams.config import WorkerSettings
from streams.main import worker_topics
from streams.rules import PresenceConfig, apply
from tests.unit.streams.test_processor_summary import previous_encoding

from .harness import WorkerProcess, produce_raw, raw_event, read_topic, worker_env

T = 1_750_000_000_000
HOUR = 3_600_000


def previous_release_record(
    userid: str, sessions: list[tuple[str, int, int, str]], stream_time: int
) -> bytes:
    """A user's table value as the previous release wrote it, after ``sessions`` events (id, status, time, os)."""
    record = None
    for offset, (session, status, at, os_name) in enumerate(sessions):
        event = Event(userid, session, ("online", "offline", "logout")[status], at, os_name, "10.0.0.1:5000", at,
                      f"0@{offset}")  # fmt: skip
        record, _ = apply(record, event, at, PresenceConfig(offline_grace_ms=0))
    assert record is not None
    value = previous_encoding(record, applied_offset=-1, stream_time=stream_time)
    assert not value.startswith(b'{"i":')
    return value


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()


def test_a_changelog_of_the_previous_release_restores_and_serves_then_restarts_warm(
    kafka_bootstrap: str, settings_for: Callable[..., dict[str, Any]], unique: Callable[[str], str],
    workers: list[WorkerProcess], tmp_path: Path,
) -> None:  # fmt: skip
    values = settings_for(topic_partitions=1)
    app_id = unique("restore")
    settings = WorkerSettings(**values, worker_app_id=app_id)
    asyncio.run(ensure_topics(settings, extra=worker_topics(settings)))
    # Two users written by the previous release: one online on two devices, one gone for two hours of stream time.
    table = {
        "kept": previous_release_record("kept", [("k1", 0, T, "iOS"), ("k2", 0, T + 1, "PC")], T + 1),
        "gone": previous_release_record(
            "gone", [("g1", 0, T - 2 * HOUR, "iOS"), ("g1", 1, T - 2 * HOUR + 5, "iOS")], T - 2 * HOUR + 5
        ),  # fmt: skip
    }
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    for key, value in table.items():
        producer.produce(changelog_topic(app_id), key=key.encode(), value=value, partition=0)
    assert producer.flush(30) == 0

    env = worker_env(values, app_id, PRESENCE_WORKER_OFFLINE_GRACE_SECONDS="0",
                     PRESENCE_WORKER_USER_RETENTION_SECONDS="3600")  # fmt: skip
    worker = WorkerProcess(env=env, data_dir=tmp_path / "state", log_path=tmp_path / "worker.log")
    workers.append(worker)
    worker.start()
    worker.wait_ready()

    kept = httpx.get(f"{worker.url}/presence/kept", timeout=5).json()
    assert kept["status"] == "online" and sorted(kept["platforms"]) == ["PC", "iOS"]

    # A new user's event: the partition's indexes are built from the restored records. "gone" has been silent
    # for two hours of stream time (retention one hour): the S6 sweep deletes it, with a tombstone on STATE.
    asyncio.run(produce_raw(kafka_bootstrap, settings.topic_raw, [raw_event("fresh", "f1", 0, T + 10)]))

    def tombstones() -> set[str]:
        return {key.decode() for _, _, key, value in asyncio.run(read_topic(kafka_bootstrap, settings.topic_state))
                if value is None}  # fmt: skip

    wait_until(lambda: "gone" in tombstones(), 60, "the restored user's S6 deletion")
    assert httpx.get(f"{worker.url}/presence/gone", timeout=5).status_code == 404

    # Gauges: kept (two sessions online) and fresh (one), counted from the restored record and the new one. They
    # are published periodically: "gone" counts until the sweep has deleted it, so wait for all of them at once.
    def gauges() -> tuple[float, ...]:
        return (
            worker.metric("presence_worker_users"),
            worker.metric("presence_worker_online_users"),
            worker.metric("presence_worker_sessions"),
            worker.metric("presence_worker_online_sessions", 'os="iOS"'),
            worker.metric("presence_worker_online_sessions", 'os="PC"'),
        )

    wait_until(lambda: gauges() == (2, 2, 3, 2, 1), 30, "the gauges")
    assert worker.metric("presence_worker_stream_time_seconds") == (T + 10) / 1000

    # An event on top of a record of the previous release: "kept" drops its iOS session.
    asyncio.run(produce_raw(kafka_bootstrap, settings.topic_raw, [raw_event("kept", "k1", 1, T + 20)]))
    wait_until(lambda: httpx.get(f"{worker.url}/presence/kept", timeout=5).json()["platforms"] == ["PC"], 30,
               "kept's iOS session to end")  # fmt: skip

    # A warm restart on the table as it is now: "kept" and "fresh" rewritten with summaries, nothing old left
    # but what the restore wrote. The same users, gauges and stream time once a message builds the indexes.
    worker.stop()
    worker.start()
    worker.wait_ready()
    asyncio.run(produce_raw(kafka_bootstrap, settings.topic_raw, [raw_event("later", "l1", 0, T + 30)]))
    # kept (PC online, iOS ended), fresh and later (iOS each).
    wait_until(lambda: gauges() == (3, 3, 4, 2, 1), 60, "the gauges after the restart")
    assert worker.metric("presence_worker_stream_time_seconds") == (T + 30) / 1000
    assert orjson.loads(httpx.get(f"{worker.url}/presence/kept", timeout=5).content)["platforms"] == ["PC"]
