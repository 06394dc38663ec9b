"""Intake gaps (G10): which answers may lose callbacks, how failures coalesce into a bounded number of markers,
the heartbeat file, a marker's copies on every partition, and the app marking gaps end to end on the in-memory
Kafka. The pure parts run on fake clocks; nothing sleeps."""

from __future__ import annotations

import asyncio
import os
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.contract import UPSTREAM_TIMEOUT_MS, GapMarker, decode_raw_record, encode_gap_marker
from gateway.acks import PartitionBatches
from gateway.gaps import (
    HEARTBEAT_FILE,
    GapTracker,
    Heartbeat,
    HeartbeatFile,
    Outbox,
    Window,
    answer_gap_reason,
    marker_of,
    recovered,
)
from gateway.spool import ALL_PARTITIONS, SpoolRecord, read_frames

from .conftest import AppHarness, signed_url
from .fakes import MemoryKafka

Harness = Callable[..., Any]
T0 = 1_700_000_000_000


# --- which answers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "duration_ms", "reason"),
    [
        (200, 10, None),
        (200, UPSTREAM_TIMEOUT_MS - 1, None),
        (200, UPSTREAM_TIMEOUT_MS, "slow_answer"),
        (503, 5, "error_answer"),  # neither Kafka nor the spool took the events
        (500, 5, "error_answer"),
        (408, 4000, "error_answer"),  # the body did not arrive in time
        (413, 5, "error_answer"),  # upstream's retries get the same answer, then it drops the callback
        (400, 5, "error_answer"),
        (401, 5, None),  # not proved to be upstream: must not spend the check budget
        (403, 5, None),
        (401, UPSTREAM_TIMEOUT_MS + 1, None),
    ],
)
def test_g10_which_answers_may_lose_callbacks(status: int, duration_ms: int, reason: str | None) -> None:
    assert answer_gap_reason(status, duration_ms) == reason


# --- coalescing ---------------------------------------------------------------------------------------------


def test_g10_a_burst_of_failures_is_one_window_published_once_it_is_quiet() -> None:
    tracker = GapTracker(quiet_ms=5_000, max_ms=60_000)
    assert tracker.failed("error_answer", T0 - 300, T0, T0)
    for i in range(1, 200):  # 200 failing requests, 10 ms apart
        now = T0 + 10 * i
        assert not tracker.failed("error_answer", now - 300, now, now)
        assert tracker.due(now) == []
    last = T0 + 1_990
    assert tracker.next_due_ms() == last + 5_000
    assert tracker.due(last + 4_999) == []
    assert tracker.due(last + 5_000) == [Window("error_answer", T0 - 300, last)]
    assert tracker.due(last + 60_000) == [] and tracker.next_due_ms() is None


def test_g10_failures_that_never_stop_make_one_marker_per_max_window() -> None:
    tracker = GapTracker(quiet_ms=5_000, max_ms=60_000)
    published: list[Window] = []
    for second in range(600):  # ten minutes of a failure every second
        now = T0 + second * 1000
        tracker.failed("error_answer", now - 100, now, now)
        published += tracker.due(now)
    # Due when a window is 60 s old: nine so far, the tenth still open while the failures go on.
    assert len(published) == 9
    published += tracker.flush()
    # Together they cover the whole time, each window no longer than the maximum.
    assert published[0].start == T0 - 100
    for before, after in zip(published, published[1:], strict=False):
        assert after.start <= before.end + 1000
    assert all(w.end - w.start <= 60_000 + 100 for w in published)


def test_g10_reasons_have_windows_of_their_own() -> None:
    tracker = GapTracker(quiet_ms=1_000, max_ms=10_000)
    tracker.failed("error_answer", T0, T0 + 1, T0 + 1)
    tracker.failed("slow_answer", T0 - 6_000, T0 + 2, T0 + 2)
    assert sorted(tracker.open_windows()) == [
        Window("error_answer", T0, T0 + 1),
        Window("slow_answer", T0 - 6_000, T0 + 2),
    ]
    assert tracker.due(T0 + 1_001) == [Window("error_answer", T0, T0 + 1)]
    assert tracker.due(T0 + 1_002) == [Window("slow_answer", T0 - 6_000, T0 + 2)]
    assert tracker.open_windows() == []


def test_g10_the_outbox_keeps_one_waiting_window_per_reason_and_takes_back_a_failed_hand_off() -> None:
    outbox = Outbox()
    outbox.add(Window("error_answer", 100, 200))
    outbox.add(Window("error_answer", 300, 400))
    outbox.add(Window("unclean_stop", 50, 60))
    assert len(outbox) == 2
    first = outbox.take()
    assert first == Window("unclean_stop", 50, 60)  # oldest first
    assert outbox.take() is None  # one hand-off at a time
    outbox.add(Window("unclean_stop", 70, 80))
    outbox.done(handed_off=False)  # neither published nor spooled: merged with the newer one of its reason
    assert sorted(outbox.windows()) == [Window("error_answer", 100, 400), Window("unclean_stop", 50, 80)]
    taken = outbox.take()
    outbox.done(handed_off=True)
    assert taken is not None and taken not in outbox.windows() and len(outbox) == 1


def test_g10_a_marker_is_named_the_same_wherever_it_is_sent() -> None:
    marker = marker_of(Window("unclean_stop", T0, T0 + 5), "gateway-0")
    assert marker == GapMarker(
        f"gateway-0:unclean_stop:{T0}-{T0 + 5}", "gateway-0", "unclean_stop", T0, T0 + 5
    )
    assert decode_raw_record(None, encode_gap_marker(marker), "0@1") == marker._replace(delivery_id="0@1")


# --- the heartbeat ------------------------------------------------------------------------------------------


def test_g10_what_a_start_owes() -> None:
    pending = (Window("error_answer", T0 - 50, T0 - 40),)
    assert recovered(None, T0) == []
    assert recovered(Heartbeat(T0 - 10, clean=True, pending=pending), T0) == list(pending)
    assert recovered(Heartbeat(T0 - 10, clean=False, pending=pending), T0) == [
        *pending,
        Window("unclean_stop", T0 - 10, T0),
    ]
    # A wall clock set back since the last beat: still a window, not an inverted one.
    assert recovered(Heartbeat(T0 + 10, clean=False), T0) == [Window("unclean_stop", T0, T0)]


def test_g10_heartbeat_file_round_trip_and_an_unreadable_one(tmp_path: Path) -> None:
    heartbeat = HeartbeatFile(tmp_path / "spool", "gateway-0")
    assert heartbeat.read() is None
    beat = Heartbeat(T0, clean=False, pending=(Window("slow_answer", T0 - 9, T0 - 1),))
    heartbeat.write(beat, sync=False)
    assert heartbeat.read() == beat
    heartbeat.write(Heartbeat(T0 + 5, clean=True), sync=True)
    assert heartbeat.read() == Heartbeat(T0 + 5, clean=True)
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == [HEARTBEAT_FILE]  # no temporary left
    # A node crash can leave an empty file: an unclean stop at its modification time.
    heartbeat.path.write_bytes(b"")
    os.utime(heartbeat.path, ns=(T0 * 1_000_000, T0 * 1_000_000))
    assert heartbeat.read() == Heartbeat(T0, clean=False)


# --- one copy per partition ---------------------------------------------------------------------------------


def test_g10_a_record_for_every_partition_survives_the_spool_and_old_frames_still_read() -> None:
    records = [
        SpoolRecord("raw", None, b"marker", ALL_PARTITIONS),
        SpoolRecord("raw", None, b"copy", 3),
        SpoolRecord("raw", b"u", b"event"),
    ]
    data = b"".join(r.encode() for r in records)
    assert read_frames(data) == (records, len(data))
    # A frame as written before records could name a partition: [length][crc][u16 topic][i32 key][...].
    payload = struct.pack(">Hi", 3, 1) + b"raw" + b"u" + b"event"
    old = struct.pack(">II", len(payload), zlib.crc32(payload)) + payload
    assert read_frames(old) == ([SpoolRecord("raw", b"u", b"event")], len(old))


async def test_g10_a_record_for_every_partition_is_one_copy_per_partition() -> None:
    kafka = MemoryKafka(partitions=4)
    batches = await PartitionBatches.for_topics(kafka.producer(), ["raw"], linger=0)
    marker = SpoolRecord("raw", None, b"marker", ALL_PARTITIONS)
    handover = batches.hand_over([SpoolRecord("raw", b"u1", b"e1"), marker])
    await asyncio.wait_for(handover.acknowledged(), 5)
    assert sorted(p for topic, p, key in kafka.placed if key is None) == [0, 1, 2, 3]
    assert len(handover.records) == 2  # the drainer counts what it handed over, not the copies

    kafka.set_up(False)
    handover = batches.hand_over([marker])
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(handover.acknowledged(), 0.05)
    # What is spooled again are the copies, each naming its partition.
    assert sorted(handover.unacknowledged(), key=lambda r: r.partition or 0) == [
        SpoolRecord("raw", None, b"marker", p) for p in range(4)
    ]
    kafka.set_up(True)


# --- the app --------------------------------------------------------------------------------------------------


def raw_topic(h: AppHarness) -> str:
    topic: str = h.app.state.gateway.settings.topic_raw
    return topic


def markers(h: AppHarness) -> list[dict[str, Any]]:
    return [
        orjson.loads(value)
        for key, value in h.kafka.topic(raw_topic(h))
        if key is None and orjson.loads(value).get("kind") == "intake_gap"
    ]


def marker_partitions(h: AppHarness) -> list[int]:
    return sorted(p for topic, p, key in h.kafka.placed if topic == raw_topic(h) and key is None)


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


def events(n: int) -> list[dict[str, Any]]:
    now = time.time_ns() // 1_000_000
    return [{"userid": f"u{i}", "status": "0", "time": now, "sessionId": f"s{i}"} for i in range(n)]


GAPS = {"gateway_instance": "gw-a", "gateway_gap_quiet_seconds": 0.5, "gateway_max_events": 1}


async def test_g10_failed_answers_make_one_marker_on_every_partition(harness_factory: Harness) -> None:
    async with harness_factory(**GAPS) as h:
        started = time.time_ns() // 1_000_000
        for i in range(20):  # 413: more events than the limit
            r = await h.client.post(signed_url(nonce=f"n{i}"), json=events(2))
            assert r.status_code == 413
        assert (await h.client.post(signed_url(nonce="ok"), json=events(1))).status_code == 200
        await wait_for(lambda: len(markers(h)) == 4)
        ended = time.time_ns() // 1_000_000
        assert marker_partitions(h) == [0, 1, 2, 3]
        assert len({m["id"] for m in markers(h)}) == 1
        marker = markers(h)[0]
        assert marker["reason"] == "error_answer" and marker["gateway"] == "gw-a"
        assert started <= marker["start"] <= marker["end"] <= ended
        assert h.sample("presence_gateway_intake_gap_markers_total", reason="error_answer") == 1
        # Unsigned requests never make a gap.
        for i in range(5):
            r = await h.client.post(signed_url(nonce=f"x{i}", secret="wrong-secret-000"), json=events(1))
            assert r.status_code == 401
        gaps = h.app.state.gateway.gaps
        assert gaps.tracker.open_windows() == [] and len(gaps.outbox) == 0


async def test_g10_a_marker_kafka_does_not_take_goes_to_the_spool_and_out_with_it(
    harness_factory: Harness,
) -> None:
    kafka = MemoryKafka()
    async with harness_factory(kafka=kafka, **GAPS) as h:
        kafka.set_up(False)
        assert (await h.client.post(signed_url(), json=events(2))).status_code == 413
        spool = h.app.state.gateway.publisher.spool
        await wait_for(
            lambda: h.sample("presence_gateway_intake_gap_markers_total", reason="error_answer") == 1
        )
        assert spool.records >= 1 and markers(h) == []
        kafka.set_up(True)
        await wait_for(lambda: len(markers(h)) == 4)
        assert marker_partitions(h) == [0, 1, 2, 3]


async def test_g10_unclean_stop_is_marked_from_the_last_heartbeat_and_a_clean_one_is_not(
    harness_factory: Harness, tmp_path: Path
) -> None:
    heartbeat = HeartbeatFile(tmp_path / "spool", "gw-a")
    last = time.time_ns() // 1_000_000 - 30_000
    heartbeat.write(Heartbeat(last, clean=False), sync=False)  # what a SIGKILL leaves
    async with harness_factory(**GAPS) as h:
        await wait_for(lambda: len(markers(h)) == 4)
        marker = markers(h)[0]
        assert marker["reason"] == "unclean_stop" and marker["start"] == last
        assert marker["end"] >= last + 30_000
        on_disk = heartbeat.read()
        assert on_disk is not None and not on_disk.clean
    on_disk = heartbeat.read()
    assert on_disk is not None and on_disk.clean and on_disk.pending == ()
    async with harness_factory(**GAPS) as h:
        assert (await h.client.post(signed_url(), json=events(1))).status_code == 200
        await wait_for(lambda: len(h.kafka.topic(raw_topic(h))) == 1)
        assert markers(h) == []
        assert h.sample("presence_gateway_intake_gap_markers_total", reason="unclean_stop") == 0


async def test_g10_what_could_not_be_published_waits_in_the_clean_stop_mark(
    harness_factory: Harness, tmp_path: Path
) -> None:
    kafka = MemoryKafka()
    async with harness_factory(kafka=kafka, gateway_spool_enabled=False, **GAPS) as h:
        kafka.set_up(False)
        # Neither Kafka nor a spool: 503, and the marker cannot go anywhere either.
        assert (await h.client.post(signed_url(), json=events(1))).status_code == 503
        gaps = h.app.state.gateway.gaps
        await wait_for(lambda: gaps.tracker.open_windows() == [] and len(gaps.outbox) == 1)
    on_disk = HeartbeatFile(tmp_path / "spool", "gw-a").read()
    assert on_disk is not None and on_disk.clean
    assert [w.reason for w in on_disk.pending] == ["error_answer"]
    async with harness_factory(**GAPS) as h:  # Kafka is back: the next start publishes it
        await wait_for(lambda: len(markers(h)) == 4)
        assert markers(h)[0]["reason"] == "error_answer"


async def test_g10_an_answer_later_than_upstreams_timeout_is_marked_slow(harness_factory: Harness) -> None:
    async with harness_factory(**GAPS) as h:
        gaps = h.app.state.gateway.gaps
        gaps.answered(200, 0.01)
        gaps.answered(200, UPSTREAM_TIMEOUT_MS / 1000 - 0.001)
        assert gaps.tracker.open_windows() == []
        before = time.time_ns() // 1_000_000
        gaps.answered(200, UPSTREAM_TIMEOUT_MS / 1000 + 0.2)  # upstream gave up on this attempt
        await wait_for(lambda: len(markers(h)) == 4)
        marker = markers(h)[0]
        assert marker["reason"] == "slow_answer"
        assert marker["start"] <= before - UPSTREAM_TIMEOUT_MS and marker["end"] >= before
