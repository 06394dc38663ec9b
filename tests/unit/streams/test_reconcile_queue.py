"""The checker's queue: which users are checked, in what order, and which are skipped (reconciliation, R1-R5)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.contract import OBSERVATION_SOURCES, ObservationSource
from streams.checkonline import queue_from_settings
from streams.config import WorkerSettings
from streams.reconcile import (
    URGENCY,
    Check,
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
    out: list[tuple[str, str]] = []
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
    # Rank 2: anyone else heard of recently (within max_silence): before the gap, or after it.
    recent = {**gap, "recent_ms": 10 * MINUTE}
    assert gap_rank(shown_online=False, online_since_ms=None, last_event_ms=T0 - 2 * MINUTE, **recent) == 2
    assert gap_rank(shown_online=False, online_since_ms=None, last_event_ms=T0 + 3 * MINUTE, **recent) == 2
    assert (
        gap_rank(shown_online=False, online_since_ms=None, last_event_ms=T0 - 11 * MINUTE, **recent) is None
    )
    assert gap_rank(shown_online=False, online_since_ms=None, last_event_ms=None, **recent) is None
    assert gap_rank(shown_online=True, online_since_ms=T0 - 1, last_event_ms=T0 - 1, **recent) == 0


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
    flight, and each pop is the most urgent of what is pending at that moment (no age check waits long enough
    here to be overdue: a millisecond a step against a patience of five minutes)."""
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


# --- overdue age checks go before intake-gap checks (the age bound under a gap's backlog) ------------------


def test_age_patience_defaults_to_half_the_recheck_interval() -> None:
    assert queue(recheck_interval_ms=10 * MINUTE).age_patience_ms == 5 * MINUTE
    assert CheckQueue(recheck_interval_ms=10 * MINUTE, age_patience_ms=0).age_patience_ms == 0
    with pytest.raises(ValueError):
        CheckQueue(recheck_interval_ms=10 * MINUTE, age_patience_ms=-1)


def test_the_worker_queue_has_half_the_recheck_interval_as_age_patience(tmp_path: Path) -> None:
    worker_settings = WorkerSettings(
        kafka_bootstrap_servers="127.0.0.1:9",
        worker_data_dir=tmp_path,
        reconcile_recheck_interval_seconds=600,
    )
    assert queue_from_settings(worker_settings).age_patience_ms == 300_000


def gap_backlog(q: CheckQueue, n: int, now: int) -> None:
    for k in range(n):
        assert q.offer(f"gap{k}", "intake_gap", now, rank=k % 2, gap="gap-1") is Offer.QUEUED


def test_an_overdue_age_check_goes_before_a_gap_backlog() -> None:
    """R-rules, age: a user shown online and silent is checked within max_silence and one recheck interval,
    however many intake-gap checks an outage queued before them."""
    q = queue(recheck_interval_ms=10 * MINUTE)
    gap_backlog(q, 1000, T0)
    assert q.offer("ghost", "age", T0 + MINUTE) is Offer.QUEUED
    # Not overdue yet: behind the backlog, as before.
    first = q.pop(T0 + 5 * MINUTE + MINUTE - 1)
    assert first is not None and first.source == "intake_gap"
    q.done(first, T0 + 6 * MINUTE)
    # Waited half the recheck interval: next, ahead of the 999 gap checks left.
    overdue = q.pop(T0 + 6 * MINUTE)
    assert overdue is not None and (overdue.userid, overdue.source) == ("ghost", "age")
    q.done(overdue, T0 + 6 * MINUTE)
    rest = drain(q, T0 + 6 * MINUTE)
    assert len(rest) == 999 and {source for _, source in rest} == {"intake_gap"}


def test_an_age_check_not_yet_overdue_stays_behind_gap_checks() -> None:
    q = queue(recheck_interval_ms=10 * MINUTE)
    q.offer("ghost", "age", T0)
    gap_backlog(q, 3, T0)
    assert [user for user, _ in drain(q, T0 + 5 * MINUTE - 1)] == ["gap0", "gap2", "gap1", "ghost"]


def test_an_overdue_age_check_never_goes_before_a_suspect_or_on_demand_check() -> None:
    q = queue(recheck_interval_ms=10 * MINUTE)
    q.offer("ghost", "age", T0)
    gap_backlog(q, 2, T0)
    later = T0 + 30 * MINUTE
    q.offer("late", "suspect", later)
    q.offer("asked", "on_demand", later)
    assert drain(q, later) == [
        ("asked", "on_demand"),
        ("late", "suspect"),
        ("ghost", "age"),
        ("gap0", "intake_gap"),
        ("gap1", "intake_gap"),
    ]


def test_overdue_age_checks_go_earliest_queued_first() -> None:
    """Among overdue age checks the one waiting longest goes first, whatever its rank; those not yet overdue
    keep the old order (behind the gaps, by rank)."""
    q = queue(recheck_interval_ms=10 * MINUTE)
    q.offer("recent", "age", T0 + 9 * MINUTE, rank=0)
    q.offer("older", "age", T0 + MINUTE, rank=0)
    q.offer("oldest", "age", T0, rank=5)
    q.offer("fresh-rank-1", "age", T0 + 8 * MINUTE, rank=1)
    gap_backlog(q, 2, T0)
    assert [user for user, _ in drain(q, T0 + 7 * MINUTE)] == [
        "oldest",
        "older",
        "gap0",
        "gap1",
        "recent",
        "fresh-rank-1",
    ]


def test_a_raised_age_check_is_popped_once_for_its_new_reason() -> None:
    q = queue(recheck_interval_ms=10 * MINUTE)
    assert q.offer("u", "age", T0) is Offer.QUEUED
    gap_backlog(q, 2, T0)
    assert q.offer("u", "intake_gap", T0 + 1, rank=5, gap="gap-2") is Offer.RAISED
    later = T0 + 20 * MINUTE
    # Its old age entry is overdue by its queued moment but no longer live: the gap order applies, u last (rank 5).
    assert drain(q, later) == [("gap0", "intake_gap"), ("gap1", "intake_gap"), ("u", "intake_gap")]
    assert q.pop(later) is None and len(q) == 0


def test_an_age_check_queued_again_waits_from_its_new_offer() -> None:
    """A user checked and queued for age again later does not inherit the place of their earlier check."""
    q = queue(recheck_interval_ms=10 * MINUTE)
    q.offer("u", "age", T0)
    first = q.pop(T0)
    assert first is not None
    q.done(first, T0)
    q.offer("v", "age", T0 + 10 * MINUTE)
    assert q.offer("u", "age", T0 + 11 * MINUTE) is Offer.QUEUED
    gap_backlog(q, 1, T0 + 11 * MINUTE)
    assert [user for user, _ in drain(q, T0 + 16 * MINUTE)] == ["v", "u", "gap0"]


def test_a_retried_age_check_keeps_its_place() -> None:
    q = queue(recheck_interval_ms=10 * MINUTE)
    q.offer("ghost", "age", T0)
    running = q.pop(T0)
    assert running is not None
    gap_backlog(q, 2, T0 + MINUTE)
    assert q.failed(running, T0 + 5 * MINUTE) is True
    # Queued again, but still waiting since T0: overdue, ahead of the gap checks queued after it.
    retry = q.pop(T0 + 5 * MINUTE)
    assert retry is not None and (retry.userid, retry.attempts, retry.queued_at) == ("ghost", 1, T0)


def test_eviction_still_drops_the_least_urgent_entry_even_an_overdue_one() -> None:
    q = queue(capacity=3, recheck_interval_ms=10 * MINUTE)
    q.offer("ghost", "age", T0, rank=0)
    q.offer("quiet", "age", T0 + 9 * MINUTE, rank=3)
    q.offer("gap", "intake_gap", T0)
    assert q.offer("late", "suspect", T0 + 9 * MINUTE) is Offer.QUEUED
    assert q.evicted == 1 and "quiet" not in q
    assert q.offer("late-2", "suspect", T0 + 9 * MINUTE) is Offer.QUEUED
    # The overdue ghost is now the least urgent entry left: evicted before the gap check.
    assert q.evicted == 2 and "ghost" not in q and "gap" in q
    assert q.offer("more-age", "age", T0 + 9 * MINUTE) is Offer.FULL


def test_stale_entries_do_not_pile_up_in_the_heaps() -> None:
    """Checks popped through the age heap leave entries in the others; every heap stays O(live) in size."""
    q = queue(recheck_interval_ms=10 * MINUTE, age_patience_ms=0)
    gap_backlog(q, 10, T0)
    for n in range(2000):
        q.offer(f"a{n}", "age", T0 + n)
        check = q.pop(T0 + n)
        assert check is not None and check.source == "age"
        q.done(check, T0 + n)
    live = len(q._live)
    assert live == 10
    for heap in (q._best, q._worst, q._aged):
        assert len(heap) <= 2 * live + 64 + 1


Action = tuple[str, str, ObservationSource, int, int]

actions = st.lists(
    st.one_of(
        st.tuples(
            st.just("offer"),
            st.sampled_from([f"u{n}" for n in range(6)]),
            st.sampled_from(OBSERVATION_SOURCES),
            st.integers(0, 2),
            st.just(0),
        ),
        st.tuples(st.just("pop"), st.just(""), st.just("age"), st.just(0), st.just(0)),
        st.tuples(
            st.sampled_from(["done", "failed"]), st.just(""), st.just("age"), st.integers(0, 5), st.just(0)
        ),
        st.tuples(
            st.just("advance"),
            st.just(""),
            st.just("age"),
            st.just(0),
            st.sampled_from([1, 1000, MINUTE, 3 * MINUTE, 5 * MINUTE, 11 * MINUTE]),
        ),
    ),
    max_size=80,
)


def expected_choice(q: CheckQueue, now: int) -> tuple[str, int] | None:
    """What the queue promises to pop next, among entries of users not in flight: ("age", queued_at) of the
    longest waiting overdue age check if nothing more urgent than an intake gap is pending, else ("key", urgency
    and rank packed) of the most urgent entry."""
    live = [q._checks[u] for u in q._live if u not in q._in_flight]
    if not live:
        return None
    best = min(c.key for c in live)
    overdue = [c.queued_at for c in live if c.source == "age" and now - c.queued_at >= q.age_patience_ms]
    if best[0] >= URGENCY["intake_gap"] and overdue:
        return ("age", min(overdue))
    return ("key", best[0] * 1000 + best[1])


@settings(max_examples=300, deadline=None)
@given(actions)
def test_every_queued_check_is_popped_exactly_once(script: list[Action]) -> None:
    """Under random offers, pops, answers, failures and time advances: a user with a pending check is popped
    once for it (no loss, no duplicate, never twice at once), each pop follows the order (most urgent first, an
    overdue age check before intake gaps), and a final drain empties the queue."""
    q = queue(recheck_interval_ms=10 * MINUTE, capacity=1000, max_attempts=3)
    now = T0
    pending: set[str] = set()
    running: list[Check] = []

    def popped(check: Check) -> None:
        assert check.userid in pending, "popped a user with no pending check (duplicate)"
        assert all(r.userid != check.userid for r in running), "one user twice in flight"
        pending.discard(check.userid)
        running.append(check)

    def answered(check: Check) -> None:
        deferred = q._deferred.get(check.userid)
        q.done(check, now)
        # The answer satisfies a check deferred behind it if recent enough for it (never one on demand).
        if deferred is not None and deferred.source != "on_demand" and now >= deferred.fresh_after:
            pending.discard(check.userid)

    for kind, userid, source, n, ms in script:
        if kind == "offer":
            result = q.offer(userid, source, now, rank=n)
            if result in (Offer.QUEUED, Offer.RAISED):
                pending.add(userid)
            elif result is Offer.DUPLICATE:
                assert userid in pending
            else:
                assert result is Offer.FRESH and userid not in pending
        elif kind == "pop":
            expected = expected_choice(q, now)
            check = q.pop(now)
            if expected is None:
                assert check is None
            else:
                assert check is not None
                got = (
                    ("age", check.queued_at)
                    if expected[0] == "age"
                    else ("key", check.key[0] * 1000 + check.key[1])
                )
                assert got == expected
                popped(check)
        elif kind == "done" and running:
            answered(running.pop(n % len(running)))
        elif kind == "failed" and running:
            check = running.pop(n % len(running))
            if q.failed(check, now):
                pending.add(check.userid)
        elif kind == "advance":
            now += ms
        assert {u for u in (f"u{k}" for k in range(6)) if u in q} == pending
        assert len(q) == len(pending)

    # Drain: answer what runs, then every user still pending comes out once.
    while running:
        answered(running.pop())
    assert not q._deferred and q.in_flight() == 0
    now += 60 * MINUTE
    while (check := q.pop(now)) is not None:
        popped(check)
        answered(running.pop())
    assert not pending and len(q) == 0 and q.in_flight() == 0
