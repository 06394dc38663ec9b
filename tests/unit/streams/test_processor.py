"""The processor between Faust and the state machine, on plain dicts: decoding, DLQ, redelivery, sweeps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
from jsonschema import Draft202012Validator

from streams.metrics import WorkerMetrics
from streams.processor import STREAM_TIME_KEY, Outgoing, Processor, decode_stored, state_of
from streams.rules import MINUTE_MS, PresenceConfig

T = 1_700_000_000_000
TRANSITIONS_SCHEMA = Path(__file__).resolve().parents[3] / "schemas" / "transitions.v1.schema.json"


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
    # It re-sends exactly what it caused the first time, and what followed (a re-send ends on the latest).
    assert [(t["from"], t["to"], t["seq"]) for t in transitions(again)] == [
        ("offline", "online", 1),
        ("online", "offline", 2),
    ]


def test_stream_time_is_the_largest_event_time_seen_on_the_partition() -> None:
    h = Harness()
    h.send("a", "s", 0, T + 500)
    h.send("b", "s", 0, T)  # older, from another user: stream time does not go back
    assert h.processor.stream_time(0) == T + 500


def test_stream_time_is_restored_from_the_records_and_survives_purging_the_newest() -> None:
    config = PresenceConfig(ended_session_retention_ms=MINUTE_MS, user_retention_ms=10 * MINUTE_MS,
                            deletion_memory=1)  # fmt: skip
    h = Harness(config)
    h.send("a", "s", 0, T)
    h.send("b", "s", 0, T + 500)
    # A restarted worker (same table, new processor) finds the stream time in the records.
    again = Processor(h.table, config, lambda p: list(h.table.items()))
    assert again.stream_time(0) == T + 500
    # a and b log out and are deleted once idle past user retention; with room for one deleted user's final
    # record, the older one is purged from the table at once, and the stream time must outlive it.
    h.send("b", "s", 2, T + 600)
    h.send("a", "s", 2, T + 700)
    h.send("c", "s", 0, T + 11 * MINUTE_MS)
    assert state_of(h.table, "a", True) is None and state_of(h.table, "b", True) is None
    assert ("a" in h.table) != ("b" in h.table), "one final record kept"
    # As if c's write and the kept final record had not reached the changelog before a crash.
    del h.table["c"]
    h.table.pop("a", None)
    h.table.pop("b", None)
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
    # Past the user retention the user is deleted: a final transition, then the STATE tombstone.
    out = h.send("other", "x", 1, T + 11 * MINUTE_MS)
    mine = [o for o in out if o.key == b"gone"]
    assert [o.topic for o in mine] == ["transitions", "state"] and mine[1].value is None
    (deletion,) = transitions(mine)
    assert (deletion["from"], deletion["to"], deletion["seq"]) == ("offline", "offline", 3)
    assert deletion["cause"] == {"sessionId": "-", "event": "deleted", "os": None, "clientIp": None}
    assert deletion["at"] == T + 1000 + 10 * MINUTE_MS
    Draft202012Validator(json.loads(TRANSITIONS_SCHEMA.read_text())).validate(deletion)
    # The query API no longer knows the user, nor do the gauges; the table keeps the final record (S10).
    assert state_of(h.table, "gone", True) is None
    assert decode_stored(h.table["gone"]).deleted_by == "0@4"
    h.processor.publish_gauges()
    assert h.metrics.users._value.get() == 1
    assert h.metrics.users_deleted._value.get() == 1


def test_s6_a_deleted_user_who_comes_back_starts_a_new_epoch_while_a_redelivery_recreates_nothing() -> None:
    config = PresenceConfig(user_retention_ms=10 * MINUTE_MS)
    h = Harness(config)
    h.send("u", "s1", 0, T, offset=1)
    h.send("u", "s1", 2, T + 1000, offset=2)
    h.send("other", "x", 0, T + 11 * MINUTE_MS, offset=3)  # deletes u
    # A redelivered event of the deleted user re-sends what it caused and what followed, ending on the deletion,
    # and keeps the user deleted.
    again = h.send("u", "s1", 2, T + 1000, offset=2)
    assert [(t["seq"], t["cause"]["event"]) for t in transitions(again)] == [(2, "logout"), (3, "deleted")]
    assert [o.value for o in again if o.topic == "state"] == [None]
    assert state_of(h.table, "u", True) is None
    # A new event: a new record, a new epoch, from offline; the old epoch's transitions are still remembered.
    later = T + 12 * MINUTE_MS
    back = transitions(h.send("u", "s2", 0, later, offset=4))
    assert [(t["epoch"], t["seq"], t["from"], t["to"]) for t in back] == [(later, 1, "offline", "online")]
    stored = decode_stored(h.table["u"])
    assert stored.deleted_by is None and stored.record is not None
    assert [(m.epoch, m.seq) for m in stored.record.memory] == [(T, 1), (T, 2), (T, 3), (later, 1)]


def test_s6_back_with_an_offline_after_a_deletion_emits_nothing_but_is_known_again() -> None:
    config = PresenceConfig(user_retention_ms=10 * MINUTE_MS)
    h = Harness(config)
    h.send("u", "s1", 2, T)  # offline -> logged_out
    out = h.send("other", "x", 0, T + 11 * MINUTE_MS)  # logged_out -> offline (deleted)
    assert [t["to"] for t in transitions(out) if t["userid"] == "u"] == ["offline"]
    out = h.send("u", "s2", 1, T + 12 * MINUTE_MS)
    # What a follower of TRANSITIONS infers (offline) is what the query API now answers: nothing to send.
    assert transitions(out) == []
    state = state_of(h.table, "u", True)
    assert state is not None and (state["status"], state["seq"]) == ("offline", 0)


def restart(h: Harness) -> Processor:
    """A new processor on the same table: what a restarted worker (or a reassigned partition) starts with."""
    h.processor = Processor(h.table, h.processor._config, lambda p: list(h.table.items()) if p == 0 else [],
                            h.metrics)  # fmt: skip
    return h.processor


def test_s10_a_restart_resends_a_deletion_lost_in_a_crash_before_anything_else() -> None:
    config = PresenceConfig(user_retention_ms=10 * MINUTE_MS)
    h = Harness(config)
    h.send("u", "s1", 0, T, offset=1)
    h.send("u", "s1", 2, T + 1000, offset=2)
    # Offset 3 deletes u; the worker dies before its sends are acknowledged, so offset 3 is not committed.
    lost = [
        t for t in transitions(h.send("other", "x", 0, T + 11 * MINUTE_MS, offset=3)) if t["userid"] == "u"
    ]
    assert [t["cause"]["event"] for t in lost] == ["deleted"]
    restart(h)
    out = h.send("other", "x", 0, T + 11 * MINUTE_MS, offset=3)
    # The user's transitions from the first one triggered at or after the committed offset: the deletion, then
    # the tombstone; then the redelivered message's own re-send.
    mine = [o for o in out if o.key == b"u"]
    assert [(o.topic, o.value is None) for o in mine] == [("transitions", False), ("state", True)]
    assert transitions(mine) == [{**lost[0], "emitted_at": transitions(mine)[0]["emitted_at"]}]
    assert h.count("duplicate") == 1


def test_s10_a_restart_resends_a_sweep_release_lost_in_a_crash() -> None:
    config = PresenceConfig(offline_grace_ms=30_000)
    h = Harness(config)
    h.send("u", "s1", 0, T, offset=1)
    h.send("u", "s1", 1, T + 1000, offset=2)  # held
    released = [t for t in transitions(h.send("v", "x", 0, T + 40_000, offset=3)) if t["userid"] == "u"]
    assert [(t["from"], t["to"]) for t in released] == [("online", "offline")]
    restart(h)
    out = h.send("v", "x", 0, T + 40_000, offset=3)
    again = [t for t in transitions(out) if t["userid"] == "u"]
    assert [(t["seq"], t["to"]) for t in again] == [(2, "offline")], "re-sent once, identical"


def test_s10_a_restart_resends_nothing_that_was_committed() -> None:
    config = PresenceConfig(offline_grace_ms=30_000, user_retention_ms=10 * MINUTE_MS)
    h = Harness(config)
    h.send("u", "s1", 0, T, offset=1)
    h.send("u", "s1", 1, T + 1000, offset=2)
    h.send("v", "x", 0, T + 40_000, offset=3)  # releases u
    h.send("w", "x", 0, T + 12 * MINUTE_MS, offset=4)  # deletes u
    restart(h)
    # Offsets up to 4 were committed: everything they caused reached Kafka; the next message starts at 5.
    out = h.send("y", "x", 0, T + 12 * MINUTE_MS + 1, offset=5)
    assert [t["userid"] for t in transitions(out)] == ["y"]
    # The deleted user's final record is purged: its deletion is known to be acknowledged.
    assert "u" not in h.table


def test_s10_a_tick_release_lost_in_a_crash_is_resent_before_the_users_next_transition() -> None:
    config = PresenceConfig(offline_grace_ms=30_000)
    h = Harness(config)
    h.send("u", "s1", 0, T, offset=1)
    h.send("u", "s1", 1, T + 1000, offset=2)  # held; the partition then stays idle
    h.processor.on_tick(0, 7, now_ms=T + 2000)
    released = transitions(h.processor.on_tick(0, 8, now_ms=T + 40_000))
    assert [(t["userid"], t["to"], t["seq"]) for t in released] == [("u", "offline", 2)]
    # The worker dies before the release is acknowledged: tick 8 is not committed, RAW offset 2 is. After the
    # restart the next RAW message comes before any tick: u's next transition must not overtake the release.
    restart(h)
    out = transitions(h.send("u", "s2", 0, T + 50_000, offset=3))
    assert [(t["seq"], t["from"], t["to"]) for t in out] == [
        (2, "online", "offline"),
        (3, "offline", "online"),
    ]
    # When the first tick comes (offset 8: the release's own), nothing is sent twice.
    assert transitions(h.processor.on_tick(0, 8, now_ms=T + 50_001)) == []


def test_s6_s8_a_user_released_and_due_for_deletion_at_once_is_released_then_deleted_once() -> None:
    config = PresenceConfig(offline_grace_ms=4000, user_retention_ms=15_000)
    h = Harness(config)
    h.send("u", "s1", 0, T)
    h.send("u", "s1", 1, T)  # held until stream time passes T + 4 s
    out = [t for t in transitions(h.send("v", "x", 0, T + 15_001)) if t["userid"] == "u"]
    assert [(t["seq"], t["to"], t["cause"]["event"]) for t in out] == [(2, "offline", "offline"),
                                                                       (3, "offline", "deleted")]  # fmt: skip
    assert state_of(h.table, "u", True) is None


def test_s6_s8_a_tick_on_an_idle_partition_releases_but_never_deletes() -> None:
    # A tick's stream time is made of wall time (S8): it may release a hold, never drop or delete in stream time.
    config = PresenceConfig(offline_grace_ms=4000, user_retention_ms=15_000)
    h = Harness(config)
    h.send("u", "s1", 0, T)
    h.send("u", "s1", 1, T)  # held; the partition stays idle
    h.processor.on_tick(0, 1, now_ms=T + 10)
    out = transitions(h.processor.on_tick(0, 2, now_ms=T + 60_000))
    assert [(t["seq"], t["cause"]["event"]) for t in out] == [(2, "offline")]
    assert state_of(h.table, "u", True) is not None
    # Stream time itself passing the retention deletes the user.
    out = [t for t in transitions(h.send("v", "x", 0, T + 15_001)) if t["userid"] == "u"]
    assert [(t["seq"], t["cause"]["event"]) for t in out] == [(3, "deleted")]


def test_s10_deleted_users_final_records_are_bounded_per_partition() -> None:
    config = PresenceConfig(user_retention_ms=MINUTE_MS, deletion_memory=2)
    h = Harness(config)
    for n in range(5):
        h.send(f"u{n}", "s", 1, T + n)
    h.send("other", "x", 0, T + 2 * MINUTE_MS)  # deletes u0..u4, oldest first
    assert sorted(k for k in h.table if k.startswith("u")) == ["u3", "u4"]
    assert all(state_of(h.table, f"u{n}", True) is None for n in range(5))


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
