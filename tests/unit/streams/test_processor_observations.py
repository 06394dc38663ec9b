"""Observations, suspects and intake gaps through the processor's per-record entry (:meth:`Processor.on_raw`), on
plain dicts: what the worker sends and counts for R2-R5, S10 for observations, and which users a gap queues.

The rules themselves are tested in test_rules_reconcile.py; here the glue: decoding, the record written, TRANSITIONS
and STATE sent, ``presence_worker_reconcile_corrections_total{kind}`` and ``presence_worker_events_total{outcome}``,
and what reaches the checker's queue.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import orjson
from jsonschema import Draft202012Validator

from core.contract import GapMarker, Observation, ObservationSource, encode_gap_marker, encode_observation
from streams.metrics import WorkerMetrics
from streams.processor import Outgoing, Processor, decode_record
from streams.reconcile import AgePolicy, CheckQueue, GapGroups, offer_gap_checks
from streams.rules import MINUTE_MS, PresenceConfig
from tests.unit.streams.test_processor import TRANSITIONS_SCHEMA, raw, transitions
from tests.unit.streams.test_processor_reconcile import Recorder

T = 1_700_000_000_000
MARGIN = 30_000
SCHEMA = Draft202012Validator(json.loads(TRANSITIONS_SCHEMA.read_text()))


class Harness:
    """A processor with reconciliation on: a real check queue behind the sink, users in the partitions given
    (partition 0 unless said otherwise)."""

    def __init__(self, config: PresenceConfig | None = None, gap_cap: int = 10_000) -> None:
        self.table: dict[str, Any] = {}
        self.partition_of: dict[str, int] = {}
        self.metrics = WorkerMetrics()
        self.processor = Processor(self.table, config or PresenceConfig(reconcile_margin_ms=MARGIN),
                                   self._records, self.metrics)  # fmt: skip
        self.sink = Recorder()
        self.sink.queue = CheckQueue(recheck_interval_ms=10 * MINUTE_MS, gap_cap=gap_cap)
        self.processor.enable_reconciliation(self.sink, AgePolicy(60 * MINUTE_MS, 10 * MINUTE_MS))
        self.offsets: dict[int, int] = {}

    def _records(self, partition: int) -> Iterator[tuple[str, bytes]]:
        return iter([(k, v) for k, v in self.table.items() if self.partition_of.get(k, 0) == partition])

    def _next(self, partition: int) -> int:
        self.offsets[partition] = self.offsets.get(partition, 0) + 1
        return self.offsets[partition]

    def send(self, userid: str, session: str, status: int, at: int, **extra: Any) -> list[Outgoing]:
        partition = self.partition_of.get(userid, 0)
        return self.processor.on_raw(partition, self._next(partition), userid.encode(),
                                     raw(userid, session, status, at, **extra), now_ms=at + 5)  # fmt: skip

    def observe(
        self, userid: str, online: bool, at: int, source: ObservationSource = "age", offset: int | None = None
    ) -> list[Outgoing]:
        partition = self.partition_of.get(userid, 0)
        value = encode_observation(Observation(userid, online, at, source, at + 20))
        offset = self._next(partition) if offset is None else offset
        return self.processor.on_raw(partition, offset, userid.encode(), value, now_ms=at + 25)

    def corrections(self, kind: str) -> float:
        return self.metrics.reconcile_corrections.labels(kind)._value.get()  # type: ignore[no-any-return]

    def outcomes(self, outcome: str) -> float:
        return self.metrics.events.labels(outcome)._value.get()  # type: ignore[no-any-return]

    def status(self, userid: str) -> str | None:
        record = decode_record(self.table.get(userid))
        return None if record is None else record.status


def summary(out: list[Outgoing]) -> list[tuple[str, str, int, str, str]]:
    """(from, to, at, cause sessionId, cause event) of each transition sent, each checked against the schema."""
    result = []
    for t in transitions(out):
        SCHEMA.validate(t)
        result.append((t["from"], t["to"], t["at"], t["cause"]["sessionId"], t["cause"]["event"]))
    return result


def states(out: list[Outgoing]) -> list[dict[str, Any]]:
    return [orjson.loads(o.value) for o in out if o.topic == "state" and o.value is not None]


def test_r2_an_offline_observation_ends_old_sessions_as_a_reconcile_correction_and_counts_it() -> None:
    h = Harness()
    h.send("ghost", "a", 0, T)
    h.send("ghost", "b", 0, T + 1000)
    at = T + 10 * MINUTE_MS
    out = h.observe("ghost", False, at)
    assert summary(out) == [("online", "offline", at, "-", "reconcile")]
    (state,) = states(out)
    assert (state["status"], state["sessions"], state["verified_at"]) == ("offline", [], at)
    assert h.corrections("session_ended") == 1
    assert h.corrections("synthetic_opened") == h.corrections("verified") == 0
    # The sessions ended at the horizon (T' - margin): their own online, delivered late, is stale now.
    assert summary(h.send("ghost", "a", 0, T + 2000)) == []
    assert h.outcomes("stale") == 1 and h.status("ghost") == "offline"


def test_r2_an_event_newer_than_the_observation_minus_the_margin_is_never_overruled() -> None:
    h = Harness()
    h.send("u", "a", 0, T)
    out = h.observe("u", False, T + MARGIN - 1)  # RongCloud may not have registered the connection yet
    assert summary(out) == [] and h.status("u") == "online"
    assert sum(h.corrections(kind) for kind in ("session_ended", "synthetic_opened", "verified")) == 0


def test_r3_an_online_observation_opens_a_synthetic_session_until_the_next_newer_event() -> None:
    h = Harness()
    h.send("u", "a", 0, T)
    h.send("u", "a", 1, T + 1000)  # the user's new session's online was lost
    at = T + 5 * MINUTE_MS
    out = h.observe("u", True, at, "intake_gap")
    assert summary(out) == [("offline", "online", at, "-", "reconcile")]
    assert states(out)[0]["status"] == "online"
    assert h.corrections("synthetic_opened") == 1
    # An event older than the observation does not end it ...
    assert summary(h.send("u", "old", 1, at - 1)) == []
    assert h.status("u") == "online"
    # ... the user's next real event newer than it does, as any event would.
    assert summary(h.send("u", "c", 1, at + 1)) == [("online", "offline", at + 1, "c", "offline")]
    # A user the table does not know: online opens a record; offline creates none (nothing to keep).
    assert summary(h.observe("new", True, at)) == [("offline", "online", at, "-", "reconcile")]
    assert h.observe("nobody", False, at) == [] and "nobody" not in h.table
    assert h.corrections("synthetic_opened") == 2


def test_r3_a_later_offline_observation_ends_the_synthetic_session() -> None:
    h = Harness()
    h.send("u", "a", 1, T)
    h.observe("u", True, T + MINUTE_MS)
    out = h.observe("u", False, T + 2 * MINUTE_MS)
    assert summary(out) == [("online", "offline", T + 2 * MINUTE_MS, "-", "reconcile")]
    assert (h.corrections("synthetic_opened"), h.corrections("session_ended")) == (1, 1)


def test_r4_an_agreeing_observation_sends_only_state_with_verified_at_and_counts_as_verified() -> None:
    h = Harness()
    h.send("on", "a", 0, T)
    h.send("off", "a", 0, T)
    h.send("off", "a", 1, T + 1000)
    for userid, online in (("on", True), ("off", False)):
        out = h.observe(userid, online, T + MINUTE_MS)
        assert summary(out) == []
        (state,) = states(out)
        assert state["verified_at"] == T + MINUTE_MS
    assert h.corrections("verified") == 2
    assert h.corrections("session_ended") == h.corrections("synthetic_opened") == 0


def test_corrections_are_counted_by_kind() -> None:
    h = Harness()
    for n in range(3):
        h.send(f"ghost-{n}", "a", 0, T)  # offline lost
    for n in range(2):
        h.send(f"missed-{n}", "a", 1, T)  # online lost
    h.send("fine", "a", 0, T)
    at = T + 10 * MINUTE_MS
    for n in range(3):
        h.observe(f"ghost-{n}", False, at)
    for n in range(2):
        h.observe(f"missed-{n}", True, at)
    h.observe("fine", True, at)
    assert {kind: h.corrections(kind) for kind in ("session_ended", "synthetic_opened", "verified")} == {
        "session_ended": 3,
        "synthetic_opened": 2,
        "verified": 1,
    }


def test_r5_a_too_late_event_opens_nothing_and_offers_the_user_as_a_suspect() -> None:
    h = Harness()
    h.send("u", "s1", 0, T)
    h.send("u", "s1", 1, T + 1000)
    later = T + 16 * MINUTE_MS
    h.send("u", "s2", 0, later)
    h.send("u", "s2", 1, later + 1000)  # stream time is past s1's end + 15 minutes: s1 is forgotten (S6)
    assert "s1" not in orjson.loads(h.table["u"])["sessions"]
    received = later + 2000
    out = h.send("u", "s1", 0, T, received_at=received)  # the original online, re-delivered 16 minutes on
    assert summary(out) == [] and h.status("u") == "offline"
    assert h.outcomes("too_late") == 1
    assert [(userid, source) for userid, source, _ in h.sink.offers] == [("u", "suspect")]
    check = h.sink.queue.pop(received + 1)
    assert check is not None and check.userid == "u" and check.source == "suspect"
    # Only an answer to a request sent after the late event arrived settles the doubt.
    assert check.fresh_after == received


def test_s10_a_redelivered_observation_resends_identical_transitions_and_counts_nothing_again() -> None:
    h = Harness()
    h.send("u", "a", 0, T)
    at = T + 10 * MINUTE_MS
    first = h.observe("u", False, at, offset=50)
    stored = dict(h.table)
    again = h.observe("u", False, at, offset=50)  # the same RAW record (the worker died before acknowledging)

    def without_emitted_at(out: list[Outgoing]) -> list[dict[str, Any]]:
        return [{k: v for k, v in t.items() if k != "emitted_at"} for t in transitions(out)]

    assert without_emitted_at(again) == without_emitted_at(first) != []
    assert states(again) == states(first)
    assert h.table == stored
    assert h.corrections("session_ended") == 1
    # The same answer in a new record (checked again) is no redelivery: it only verifies.
    assert transitions(h.observe("u", False, at, offset=51)) == []
    assert h.corrections("verified") == 1


def test_a_gap_queues_users_online_at_its_start_and_users_heard_of_shortly_before_capped_per_gap() -> None:
    h = Harness(gap_cap=3)
    gap_start, gap_end = T + 10 * MINUTE_MS, T + 11 * MINUTE_MS
    lookback = MINUTE_MS
    # One worker owns both partitions, and the cap is per gap, not per partition.
    for userid, partition in (("recent-0", 0), ("online-0", 0), ("recent-1", 0), ("online-1", 0),
                              ("online-2", 1), ("quiet", 1)):  # fmt: skip
        h.partition_of[userid] = partition
    for n in range(3):
        h.send(f"online-{n}", "a", 0, T + n)  # shown online since before the gap: rank 0
    for n in range(2):
        h.send(f"recent-{n}", "a", 0, gap_start - 30_000)
        h.send(f"recent-{n}", "a", 1, gap_start - 20_000)  # heard of within the lookback: rank 1
    h.send("quiet", "a", 0, T)
    h.send("quiet", "a", 1, T + 1)  # offline 10 minutes before the gap, within max_silence: rank 2
    marker = encode_gap_marker(GapMarker("gw-1:gap", "gw-1", "unclean_stop", gap_start, gap_end))
    for partition in (0, 1):  # the gateway sends the marker to every partition
        assert h.processor.on_raw(partition, h._next(partition), None, marker, now_ms=gap_end + 5) == []
    assert h.metrics.intake_gaps.labels("unclean_stop")._value.get() == 2
    taken = h.processor.take_gaps()
    assert [p for p, _ in taken] == [0, 1] and h.processor.take_gaps() == []
    ranks = {p: dict(h.processor.gap_candidates(p, gap, lookback)) for p, gap in taken}
    assert ranks == {0: {"recent-0": 1, "online-0": 0, "recent-1": 1, "online-1": 0},
                     1: {"online-2": 0, "quiet": 2}}  # fmt: skip
    # What the worker's timer does: the gap's markers gathered (GapGroups), every partition's candidates offered
    # together, rank 0 first, so the cap goes to the most urgent users across partitions.
    groups = GapGroups(settle_ms=2000)
    for p, gap in taken:
        groups.add(p, gap, gap_end + 5)
    assert groups.ready(gap_end + 1000) == [] and len(groups) == 1
    (group,) = groups.ready(gap_end + 2005)
    candidates = [(u, r) for p, _ in group for u, r in ranks[p].items() if r is not None]
    assert offer_gap_checks(h.sink, group[0][1].id, gap_end, candidates) == 3
    assert [(userid, result.value) for userid, _, result in h.sink.offers] == [
        ("online-0", "queued"), ("online-1", "queued"), ("online-2", "queued"), ("recent-0", "gap_cap"),
    ]  # fmt: skip
    assert all(source == "intake_gap" for _, source, _ in h.sink.offers)
    # Each check asks for an answer to a request sent after the gap ended.
    checks = [h.sink.queue.pop(gap_end + 1) for _ in range(3)]
    assert all(c is not None and c.fresh_after == gap_end and c.gap == "gw-1:gap" for c in checks)
    assert [c.userid for c in checks if c is not None] == ["online-0", "online-1", "online-2"]
    assert h.sink.queue.pop(gap_end + 1) is None
