"""Property tests: the state machine against the reference model, over random multi-device histories.

Histories are delivered the way upstream and Kafka deliver them: retries (exact duplicates), events delayed by up
to 5 minutes (so reordered), same-millisecond conflicts, and sweeps in between. Stream time is the arrival clock,
which never runs behind any event already delivered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from core.contract import Event
from streams.rules import (
    EventStatus,
    PresenceConfig,
    Transition,
    UserRecord,
    apply,
    computed_status,
    record_from_dict,
    record_to_dict,
    remembered,
    sweep,
)
from tests.unit.streams.helpers import ev
from tests.unit.streams.reference_model import ReferenceUser, status_of

MIN = 60_000
T0 = 1_700_000_000_000
MAX_DELAY = 5 * MIN
PROPS = settings(max_examples=300, deadline=None)
OS = ["iOS", "Android", "PC", "Websocket", "MiniProgram"]


@st.composite
def lifecycle_events(draw: st.DrawFn) -> list[Event]:
    """Devices that connect, stay a while, and go offline, get kicked or log out; some sessions stay open."""
    events: list[Event] = []
    for device in range(draw(st.integers(1, 3))):
        t = T0 + draw(st.integers(0, 2 * MIN))
        os = draw(st.sampled_from(OS))
        for k in range(draw(st.integers(1, 4))):
            sid = f"d{device}s{k}"
            events.append(ev(sid, "online", t, os=os, ip=f"10.0.{device}.{k}:1"))
            end = draw(st.sampled_from(["offline", "logout", None]))
            if end is None:
                break
            t += draw(st.one_of(st.just(0), st.integers(0, 3 * MIN)))
            events.append(ev(sid, end, t, os=None, ip=None))
            t += draw(st.one_of(st.just(0), st.integers(0, MIN)))
    return events


@st.composite
def chaotic_events(draw: st.DrawFn) -> list[Event]:
    """Few sessions, few distinct milliseconds: crossing events and same-millisecond conflicts on purpose."""
    times = st.one_of(st.integers(0, 5), st.integers(0, 10 * MIN))
    statuses: st.SearchStrategy[EventStatus] = st.sampled_from(["online", "offline", "logout"])
    return draw(
        st.lists(
            st.builds(
                lambda sid, status, dt, os: ev(sid, status, T0 + dt, os=os),
                st.sampled_from(["a", "b", "c"]),
                statuses,
                times,
                st.sampled_from([*OS, None]),
            ),
            min_size=1,
            max_size=14,
        )
    )


histories = st.one_of(lifecycle_events(), chaotic_events())


@dataclass(frozen=True)
class Step:
    stream_time: int
    event: Event | None  # None: a sweep
    tick: str = ""


@st.composite
def deliveries(draw: st.DrawFn, sweeps: bool = True) -> tuple[list[Event], list[Step]]:
    """A history, and the order it arrives in: each event 1-3 times, each copy up to 5 minutes late.

    Copies are upstream retries, so each passed the gateway again and carries its own delivery id.
    """
    events = draw(histories)
    copies: list[tuple[int, int, Event]] = []
    for i, e in enumerate(events):
        for n in range(draw(st.integers(1, 3) if draw(st.booleans()) else st.just(1))):
            delay = draw(st.one_of(st.just(0), st.integers(0, MAX_DELAY)))
            copies.append((e.time + delay, len(copies), e._replace(delivery_id=f"{i}#{n}")))
    copies.sort()
    steps: list[Step] = []
    for arrival, _, e in copies:
        if sweeps and draw(st.booleans()):
            steps.append(Step(arrival, None, f"tick{len(steps)}"))
        steps.append(Step(arrival, e))
    return events, steps


configs = st.builds(
    PresenceConfig,
    offline_grace_ms=st.sampled_from([0, 0, 1_000, 60_000]),
    ended_session_retention_ms=st.sampled_from([15 * MIN, 6 * MIN]),
)


@dataclass
class Run:
    record: UserRecord | None
    transitions: list[Transition]
    outputs: list[tuple[Transition, ...]]
    records: list[UserRecord | None]


def drive(steps: list[Step], config: PresenceConfig, record: UserRecord | None = None) -> Run:
    out = Run(record, [], [], [])
    for step in steps:
        if step.event is None:
            out.record, sres = sweep(out.record, step.stream_time, config, step.tick)
            emitted = sres.transitions
        else:
            out.record, ares = apply(out.record, step.event, step.stream_time, config)
            emitted = ares.transitions
        out.transitions.extend(emitted)
        out.outputs.append(emitted)
        out.records.append(out.record)
    return out


def settle(run: Run, steps: list[Step], config: PresenceConfig) -> None:
    """Let stream time pass every S8 window (but no user retention)."""
    end = steps[-1].stream_time + config.offline_grace_ms + 1
    run.record, res = sweep(run.record, end, config, "settle")
    run.transitions.extend(res.transitions)


def unique(transitions: list[Transition]) -> dict[tuple[int, int], Transition]:
    """Transitions by (epoch, seq), asserting that any repeat is identical."""
    seen: dict[tuple[int, int], Transition] = {}
    for t in transitions:
        key = (t.epoch, t.seq)
        assert seen.setdefault(key, t) == t, f"repeat of {key} differs"
    return seen


# (1) --------------------------------------------------------------------------------------------------------


@PROPS
@given(deliveries(), configs)
def test_final_status_matches_reference(
    delivery: tuple[list[Event], list[Step]], config: PresenceConfig
) -> None:
    events, steps = delivery
    run = drive(steps, config)
    assert computed_status(run.record) == status_of(events)
    settle(run, steps, config)
    assert run.record is not None and run.record.status == status_of(events)


@PROPS
@given(deliveries(), st.data())
def test_final_status_independent_of_arrival_order(
    delivery: tuple[list[Event], list[Step]], data: st.DataObject
) -> None:
    events, steps = delivery
    arrivals = [s.event for s in steps if s.event is not None]
    shuffled = data.draw(st.permutations(arrivals))
    config = PresenceConfig()
    results = []
    for order in (arrivals, shuffled):
        record: UserRecord | None = None
        stream_time = 0
        for e in order:
            stream_time = max(stream_time, e.time)
            record, _ = apply(record, e, stream_time, config)
        results.append(computed_status(record))
    assert results == [status_of(events)] * 2


@PROPS
@given(deliveries())
def test_undamped_transitions_match_reference_changes(delivery: tuple[list[Event], list[Step]]) -> None:
    _, steps = delivery
    run = drive(steps, PresenceConfig())
    reference = ReferenceUser()
    for s in steps:
        if s.event is not None:
            reference.see(s.event)
    got = [(t.from_status, t.to_status, t.at, t.cause.session_id, t.cause.event) for t in run.transitions]
    assert got == reference.changes


# (2) --------------------------------------------------------------------------------------------------------


@PROPS
@given(deliveries(), configs)
def test_transitions_chain_and_seq_has_no_gaps(
    delivery: tuple[list[Event], list[Step]], config: PresenceConfig
) -> None:
    _, steps = delivery
    run = drive(steps, config)
    settle(run, steps, config)
    assert run.record is not None
    ts = run.transitions  # upstream retries are not redeliveries: no repeats expected
    assert [t.seq for t in ts] == list(range(1, len(ts) + 1))
    assert {t.epoch for t in ts} <= {run.record.epoch}
    previous = "offline"
    for t in ts:
        assert t.from_status == previous != t.to_status
        assert (t.to_status == "online") == (t.online_sessions > 0)
        assert list(t.platforms) == sorted(set(t.platforms))
        previous = t.to_status
    assert previous == run.record.status
    assert run.record.seq == len(ts)


# (3) --------------------------------------------------------------------------------------------------------


@PROPS
@given(deliveries(), configs)
def test_reapplying_any_event_changes_nothing(
    delivery: tuple[list[Event], list[Step]], config: PresenceConfig
) -> None:
    _, steps = delivery
    run = drive(steps, config)
    emitted = unique(run.transitions)
    now = steps[-1].stream_time
    assert run.record is not None
    for e in (s.event for s in steps if s.event is not None):
        if e.session_id not in run.record.sessions:
            # Dropped by S6: only events older than the retention window can find their session gone.
            assert e.time < now - config.ended_session_retention_ms
            continue
        again, result = apply(run.record, e, now, config)
        assert again is run.record
        assert result.outcome in ("duplicate", "stale")
        assert not result.record_changed
        for t in result.transitions:
            assert emitted[(t.epoch, t.seq)] == t


@PROPS
@given(deliveries(), configs, st.data())
def test_redelivery_after_crash_loses_nothing_and_repeats_identically(
    delivery: tuple[list[Event], list[Step]], config: PresenceConfig, data: st.DataObject
) -> None:
    """S10: the table kept steps up to k, the sends of steps j..k were lost; redelivery from j repairs it.

    Up to 4 steps are redelivered (each emits at most 2 transitions, the memory holds 8). Ended-session retention
    is kept above the redelivery window's stream-time span, as the worker's settings must.
    """
    _, steps = delivery
    config = PresenceConfig(offline_grace_ms=config.offline_grace_ms, ended_session_retention_ms=60 * MIN)
    clean = drive(steps, config)
    k = data.draw(st.integers(0, len(steps) - 1))
    j = data.draw(st.integers(max(0, k - 3), k))
    survived = [t for out in clean.outputs[:j] for t in out]
    resumed = drive(steps[j:], config, clean.records[k])
    got = unique(survived + resumed.transitions)
    assert got == unique(clean.transitions)


# (4) --------------------------------------------------------------------------------------------------------


@PROPS
@given(
    deliveries(sweeps=False),
    configs,
    st.lists(st.integers(0, 40 * 24 * 60 * MIN), min_size=1, max_size=4),
    st.sampled_from([30 * 24 * 60 * MIN, 20 * MIN]),
)
def test_sweeps_only_drop_release_or_delete(
    delivery: tuple[list[Event], list[Step]],
    config: PresenceConfig,
    advances: list[int],
    user_retention: int,
) -> None:
    _, steps = delivery
    config = PresenceConfig(
        offline_grace_ms=config.offline_grace_ms,
        ended_session_retention_ms=config.ended_session_retention_ms,
        user_retention_ms=user_retention,
    )
    record = drive(steps, config).record
    now = steps[-1].stream_time
    for i, advance in enumerate(sorted(advances)):
        assert record is not None
        before_status, before_held = computed_status(record), record.held
        after, result = sweep(record, now + advance, config, f"tick{i}")
        assert after is not None
        if result.deleted:
            # S6/S7: the deletion is told on TRANSITIONS: from what was shown, to offline (the query API's 404);
            # if stream time also passed a hold's window, the release comes first.
            assert before_status != "online"
            *released, t = result.transitions
            if before_held is not None:
                (r,) = released
                assert (r.from_status, r.to_status, r.seq) == (
                    "online",
                    before_held.to_status,
                    record.seq + 1,
                )
            shown = released[0].to_status if released else record.status
            assert (t.from_status, t.to_status, t.cause.event) == (shown, "offline", "deleted")
            assert (t.epoch, t.seq) == (record.epoch, record.seq + len(result.transitions))
            assert t.at == record.last_seen + user_retention
            assert remembered(after)[-len(result.transitions) :] == result.transitions
            assert not result.publish_state
            return
        assert computed_status(after) == before_status
        if before_held is not None and after.held is None:
            (t,) = result.transitions
            assert (t.from_status, t.to_status) == ("online", before_held.to_status)
            assert after.status == before_held.to_status and result.publish_state
        else:
            assert not result.transitions and after.status == record.status
            assert not result.publish_state
        online = {k: s for k, s in record.sessions.items() if s.status == "online"}
        assert {k: s for k, s in after.sessions.items() if s.status == "online"} == online
        record = after


# (5) --------------------------------------------------------------------------------------------------------


@PROPS
@given(deliveries(), configs)
def test_records_round_trip_through_json(
    delivery: tuple[list[Event], list[Step]], config: PresenceConfig
) -> None:
    _, steps = delivery
    for record in drive(steps, config).records:
        if record is not None:  # a sweep before the user's first event
            assert record_from_dict(json.loads(json.dumps(record_to_dict(record)))) == record


# (6) --------------------------------------------------------------------------------------------------------


@st.composite
def idle_gaps(draw: st.DrawFn) -> tuple[list[Event], list[Step]]:
    """Deliveries with long quiet spells: stream time jumps past the user retention between bursts."""
    _, steps = draw(deliveries())
    out: list[Step] = []
    shift = 0
    for step in steps:
        if draw(st.integers(0, 5)) == 0:
            shift += draw(st.integers(1, 4)) * RETENTION
            out.append(Step(step.stream_time + shift, None, f"tick{len(out)}"))
        event = step.event
        moved = None if event is None else event._replace(time=event.time + shift)
        out.append(Step(step.stream_time + shift, moved, f"tick{len(out)}"))
    return [], out


RETENTION = 2 * MIN


@PROPS
@given(idle_gaps(), configs)
def test_a_follower_of_transitions_alone_always_agrees_with_the_query_api(
    delivery: tuple[list[Event], list[Step]], config: PresenceConfig
) -> None:
    """S6/S7: every change of the query API's answer reaches TRANSITIONS, deletions and re-creations included.

    The follower applies transitions as docs/consuming.md says (a deletion forgets the user: offline) and
    checks the chain: within an epoch ``seq`` + 1 and ``from`` = the previous ``to``; a new epoch starts at 1,
    from offline, only once the previous one was closed by its deletion. The query API answers the record's
    status, or 404 (offline) for a user without a record.
    """
    _, steps = delivery
    config = PresenceConfig(
        offline_grace_ms=config.offline_grace_ms,
        ended_session_retention_ms=config.ended_session_retention_ms,
        user_retention_ms=RETENTION,
    )
    record: UserRecord | None = None
    follower: tuple[str, int, int] | None = None  # (status, epoch, seq); None: unknown, i.e. offline
    deletions = 0
    for step in steps:
        if step.event is None:
            final, sres = sweep(record, step.stream_time, config, step.tick)
            emitted = sres.transitions
            record = None if sres.deleted else final
            deletions += sres.deleted
        else:
            record, ares = apply(record, step.event, step.stream_time, config)
            emitted = ares.transitions
        for t in emitted:
            if follower is not None and t.epoch == follower[1]:
                assert (t.seq, t.from_status) == (follower[2] + 1, follower[0])
            else:
                assert follower is None, "a new epoch before the old one was closed"
                assert (t.seq, t.from_status) == (1, "offline")
            follower = None if t.cause.event == "deleted" else (t.to_status, t.epoch, t.seq)
        answer = "offline" if record is None else record.status
        assert (follower[0] if follower else "offline") == answer
        if record is not None and follower is not None:
            assert (record.epoch, record.seq) == follower[1:]
