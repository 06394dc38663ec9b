"""The checker's queue: which users are checked, in what order, and which are skipped (reconciliation, R1-R5)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from core.contract import OBSERVATION_SOURCES
from streams.reconcile import (
    CheckQueue,
    Offer,
    age_check_due,
    gap_rank,
    next_age_check_at,
)

MINUTE = 60_000
T0 = 1_700_000_000_000


def queue(**kwargs: int) -> CheckQueue:
    return CheckQueue(recheck_interval_ms=kwargs.pop("recheck_interval_ms", 10 * MINUTE), **kwargs)


def drain(q: CheckQueue, now: int = T0) -> list[tuple[str, str]]:
    out = []
    while (check := q.pop(now)) is not None:
        out.append((check.userid, check.source))
        q.done(check, now)
    return out


def test_most_urgent_first_then_rank_then_arrival() -> None:
    q = queue()
    q.offer("aged-old", "age", T0, rank=1)
    q.offer("aged-older", "age", T0, rank=0)
    q.offer("gap", "intake_gap", T0)
    q.offer("suspect", "suspect", T0)
    q.offer("asked", "on_demand", T0)
    q.offer("asked-2", "on_demand", T0)
    assert drain(q) == [
        ("asked", "on_demand"),
        ("asked-2", "on_demand"),
        ("suspect", "suspect"),
        ("gap", "intake_gap"),
        ("aged-older", "age"),
        ("aged-old", "age"),
    ]


def test_one_pending_check_per_user_and_a_more_urgent_reason_raises_it() -> None:
    q = queue()
    assert q.offer("u", "age", T0) is Offer.QUEUED
    assert q.offer("u", "age", T0) is Offer.DUPLICATE
    q.offer("v", "intake_gap", T0)
    assert q.offer("u", "suspect", T0) is Offer.RAISED
    assert q.offer("u", "intake_gap", T0) is Offer.DUPLICATE
    assert len(q) == 2
    assert drain(q) == [("u", "suspect"), ("v", "intake_gap")]


def test_age_checks_wait_for_the_recheck_interval() -> None:
    q = queue(recheck_interval_ms=10 * MINUTE)
    q.offer("u", "age", T0)
    check = q.pop(T0)
    assert check is not None
    q.done(check, T0)
    assert q.offer("u", "age", T0 + 9 * MINUTE) is Offer.FRESH
    assert q.offer("u", "age", T0 + 10 * MINUTE) is Offer.QUEUED


def test_suspects_and_gaps_want_a_check_sent_after_the_doubt_arose() -> None:
    q = queue()
    q.offer("u", "age", T0)
    check = q.pop(T0)
    assert check is not None
    q.done(check, T0)
    # A gap that ended before that check: the check already saw the truth after it.
    assert q.offer("u", "intake_gap", T0 + 1, fresh_after=T0 - 5000) is Offer.FRESH
    # A late event that arrived after the check: a new check is needed.
    assert q.offer("u", "suspect", T0 + 1) is Offer.QUEUED


def test_on_demand_always_checks() -> None:
    q = queue()
    q.offer("u", "on_demand", T0)
    check = q.pop(T0)
    assert check is not None
    q.done(check, T0)
    assert q.offer("u", "on_demand", T0) is Offer.QUEUED


def test_a_user_is_never_checked_twice_at_once() -> None:
    q = queue()
    q.offer("u", "suspect", T0)
    running = q.pop(T0)
    assert running is not None
    # Doubt that arose after the running check was sent waits for it, then runs.
    assert q.offer("u", "suspect", T0 + 10) is Offer.QUEUED
    assert q.pop(T0 + 10) is None
    # A doubt older than the running check is satisfied by it.
    assert q.offer("u", "intake_gap", T0 + 20, fresh_after=T0 - 1) is Offer.DUPLICATE
    q.done(running, T0)
    again = q.pop(T0 + 30)
    assert again is not None and again.source == "suspect"


def test_a_deferred_check_is_dropped_when_the_running_one_answers_it() -> None:
    q = queue()
    q.offer("u", "age", T0)
    running = q.pop(T0)
    assert running is not None
    assert q.offer("u", "on_demand", T0 + 5) is Offer.QUEUED
    assert q.pop(T0 + 5) is None
    q.done(running, T0)
    # On demand means a new check, whatever ran before.
    assert [c for c in [q.pop(T0 + 6)] if c is not None][0].source == "on_demand"


def test_cap_per_intake_gap() -> None:
    q = queue(gap_cap=2)
    results = [q.offer(f"u{n}", "intake_gap", T0, gap="gap-1") for n in range(4)]
    assert results == [Offer.QUEUED, Offer.QUEUED, Offer.GAP_CAP, Offer.GAP_CAP]
    assert q.offer("u9", "intake_gap", T0, gap="gap-2") is Offer.QUEUED
    # Duplicates do not use up the cap.
    assert q.offer("u0", "intake_gap", T0, gap="gap-2") is Offer.DUPLICATE
    assert q.offer("u10", "intake_gap", T0, gap="gap-2") is Offer.QUEUED


def test_a_full_queue_evicts_the_least_urgent_for_a_more_urgent_check() -> None:
    q = queue(capacity=2)
    q.offer("a", "age", T0, rank=1)
    q.offer("b", "age", T0, rank=2)
    assert q.offer("c", "age", T0, rank=3) is Offer.FULL
    assert q.offer("d", "suspect", T0) is Offer.QUEUED
    assert q.evicted == 1
    assert drain(q) == [("d", "suspect"), ("a", "age")]


def test_failed_checks_are_retried_then_dropped() -> None:
    q = queue(max_attempts=2)
    q.offer("u", "suspect", T0)
    first = q.pop(T0)
    assert first is not None
    assert q.failed(first, T0) is True
    second = q.pop(T0)
    assert second is not None and second.attempts == 1
    assert q.failed(second, T0) is False
    assert q.pop(T0) is None and q.dropped == 1
    # On demand: the asker gets the error, nothing is retried behind their back.
    q.offer("v", "on_demand", T0)
    asked = q.pop(T0)
    assert asked is not None
    assert q.failed(asked, T0) is False


def test_depth_by_reason() -> None:
    q = queue()
    q.offer("a", "age", T0)
    q.offer("b", "age", T0)
    q.offer("c", "suspect", T0)
    assert q.depth() == {"age": 2, "suspect": 1}


def test_remembered_answers_are_pruned_past_the_recheck_interval() -> None:
    q = queue(recheck_interval_ms=MINUTE)
    for n in range(100):
        q.offer(f"u{n}", "age", T0 + n * MINUTE)
        check = q.pop(T0 + n * MINUTE)
        assert check is not None
        q.done(check, T0 + n * MINUTE)
    assert len(q._checked) <= 2


def test_age_rule() -> None:
    hour = 60 * MINUTE
    due = {"max_silence_ms": 4 * hour, "recheck_interval_ms": hour}
    assert not age_check_due(now_ms=T0 + 3 * hour, last_event_ms=T0, verified_at_ms=None, **due)
    assert age_check_due(now_ms=T0 + 4 * hour, last_event_ms=T0, verified_at_ms=None, **due)
    # Verified 30 minutes ago: the next check waits for the recheck interval.
    assert not age_check_due(
        now_ms=T0 + 5 * hour, last_event_ms=T0, verified_at_ms=T0 + 4 * hour + 30 * MINUTE, **due
    )
    assert (
        next_age_check_at(last_event_ms=T0, verified_at_ms=T0 + 4 * hour + 30 * MINUTE, **due)
        == T0 + 5 * hour + 30 * MINUTE
    )


def test_gap_candidates() -> None:
    gap = {"gap_start_ms": T0, "gap_end_ms": T0 + 2 * MINUTE, "lookback_ms": MINUTE}
    assert gap_rank(shown_online=True, online_since_ms=T0 - 1, last_event_ms=T0 - 1, **gap) == 0
    assert gap_rank(shown_online=True, online_since_ms=T0 + 1, last_event_ms=T0 + 1, **gap) == 1
    assert gap_rank(shown_online=False, online_since_ms=None, last_event_ms=T0 - 30_000, **gap) == 1
    assert gap_rank(shown_online=False, online_since_ms=None, last_event_ms=T0 - 2 * MINUTE, **gap) is None
    assert gap_rank(shown_online=False, online_since_ms=None, last_event_ms=None, **gap) is None


offers = st.lists(
    st.tuples(
        st.sampled_from([f"u{n}" for n in range(8)]),
        st.sampled_from(OBSERVATION_SOURCES),
        st.integers(0, 3),
        st.booleans(),  # pop (and answer) one check after this offer
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(offers, st.integers(1, 5))
def test_invariants(items: list[tuple[str, str, int, bool]], capacity: int) -> None:
    """However offers and pops interleave: never more pending than the capacity, never one user twice in
    flight, and each pop is the most urgent of what is pending at that moment."""
    q = queue(capacity=capacity)
    now = T0
    for userid, source, rank, pop in items:
        now += 1
        q.offer(userid, source, now, rank=rank)  # type: ignore[arg-type]
        assert len(q._live) <= capacity
        if pop:
            pending = sorted(q._checks[u].key for u in q._live)
            check = q.pop(now)
            if check is not None:
                assert check.key == pending[0]
                assert q.in_flight() == 1
                q.done(check, now)
            assert q.in_flight() == 0
