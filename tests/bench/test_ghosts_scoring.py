"""The ghost benchmark's scoring against the ground truth (pure; bench/ghosts.py): what a consumer of TRANSITIONS
shows, wrong intervals and their kind, wrong corrections, and the trace's time compression."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from bench.ghosts import (
    CAUSES,
    SIZES,
    Causes,
    Outcome,
    Shown,
    Wrong,
    attribute,
    compress,
    max_in_window,
    processing_delays,
    score,
    sessions_from_trace,
    shown_changes,
    targets_by_cause,
    wrong_intervals,
)
from presence.emulator import GroundTruth
from presence.trace import Delivery, Trace, TraceSpec


def transition(userid: str, to: str, emitted_at: int, seq: int, event: str = "online") -> dict[str, Any]:
    return {"userid": userid, "to": to, "emitted_at": emitted_at, "epoch": 1, "seq": seq,
            "cause": {"event": event}}  # fmt: skip


def test_a_consumer_applies_transitions_by_emitted_at_and_drops_repeats() -> None:
    shown = shown_changes([
        transition("u", "offline", 300, 2, "offline"),
        transition("u", "online", 100, 1),
        transition("u", "online", 150, 1),  # S10: the same (epoch, seq) again
        transition("u", "online", 500, 3, "reconcile"),
    ])  # fmt: skip
    assert shown == {"u": [Shown(100, True), Shown(300, False), Shown(500, True, reconcile=True)]}


def test_wrong_intervals_are_split_into_ghost_online_and_ghost_offline() -> None:
    truth = [(100, True), (400, False)]  # really online 100-400
    shown = [Shown(150, True), Shown(700, False)]  # shown online 150-700
    assert wrong_intervals("u", truth, shown, (0, 1000)) == [
        Wrong("u", 100, 150, ghost_online=False, open=False),  # online, not yet shown
        Wrong("u", 400, 700, ghost_online=True, open=False),  # gone, still shown online
    ]


def test_a_ghost_still_wrong_at_the_window_end_is_open() -> None:
    assert wrong_intervals("u", [(100, True), (200, False)], [Shown(100, True)], (0, 1000)) == [
        Wrong("u", 200, 1000, ghost_online=True, open=True)
    ]


def test_nothing_is_wrong_when_the_shown_status_follows_the_truth() -> None:
    assert (
        wrong_intervals("u", [(100, True), (200, False)], [Shown(100, True), Shown(200, False)], (0, 300))
        == []
    )


def _truth(*sessions: tuple[str, str, int, int | None]) -> GroundTruth:
    truth = GroundTruth()
    for userid, session, start, end in sessions:
        truth.add(userid, session, "0", start)
        if end is not None:
            truth.add(userid, session, "1", end)
    return truth


def test_score_shares_ghosts_and_corrections() -> None:
    base = 1_000_000
    truth = _truth(("a", "s1", 0, 100_000), ("b", "s2", 0, None))
    shown = {
        # a: its offline was lost; a correction (R2) ends the ghost at 250 s.
        "a": [Shown(base, True), Shown(base + 250_000, False, reconcile=True)],
        # b: online all along, but a wrong correction shows it offline from 300 s to the end (beyond the margin).
        "b": [Shown(base, True), Shown(base + 300_000, False, reconcile=True)],
    }
    result = score(truth, base, shown, (base, base + 400_000), margin_ms=30_000, speedup=2.0)
    # In trace time (speedup 2): a ghost online of 150 s x 2, a ghost offline of 100 s x 2; 800 s x 2 users.
    assert result["users"] == 2
    assert result["user_seconds"] == pytest.approx(1600)
    assert result["ghost_online_share"] == pytest.approx(150 / 800)
    assert result["ghost_offline_share"] == pytest.approx(100 / 800)
    assert result["wrong_share"] == pytest.approx(250 / 800)
    assert result["ghosts"]["count"] == 2 and result["ghosts"]["max_s"] == pytest.approx(300)
    assert result["ghosts"]["open_at_end"] == 1
    assert result["corrections"] == {"to_offline": 2}
    assert result["wrong_corrections"] == 1
    assert result["wrong_correction_examples"][0]["userid"] == "b"


def test_a_correction_wrong_only_within_the_margin_is_not_counted() -> None:
    """Truth changed just before the correction and the real event is on its way: not a wrong correction."""
    base = 0
    truth = _truth(("c", "s1", 0, 100_000), ("c", "s2", 110_000, None))
    shown = {"c": [Shown(0, True), Shown(111_000, False, reconcile=True), Shown(120_000, True)]}
    result = score(truth, base, shown, (0, 200_000), margin_ms=30_000, speedup=1.0)
    assert result["corrections"] == {"to_offline": 1}
    assert result["wrong_corrections"] == 0
    # Shown online 10 s after s1 ended (a ghost shorter than the margin), offline 9 s after s2 began.
    assert result["ghosts"]["count"] == 0 and result["short_wrong_intervals"] == 2


def test_compression_divides_every_time_and_keeps_everything_else() -> None:
    events = ({"userid": "u", "sessionId": "s", "status": "0", "time": 1000, "os": "iOS"},)
    trace = Trace(TraceSpec(), [Delivery(1040, "n1", events), Delivery(6040, "n1", events, retry_of=0)])
    fast = compress(trace, 5)
    assert [(d.at_ms, d.nonce, d.retry_of) for d in fast.deliveries] == [(208, "n1", None), (1208, "n1", 0)]
    assert fast.deliveries[0].events[0] == {**events[0], "time": 200}
    assert compress(trace, 1) is trace


def test_the_peak_counts_calls_in_any_window() -> None:
    assert max_in_window([0.0, 0.5, 0.99, 1.0, 1.2, 5.0], 1.0) == 4
    assert max_in_window([], 1.0) == 0


def test_sizes_scale_the_budget_with_the_population_and_time_with_the_speedup() -> None:
    full, default = SIZES["full"], SIZES["default"]
    assert (full.users, full.trace_seconds, full.speedup) == (50_000, 900, 1)
    assert full.budget == 50 and full.rate_limit == 100
    # The default run: a fifth of the users, five times faster: the same calls and events per wall second.
    assert default.budget * default.speedup == full.budget * full.speedup
    assert default.users * default.speedup == full.users
    assert default.wall(default.max_silence) == full.max_silence / 5
    # --budget-factor: the budget and RongCloud's limit together.
    doubled = dataclasses.replace(full, budget_factor=2.0)
    assert (doubled.budget, doubled.rate_limit) == (100, 200)


def test_processing_delay_runs_from_the_gateways_receipt_to_the_transition() -> None:
    raw = [
        {"userid": "u", "sessionId": "s", "status": 0, "received_at": 1_000},
        {
            "userid": "u",
            "sessionId": "s",
            "status": 0,
            "received_at": 1_500,
        },  # a retry: the first copy counts
        {"userid": "u", "sessionId": "s", "status": 1, "received_at": 5_000},
        {"kind": "observation", "userid": "u", "online": False, "at": 6_000},
    ]
    transitions = [
        {"userid": "u", "emitted_at": 1_020, "cause": {"sessionId": "s", "event": "online"}},
        {"userid": "u", "emitted_at": 5_250, "cause": {"sessionId": "s", "event": "offline"}},
        {"userid": "u", "emitted_at": 7_000, "cause": {"sessionId": "reconcile", "event": "reconcile"}},
    ]
    assert processing_delays(raw, transitions) == [(1_000, 0.02), (5_000, 0.25)]


def _event(userid: str, session: str, status: str, at: int) -> dict[str, Any]:
    return {"userid": userid, "sessionId": session, "status": status, "time": at, "os": "iOS"}


def test_each_wrong_interval_is_attributed_to_what_became_of_the_event_it_needed() -> None:
    """A lost online, a late offline, an offline dropped in the outage and one held back by it, an online
    accepted only after a failed attempt, an offline accepted in time but never shown, a retry that made up for
    a lost copy, and a user shown right (bar the pipeline's delay). Times in ms, speedup 1; the outage held
    deliveries back from 100 s to 150 s."""
    first = tuple(_event(user, f"{user}-1", "0", 0) for user in ("late", "outage", "held", "ok", "stuck"))
    deliveries = [
        Delivery(100, "d0", first),
        Delivery(100, "d1", (_event("slow", "slow-1", "0", 0),)),  # its first attempt timed out
        Delivery(200, "d2", (_event("retried", "retried-1", "0", 0),)),  # lost ...
        Delivery(5_000, "d2", (_event("retried", "retried-1", "0", 0),), retry_of=2),  # ... its retry arrived
        Delivery(10_100, "d4", (_event("lost", "lost-1", "0", 10_000),)),  # lost: the online never arrives
        Delivery(60_100, "d5", (_event("stuck", "stuck-1", "1", 60_000),)),  # accepted, never shown
        Delivery(110_050, "d6", (_event("held", "held-1", "1", 110_000),)),  # due in the outage
        Delivery(121_000, "d7", (_event("outage", "outage-1", "1", 120_000),)),  # three attempts failed
        Delivery(200_000, "d8", (_event("late", "late-1", "1", 50_000),)),  # upstream's late offline
        Delivery(300_050, "d9", (_event("ok", "ok-1", "2", 300_000),)),
    ]
    outcomes = {
        1: Outcome("delivered", at=20_000, failed_at=100),
        2: Outcome("lost"),
        4: Outcome("lost"),
        6: Outcome(
            "delivered", at=140_000
        ),  # answered once the gateway was back, before upstream's pause ended
        7: Outcome("dropped", failed_at=121_000),
    }  # the others: delivered when due
    trace = Trace(TraceSpec(), deliveries)
    sessions = sessions_from_trace(trace, 0, outcomes)
    assert sessions["retried"][0].opened.received == 5_000
    assert sessions["lost"][0].opened.received is None and not sessions["lost"][0].opened.dropped
    assert sessions["outage"][0].ended is not None and sessions["outage"][0].ended.dropped
    # What the gateway accepted (RAW) counts, not upstream's view: an attempt it gave up on may have got through.
    accepted = sessions_from_trace(trace, 0, outcomes, {("outage-1", False): 125_000})["outage"][0].ended
    assert accepted is not None and accepted.received == 125_000
    causes = Causes(sessions, held=(100_000, 150_000), late_ms=10_000, pipeline_ms=30_000)
    shown = {
        "late": [Shown(1_000, True), Shown(201_000, False)],
        "outage": [Shown(1_000, True)],
        "held": [Shown(1_000, True), Shown(141_000, False)],
        "ok": [Shown(500, True), Shown(300_500, False)],
        "stuck": [Shown(500, True)],
        "retried": [Shown(5_500, True)],
        "slow": [Shown(20_500, True)],
    }
    truth = GroundTruth.from_trace(trace)
    window = (0, 400_000)
    causes_of = {
        (w.userid, w.start): attribute(w, shown.get(w.userid, []), causes)
        for userid in truth.users()
        for w in wrong_intervals(userid, _changes(truth, userid), shown.get(userid, []), window)
    }
    assert causes_of == {
        ("lost", 10_000): "lost",  # really online from 10 s, shown offline to the end: never told
        ("late", 0): "pipeline",
        ("late", 50_000): "late_offline",  # really offline from 50 s, told at 200 s
        ("outage", 0): "pipeline",
        ("outage", 120_000): "outage",  # its offline dropped: still shown online at the end
        ("held", 0): "pipeline",
        ("held", 110_000): "outage",  # its offline accepted at 140 s, in the outage's hold
        ("ok", 0): "pipeline",
        ("ok", 300_000): "pipeline",
        ("stuck", 0): "pipeline",
        ("stuck", 60_000): "other",  # accepted at 60 s, still shown online 340 s later: the stream's doing
        ("retried", 0): "pipeline",  # the lost copy's retry came 5 s later, under the late threshold
        ("slow", 0): "retried",  # accepted at 20 s, after a failed attempt outside the outage
    }
    result = score(truth, 0, shown, window, margin_ms=30_000, speedup=1.0, causes=causes)
    by = result["by_cause"]
    assert set(by) == set(CAUSES)
    assert by["lost"]["user_seconds"] == pytest.approx(390) and by["lost"]["ghosts_offline"] == 1
    assert by["late_offline"]["ghost_online_user_seconds"] == pytest.approx(151)
    assert by["outage"]["user_seconds"] == pytest.approx(280 + 31) and by["outage"]["ghosts_online"] == 2
    assert by["retried"]["user_seconds"] == pytest.approx(20.5) and by["retried"]["ghosts"] == 0
    assert by["other"]["user_seconds"] == pytest.approx(340)
    # The stream's own doing is described for a look: what was shown, and the sessions it had been told of.
    (example,) = by["other"]["examples"]
    assert (
        example["userid"] == "stuck"
        and example["ghost_online"]
        and example["duration_s"] == pytest.approx(340)
    )
    assert example["shown"] == [[-59.5, True, False]]
    assert [(x["start"], x["end"], x["end_accepted"]) for x in example["sessions"]] == [(-60.0, 0.0, 0.1)]
    assert by["pipeline"]["user_seconds"] == pytest.approx(1 + 1 + 1 + 0.5 + 0.5 + 0.5 + 5.5)
    assert by["pipeline"]["ghosts"] == 0 and by["correction"]["intervals"] == 0
    # Every wrong interval has one cause: the causes add up to the whole.
    assert sum(c["share"] for c in by.values()) == pytest.approx(result["wrong_share"])
    # Until the gateway was healthy again (130 s here) nothing could tell the worker of the outage: that part of
    # the outage's wrong time (outage 120-130 s, held 110-130 s), and the pipeline's, are out of reach.
    blind = score(truth, 0, shown, window, margin_ms=30_000, speedup=1.0,
                  causes=dataclasses.replace(causes, blind=(100_000, 130_000)))  # fmt: skip
    assert blind["by_cause"]["outage"]["blind_user_seconds"] == pytest.approx(10 + 20)
    assert blind["by_cause"]["lost"]["blind_user_seconds"] == pytest.approx(30)  # counted, not out of reach
    assert blind["out_of_reach"]["user_seconds"] == pytest.approx(30 + 10)
    assert result["out_of_reach"]["user_seconds"] == pytest.approx(10)  # no outage window: the pipeline alone


def test_the_reachable_wrong_time_and_the_best_possible_ratio() -> None:
    """On vs off within reach leaves out what no reconciliation could remove; the floor is off's share of it."""

    def scored(wrong: float, unreachable: float) -> dict[str, Any]:
        return {"score": {"wrong_user_seconds": wrong, "out_of_reach": {"user_seconds": unreachable},
                          "by_cause": {c: {"user_seconds": 0.0, "ghost_online_user_seconds": 0.0}
                                       for c in CAUSES}}}  # fmt: skip

    result = targets_by_cause(scored(1000, 400), scored(430, 400))
    assert result["within_reach_wrong_time_on_vs_off"]["value"] == pytest.approx(30 / 600)
    assert result["within_reach_wrong_time_on_vs_off"]["met"] is True
    assert result["best_possible_wrong_time_on_vs_off"]["value"] == pytest.approx(0.4)
    assert result["best_possible_wrong_time_on_vs_off"]["met"] is None


def _changes(truth: GroundTruth, userid: str) -> list[tuple[int, bool]]:
    changes: list[tuple[int, bool]] = []
    for start, end in truth.intervals(userid):
        changes.append((start, True))
        if end is not None:
            changes.append((end, False))
    return changes


def test_a_correction_that_shows_the_wrong_status_is_its_own_cause_and_a_user_let_go_is_not_blamed() -> None:
    """A lost offline the product let go of (a correction showed the user offline) is not blamed for a later
    ghost; a correction that starts a wrong interval is."""
    trace = Trace(TraceSpec(), [
        Delivery(10, "a", (_event("u", "s1", "0", 0),)),
        Delivery(20_010, "b", (_event("u", "s1", "1", 20_000),)),  # lost
        Delivery(100_010, "c", (_event("u", "s2", "0", 100_000),)),
        Delivery(200_010, "d", (_event("u", "s2", "1", 200_000),)),
    ])  # fmt: skip
    causes = Causes(
        sessions_from_trace(trace, 0, {1: Outcome("lost")}), None, late_ms=10_000, pipeline_ms=5_000
    )
    shown = [Shown(500, True), Shown(60_000, False, reconcile=True), Shown(100_500, True),
             Shown(150_000, False, reconcile=True), Shown(160_000, True)]  # fmt: skip
    assert attribute(Wrong("u", 20_000, 60_000, ghost_online=True, open=False), shown, causes) == "lost"
    assert (
        attribute(Wrong("u", 150_000, 160_000, ghost_online=False, open=False), shown, causes) == "correction"
    )
    # s2's offline delivered at once but not shown for 50 s; s1 (lost end) was let go at 60 s: not to blame.
    assert attribute(Wrong("u", 200_000, 250_000, ghost_online=True, open=False), shown, causes) == "other"
