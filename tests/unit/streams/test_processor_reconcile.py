"""The processor's side of reconciliation, on plain dicts: which users it offers for ``age`` checks, from an
in-memory index kept beside the sweep index (no table scan per tick), and which ones an intake gap ranks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from core.contract import GapMarker, ObservationSource, encode_gap_marker
from streams.metrics import WorkerMetrics
from streams.processor import Processor
from streams.reconcile import AgePolicy, CheckQueue, Offer, offer_gap_checks
from streams.rules import MINUTE_MS, PresenceConfig
from tests.unit.streams.test_processor import raw

T = 1_700_000_000_000
SILENCE = 60 * MINUTE_MS
RECHECK = 10 * MINUTE_MS


class Recorder:
    """A check sink in front of a real queue: what was offered, and what the queue did with it."""

    def __init__(self) -> None:
        self.queue = CheckQueue(recheck_interval_ms=RECHECK)
        self.offers: list[tuple[str, ObservationSource, Offer]] = []
        self.now = T

    def offer(
        self,
        userid: str,
        source: ObservationSource,
        *,
        rank: int = 0,
        fresh_after: int | None = None,
        gap: str | None = None,
    ) -> Offer:
        result = self.queue.offer(userid, source, self.now, rank=rank, fresh_after=fresh_after, gap=gap)
        self.offers.append((userid, source, result))
        return result


class Harness:
    def __init__(self) -> None:
        self.table: dict[str, Any] = {}
        self.scans = 0
        self.processor = Processor(self.table, PresenceConfig(), self._records)
        self.sink = Recorder()
        self.processor.enable_reconciliation(self.sink, AgePolicy(SILENCE, RECHECK))
        self.offset = 0

    def _records(self, partition: int) -> Iterator[tuple[str, bytes]]:
        self.scans += 1
        return iter(list(self.table.items()) if partition == 0 else [])

    def send(self, userid: str, session: str, status: int, at: int) -> None:
        self.offset += 1
        self.processor.on_raw(0, self.offset, userid.encode(), raw(userid, session, status, at), now_ms=at)

    def age(self, now: int) -> list[str]:
        self.sink.now = now
        before = len(self.sink.offers)
        self.processor.age_checks(now)
        return [userid for userid, _, _ in self.sink.offers[before:]]


def test_a_user_online_and_silent_for_max_silence_is_offered_once_per_recheck_interval() -> None:
    h = Harness()
    h.send("ghost", "a", 0, T)
    h.send("left", "b", 0, T)
    h.send("left", "b", 1, T + 1000)  # offline: never due
    assert h.age(T + SILENCE - 1) == []
    assert h.age(T + SILENCE) == ["ghost"]
    # Filed again one recheck interval later: not offered on every tick in between.
    assert h.age(T + SILENCE + RECHECK - 1) == []
    # The first offer was never checked (still queued): the second finds it pending.
    assert h.age(T + SILENCE + RECHECK) == ["ghost"]
    assert [result for _, _, result in h.sink.offers] == [Offer.QUEUED, Offer.DUPLICATE]
    assert all(source == "age" for _, source, _ in h.sink.offers)


def test_an_event_moves_the_due_time_and_an_end_takes_the_user_out() -> None:
    h = Harness()
    h.send("u", "a", 0, T)
    h.send("u", "b", 0, T + 30 * MINUTE_MS)  # heard of again: silent from here
    assert h.age(T + SILENCE) == []
    assert h.age(T + 30 * MINUTE_MS + SILENCE) == ["u"]
    h.send("u", "a", 1, T + 100 * MINUTE_MS)
    h.send("u", "b", 1, T + 100 * MINUTE_MS)
    assert h.age(T + 1000 * MINUTE_MS) == []


def test_the_index_is_rebuilt_from_the_table_once_after_a_rebalance_not_per_tick() -> None:
    h = Harness()
    h.send("u", "a", 0, T)
    h.processor.forget_all()  # a rebalance
    scans = h.scans
    assert h.age(T + SILENCE) == [], "not indexed yet: a quiet partition is indexed by the worker's timer"
    h.processor.ensure_indexed([0])
    h.processor.ensure_indexed([0])
    assert h.scans == scans + 1
    for tick in range(5):
        h.age(T + SILENCE + tick * 1000)
    assert h.scans == scans + 1, "no scan per tick"
    assert [userid for userid, _, _ in h.sink.offers] == ["u"]


def test_age_checks_stop_at_the_limit_and_resume_on_the_next_tick() -> None:
    h = Harness()
    for n in range(5):
        h.send(f"u{n}", "a", 0, T + n)
    h.sink.now = T + SILENCE + 10
    assert h.processor.age_checks(T + SILENCE + 10, limit=3) == 3
    assert h.processor.age_checks(T + SILENCE + 10, limit=3) == 2
    assert sorted(userid for userid, _, _ in h.sink.offers) == [f"u{n}" for n in range(5)]


def test_without_reconciliation_nothing_is_offered_or_indexed() -> None:
    table: dict[str, Any] = {}
    processor = Processor(table, PresenceConfig(), lambda p: list(table.items()))
    processor.on_raw(0, 1, b"u", raw("u", "a", 0, T), now_ms=T)
    assert processor.age_checks(T + 365 * 24 * 60 * MINUTE_MS) == 0


# --- intake gaps ---------------------------------------------------------------------------------------------

LOOKBACK = 60_000


def marker(start: int, end: int) -> bytes:
    return encode_gap_marker(GapMarker(f"gw:{start}", "gw", "unclean_stop", start, end))


def test_a_gap_marker_is_set_aside_and_ranks_the_partitions_users() -> None:
    h = Harness()
    gap_start, gap_end = T + 10 * MINUTE_MS, T + 12 * MINUTE_MS
    h.send("dormant", "e", 0, T - 2 * SILENCE)
    h.send("dormant", "e", 1, T - 2 * SILENCE + 1000)  # not heard of within max_silence: not worth a check
    h.send("online-before", "a", 0, T)  # rank 0: an offline lost in the gap would leave a ghost
    h.send("active-before", "b", 0, T + 1000)
    h.send("active-before", "b", 1, gap_start - 30_000)  # rank 1: heard of within the lookback
    h.send("quiet", "c", 0, T + 2000)
    h.send("quiet", "c", 1, T + 3000)  # rank 2: heard of within max_silence (an online lost in the gap?)
    h.send("online-during", "d", 0, gap_start + 1000)  # rank 1: heard of during the gap
    out = h.processor.on_raw(0, 99, None, marker(gap_start, gap_end), now_ms=gap_end + 5)
    assert out == [], "a marker sends nothing and changes no record"
    (taken,) = h.processor.take_gaps()
    assert h.processor.take_gaps() == []
    partition, gap = taken
    ranks = dict(h.processor.gap_candidates(partition, gap, LOOKBACK))
    assert ranks == {"dormant": None, "online-before": 0, "active-before": 1, "quiet": 2, "online-during": 1}


def test_gap_checks_go_most_urgent_first_up_to_the_cap_and_need_a_check_after_the_gap() -> None:
    sink = Recorder()
    sink.queue = CheckQueue(recheck_interval_ms=RECHECK, gap_cap=2)
    ranked = [("r1-a", 1), ("r0-a", 0), ("r1-b", 1), ("r0-b", 0)]
    assert offer_gap_checks(sink, "gap-1", T, ranked) == 2
    assert [(u, r) for u, _, r in sink.offers] == [("r0-a", Offer.QUEUED), ("r0-b", Offer.QUEUED),
                                                  ("r1-a", Offer.GAP_CAP)]  # fmt: skip
    # A user checked after the gap ended needs no check for it.
    sink.queue.done(sink.queue.pop(T + 1) or _fail(), T + 1)
    assert sink.queue.offer("r0-a", "intake_gap", T + 2, fresh_after=T, gap="gap-2") is Offer.FRESH


def _fail() -> Any:
    raise AssertionError("nothing to pop")


def test_without_reconciliation_a_marker_is_only_counted() -> None:
    table: dict[str, Any] = {}
    metrics = WorkerMetrics()
    processor = Processor(table, PresenceConfig(), lambda p: list(table.items()), metrics)
    assert processor.on_raw(0, 1, None, marker(T, T + 1), now_ms=T) == []
    assert processor.take_gaps() == []
    assert metrics.intake_gaps.labels("unclean_stop")._value.get() == 1
