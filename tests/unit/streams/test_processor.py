"""The processor between Faust and the state machine, on plain dicts: decoding, DLQ, redelivery, sweeps."""

from __future__ import annotations

from typing import Any

import orjson

from streams.metrics import WorkerMetrics
from streams.processor import STREAM_TIME_KEY, Outgoing, Processor
from streams.rules import MINUTE_MS, PresenceConfig

T = 1_700_000_000_000


def raw(userid: str, session: str, status: int, at: int, **extra: Any) -> bytes:
    return orjson.dumps({"schema": 1, "userid": userid, "status": status, "time": at, "sessionId": session,
                         "os": "iOS", "clientIp": "1.2.3.4:5", "received_at": at, "delivery_id": "d", **extra})  # fmt: skip


class Harness:
    def __init__(self, config: PresenceConfig | None = None) -> None:
        self.table: dict[str, Any] = {}
        self.metrics = WorkerMetrics()
        # Every test user lives in partition 0.
        self.processor = Processor(
            self.table, config or PresenceConfig(), lambda p: list(self.table.items()) if p == 0 else [],
            self.metrics,
        )  # fmt: skip
        self.offset = 0

    def send(
        self, userid: str, session: str, status: int, at: int, offset: int | None = None
    ) -> list[Outgoing]:
        if offset is None:
            self.offset += 1
            offset = self.offset
        return self.processor.on_raw(
            0, offset, userid.encode(), raw(userid, session, status, at), now_ms=at + 5
        )

    def count(self, outcome: str) -> float:
        return self.metrics.events.labels(outcome)._value.get()  # type: ignore[no-any-return]


def transitions(out: list[Outgoing]) -> list[dict[str, Any]]:
    return [orjson.loads(o.value) for o in out if o.topic == "transitions" and o.value]


def test_invalid_messages_go_to_the_dead_letter_topic_with_a_reason() -> None:
    h = Harness()
    cases = {
        b"{not json": "undecodable_raw",
        orjson.dumps([1, 2]): "invalid_raw",
        orjson.dumps({"userid": "u", "sessionId": "s", "status": 9, "time": T}): "invalid_raw",
        orjson.dumps({"userid": "u", "sessionId": "s", "status": 0, "time": "soon"}): "invalid_raw",
        orjson.dumps({"userid": "u", "sessionId": "s", "status": True, "time": T}): "invalid_raw",
    }
    for value, reason in cases.items():
        (out,) = h.processor.on_raw(0, 1, b"u", value, now_ms=T)
        assert out.topic == "dlq"
        letter = orjson.loads(out.value or b"")
        assert letter["reason"] == reason and letter["source"] == "worker"
        assert letter["raw"] == value.decode("utf-8", errors="replace")
    assert h.table == {}
    assert h.count("invalid") == len(cases)


def test_a_key_that_is_not_the_userid_is_refused() -> None:
    h = Harness()
    (out,) = h.processor.on_raw(0, 1, b"someone-else", raw("u", "s", 0, T), now_ms=T)
    assert out.topic == "dlq" and orjson.loads(out.value or b"")["reason"] == "key_mismatch"


def test_s10_only_a_redelivery_of_the_same_record_resends_its_transition() -> None:
    h = Harness()
    first = transitions(h.send("u", "s1", 0, T, offset=10))
    assert [(t["from"], t["to"], t["seq"]) for t in first] == [("offline", "online", 1)]
    # An upstream retry is a new Kafka record: a plain duplicate, nothing is sent again.
    assert transitions(h.send("u", "s1", 0, T, offset=11)) == []
    # The same record delivered again (the worker died before its sends were acknowledged): sent again, identical.
    again = transitions(h.send("u", "s1", 0, T, offset=10))
    assert [{k: v for k, v in t.items() if k != "emitted_at"} for t in again] == [
        {k: v for k, v in t.items() if k != "emitted_at"} for t in first
    ]
    assert h.count("duplicate") == 2


def test_s10_a_redelivery_rewrites_the_record_so_a_lost_changelog_write_is_repaired() -> None:
    h = Harness()
    h.send("u", "s1", 0, T, offset=1)
    h.table.clear()  # what a restored table looks like if the write never reached the changelog...
    h.send("u", "s1", 0, T, offset=1)  # ...the redelivery applies it again and writes it
    assert "u" in h.table
    stored = dict(h.table)
    writes: list[str] = []

    class Recording(dict[str, Any]):
        def __setitem__(self, key: str, value: Any) -> None:
            writes.append(key)
            super().__setitem__(key, value)

    h.processor._table = Recording(stored)
    h.send("u", "s1", 0, T, offset=1)  # delivered once more: nothing changes, but the record is written again
    assert writes == ["u"]
    assert dict(h.processor._table) == stored


def test_s10_a_redelivered_online_never_reopens_a_session_dropped_since() -> None:
    config = PresenceConfig(ended_session_retention_ms=MINUTE_MS)
    h = Harness(config)
    h.send("u", "s1", 0, T, offset=1)
    h.send("u", "s1", 1, T + 1000, offset=2)
    h.send("other", "x", 0, T + 5 * MINUTE_MS, offset=3)  # stream time moves on: s1 is dropped (S6)
    assert orjson.loads(h.table["u"])["sessions"] == {}
    # After a crash the restored table is this one, and offsets 1-3 are delivered again.
    again = h.send("u", "s1", 0, T, offset=1)
    assert orjson.loads(h.table["u"])["sessions"] == {}, "the old online must not re-open the dropped session"
    (state,) = [orjson.loads(o.value or b"") for o in again if o.topic == "state"]
    assert state["status"] == "offline"
    # It re-sends exactly what it caused the first time.
    assert [(t["from"], t["to"], t["seq"]) for t in transitions(again)] == [("offline", "online", 1)]


def test_stream_time_is_the_largest_event_time_seen_on_the_partition() -> None:
    h = Harness()
    h.send("a", "s", 0, T + 500)
    h.send("b", "s", 0, T)  # older, from another user: stream time does not go back
    assert h.processor.stream_time(0) == T + 500


def test_stream_time_is_restored_from_the_records_and_survives_deleting_the_newest() -> None:
    config = PresenceConfig(ended_session_retention_ms=MINUTE_MS, user_retention_ms=10 * MINUTE_MS)
    h = Harness(config)
    h.send("a", "s", 0, T)
    h.send("b", "s", 0, T + 500)
    # A restarted worker (same table, new processor) finds the stream time in the records.
    again = Processor(h.table, config, lambda p: list(h.table.items()))
    assert again.stream_time(0) == T + 500
    # b logs out and is deleted once idle past user retention; the stream time must outlive b's record.
    h.send("b", "s", 2, T + 600)
    h.send("a", "s", 2, T + 700)
    h.send("c", "s", 0, T + 11 * MINUTE_MS)
    assert "b" not in h.table and "a" not in h.table
    del h.table["c"]  # as if c's write had not reached the changelog before a crash
    again = Processor(h.table, config, lambda p: list(h.table.items()))
    assert again.stream_time(0) == T + 11 * MINUTE_MS
    assert h.table[f"{STREAM_TIME_KEY}0"] == str(T + 11 * MINUTE_MS).encode()


def test_s6_ended_sessions_are_dropped_and_idle_users_deleted_in_stream_time() -> None:
    config = PresenceConfig(ended_session_retention_ms=MINUTE_MS, user_retention_ms=10 * MINUTE_MS)
    h = Harness(config)
    h.send("gone", "s", 0, T)
    h.send("gone", "s", 1, T + 1000)
    assert len(orjson.loads(h.table["gone"])["sessions"]) == 1
    # Another user's traffic moves stream time on; the ended session is dropped without any output.
    out = h.send("other", "x", 0, T + 2 * MINUTE_MS)
    assert len(orjson.loads(h.table["gone"])["sessions"]) == 0
    assert [o for o in out if o.key == b"gone"] == []
    # Past the user retention the record is deleted and STATE gets a tombstone.
    out = h.send("other", "x", 1, T + 11 * MINUTE_MS)
    assert "gone" not in h.table
    assert Outgoing("state", b"gone", None) in out


def test_s8_a_held_offline_is_released_by_stream_time_and_by_ticks_on_an_idle_partition() -> None:
    config = PresenceConfig(offline_grace_ms=30_000)
    h = Harness(config)
    h.send("u", "s1", 0, T)
    held = h.send("u", "s1", 1, T + 1000)
    assert transitions(held) == [], "the offline is held"
    # Back online within the grace: nothing at all is emitted.
    assert transitions(h.send("u", "s2", 0, T + 2000)) == []
    assert transitions(h.send("u", "s2", 1, T + 3000)) == []
    # Stream time passes t + G through other traffic: the offline is released.
    released = transitions(h.send("other", "x", 0, T + 40_000))
    assert [(t["userid"], t["from"], t["to"], t["at"]) for t in released if t["userid"] == "u"] == [
        ("u", "online", "offline", T + 3000)
    ]
    # On an idle partition a tick releases it after G of wall time.
    h.send("v", "s1", 0, T + 50_000)
    h.send("v", "s1", 1, T + 51_000)
    assert h.processor.on_tick(0, 99, now_ms=T + 51_010) == []
    out = h.processor.on_tick(0, 100, now_ms=T + 51_010 + 31_000)
    assert [(t["userid"], t["to"]) for t in transitions(out)] == [("v", "offline")]


def test_gauges_follow_the_records() -> None:
    h = Harness()
    h.send("a", "s1", 0, T)
    h.send("b", "s1", 0, T)
    h.send("b", "s1", 2, T + 1)
    h.processor.publish_gauges()
    assert h.metrics.users._value.get() == 2
    assert h.metrics.online_users._value.get() == 1
    assert h.metrics.online_sessions.labels("iOS")._value.get() == 1


def test_s6_the_sweep_index_keeps_one_live_entry_per_user_however_often_it_is_written() -> None:
    config = PresenceConfig(ended_session_retention_ms=MINUTE_MS)
    h = Harness(config)
    for n in range(300):
        h.send("busy", f"s{n}", 0, T + 10 * n)
        h.send("busy", f"s{n}", 1, T + 10 * n + 5)
    # Stream time passes every due time written so far: each stale entry is dropped, not filed again.
    h.send("other", "x", 0, T + 10 * MINUTE_MS)
    heap = h.processor._due[0]
    assert len([entry for entry in heap if entry[1] == "busy"]) <= 1
    assert orjson.loads(h.table["busy"])["sessions"] == {}


def test_s6_the_sweep_index_stays_bounded_when_due_times_lie_far_ahead() -> None:
    # Offline users are due for deletion 30 days after their last event: every event moves that due time, and
    # the superseded entries are far from being popped. The index must not grow with the number of events.
    h = Harness()
    users = 20
    for n in range(5000):
        user = f"u{n % users}"
        h.send(user, "s", n % 2, T + n)
    heap = h.processor._due[0]
    assert len(heap) <= 2 * users + 1000, len(heap)
    # Compacting keeps exactly the live entries.
    assert {userid for _, userid in heap} >= set(h.processor._scheduled[0])
