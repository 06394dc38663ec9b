"""One or more worked examples per stream rule (S1-S10), named after the rule they pin down."""

from __future__ import annotations

import json

import pytest

from core.contract import Event
from streams.rules import (
    DELETION_SESSION,
    Cause,
    PresenceConfig,
    Transition,
    UserRecord,
    apply,
    computed_status,
    next_sweep_at,
    reborn,
    record_from_dict,
    record_to_dict,
    redelivered,
    remembered,
    state_payload,
    sweep,
)
from tests.unit.streams.helpers import USER, ev, run

MIN = 60_000
T0 = 1_700_000_000_000
DEFAULT = PresenceConfig()


# S1 ---------------------------------------------------------------------------------------------------------


def test_s1_duplicate_is_ignored() -> None:
    record, _ = run([ev("a", "online", T0)])
    assert record is not None
    again = ev("a", "online", T0, os="Android", ip="10.9.9.9:1")
    new, result = apply(record, again, T0, DEFAULT)
    assert result.outcome == "duplicate"
    assert new is record
    assert not result.record_changed


def test_s1_duplicate_republishes_state_for_redelivery() -> None:
    record, _ = run([ev("a", "online", T0)])
    _, result = apply(record, ev("a", "online", T0), T0, DEFAULT)
    assert result.publish_state


def test_s1_duplicate_is_per_session() -> None:
    record, _ = run([ev("a", "online", T0)])
    _, result = apply(record, ev("b", "online", T0), T0, DEFAULT)
    assert result.outcome == "applied"


# S2 ---------------------------------------------------------------------------------------------------------


def test_s2_stale_event_is_ignored() -> None:
    record, _ = run([ev("a", "online", T0), ev("a", "offline", T0 + 10)])
    new, result = apply(record, ev("a", "online", T0 + 5), T0 + 10, DEFAULT)
    assert result.outcome == "stale"
    assert new is record
    assert not result.publish_state and not result.transitions


def test_s2_five_minute_late_offline_changes_nothing() -> None:
    # Session a went offline, the user reconnected as b; a's old offline retried 5 minutes late is stale.
    record, out = run([ev("a", "online", T0), ev("a", "offline", T0 + MIN), ev("b", "online", T0 + 2 * MIN)])
    assert [(t.from_status, t.to_status) for t in out] == [
        ("offline", "online"),
        ("online", "offline"),
        ("offline", "online"),
    ]
    new, result = apply(record, ev("a", "offline", T0 + MIN - 1), T0 + 7 * MIN, DEFAULT)
    assert result.outcome == "stale"
    assert computed_status(new) == "online"


def test_s2_newer_online_reopens_an_ended_session() -> None:
    record, out = run([ev("a", "offline", T0 + 5), ev("a", "online", T0 + 9)])
    assert computed_status(record) == "online"
    assert [(t.from_status, t.to_status) for t in out] == [("offline", "online")]


# S3 ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second", "outcome", "final"),
    [
        ("online", "offline", "applied", "offline"),
        ("offline", "online", "stale", "offline"),
        ("offline", "logout", "applied", "logged_out"),
        ("logout", "offline", "stale", "logged_out"),
        ("logout", "online", "stale", "logged_out"),
        ("online", "logout", "applied", "logged_out"),
    ],
)
def test_s3_same_millisecond_priority(first: str, second: str, outcome: str, final: str) -> None:
    record, _ = run([ev("a", first, T0)])  # type: ignore[arg-type]
    record, result = apply(record, ev("a", second, T0), T0, DEFAULT)  # type: ignore[arg-type]
    assert result.outcome == outcome
    assert computed_status(record) == final


def test_s3_does_not_apply_across_sessions() -> None:
    # The same millisecond in different sessions is not a conflict: both apply.
    record, _ = run([ev("a", "logout", T0)])
    _, result = apply(record, ev("b", "online", T0), T0, DEFAULT)
    assert result.outcome == "applied"


# S4 ---------------------------------------------------------------------------------------------------------


def test_s4_end_for_unseen_session_creates_it_ended() -> None:
    record, out = run([ev("a", "offline", T0)])
    assert record is not None and record.sessions["a"].status == "offline"
    assert out == []  # an unknown user is offline already
    _, result = apply(record, ev("a", "online", T0 - 100), T0, DEFAULT)
    assert result.outcome == "stale"


def test_s4_logout_for_unseen_user_emits_offline_to_logged_out() -> None:
    record, out = run([ev("a", "logout", T0)])
    assert [(t.from_status, t.to_status, t.seq) for t in out] == [("offline", "logged_out", 1)]
    assert record is not None and record.status == "logged_out"


# S5 ---------------------------------------------------------------------------------------------------------


def test_s5_unknown_user_is_offline() -> None:
    assert computed_status(None) == "offline"


def test_s5_multi_device_online_while_any_session_online() -> None:
    record, out = run(
        [
            ev("phone", "online", T0, os="iOS"),
            ev("pc", "online", T0 + 10, os="PC"),
            ev("phone", "offline", T0 + 20),
        ]
    )
    assert computed_status(record) == "online"
    assert len(out) == 1
    assert record is not None and state_payload(record)["platforms"] == ["PC"]


def test_s5_kick_reports_offline_for_the_kicked_device() -> None:
    # Device B logs in and kicks A: A's offline arrives after B's online; the user stays online throughout.
    record, out = run(
        [ev("A", "online", T0), ev("B", "online", T0 + 50, os="Android"), ev("A", "offline", T0 + 51)]
    )
    assert [(t.from_status, t.to_status) for t in out] == [("offline", "online")]
    assert computed_status(record) == "online"


def test_s5_newest_end_decides_between_offline_and_logged_out() -> None:
    base = [ev("a", "online", T0), ev("b", "online", T0)]
    record, _ = run([*base, ev("a", "logout", T0 + 10), ev("b", "offline", T0 + 20)])
    assert computed_status(record) == "offline"
    record, _ = run([*base, ev("b", "offline", T0 + 20), ev("a", "logout", T0 + 10)])
    assert computed_status(record) == "offline"
    record, _ = run([*base, ev("a", "logout", T0 + 30), ev("b", "offline", T0 + 20)])
    assert computed_status(record) == "logged_out"


def test_s5_same_millisecond_ends_across_sessions_logout_wins() -> None:
    for order in (["a", "b"], ["b", "a"]):
        events = {"a": ev("a", "logout", T0 + 10), "b": ev("b", "offline", T0 + 10)}
        record, _ = run([ev("a", "online", T0), ev("b", "online", T0), *(events[s] for s in order)])
        assert computed_status(record) == "logged_out"


# S6 ---------------------------------------------------------------------------------------------------------


def test_s6_ended_sessions_dropped_after_retention_without_status_change() -> None:
    record, _ = run([ev("a", "online", T0), ev("a", "logout", T0 + 1000)])
    assert record is not None
    kept, result = sweep(record, T0 + 1000 + DEFAULT.ended_session_retention_ms, DEFAULT)
    assert kept is record and not result.record_changed
    dropped, result = sweep(record, T0 + 1001 + DEFAULT.ended_session_retention_ms, DEFAULT)
    assert dropped is not None and dropped.sessions == {}
    assert result.record_changed and not result.publish_state and not result.transitions
    assert dropped.status == "logged_out" and computed_status(dropped) == "logged_out"
    assert state_payload(dropped) == state_payload(record)


def test_s6_online_sessions_are_never_dropped() -> None:
    record, _ = run([ev("a", "online", T0)])
    kept, result = sweep(record, T0 + 365 * 24 * 60 * MIN, DEFAULT)
    assert kept is record and not result.deleted


def test_s6_s7_idle_user_is_deleted_after_user_retention_with_a_final_transition() -> None:
    record, out = run([ev("a", "online", T0), ev("a", "logout", T0 + 1)])
    assert record is not None and [t.to_status for t in out] == ["online", "logged_out"]
    horizon = T0 + 1 + DEFAULT.user_retention_ms
    assert not sweep(record, horizon, DEFAULT)[1].deleted
    final, result = sweep(record, horizon + 1, DEFAULT, "0@99")
    assert result.deleted and result.record_changed and not result.publish_state
    # The query API now answers 404, which consumers read as offline: TRANSITIONS says so, with its cause.
    assert result.transitions == (
        Transition(USER, "logged_out", "offline", horizon, Cause(DELETION_SESSION, "deleted", None, None),
                   (), 0, T0, 3),
    )  # fmt: skip
    assert result.transitions[0].to_payload()["cause"] == {
        "sessionId": "-", "event": "deleted", "os": None, "clientIp": None
    }  # fmt: skip
    # The final record is what the glue keeps to re-send the deletion (S10); it ends where TRANSITIONS ends.
    assert final is not None and final.seq == 3 and final.status == "offline"
    assert remembered(final)[-1] == result.transitions[0]


def test_s6_s7_an_offline_user_is_deleted_with_an_offline_to_offline_transition() -> None:
    record, _ = run([ev("a", "offline", T0)])
    final, result = sweep(record, T0 + 1 + DEFAULT.user_retention_ms, DEFAULT)
    assert result.deleted and final is not None
    ((from_status, to_status, seq, event),) = [(t.from_status, t.to_status, t.seq, t.cause.event)
                                               for t in result.transitions]  # fmt: skip
    assert (from_status, to_status, seq, event) == ("offline", "offline", 1, "deleted")


def test_s6_s8_stream_time_past_a_hold_and_the_retention_at_once_releases_then_deletes() -> None:
    record, _ = run([ev("a", "online", T0), ev("a", "offline", T0 + 1000)], DAMPED)
    assert record is not None and record.held is not None
    final, result = sweep(record, T0 + 1001 + DAMPED.user_retention_ms, DAMPED, "0@9")
    assert result.deleted and final is not None
    assert [(t.from_status, t.to_status, t.seq, t.cause.event) for t in result.transitions] == [
        ("online", "offline", 2, "offline"),
        ("offline", "offline", 3, "deleted"),
    ]


def test_s6_a_deletion_is_a_function_of_the_record_alone() -> None:
    # Recomputed later in stream time (a sweep redone after a crash), the deletion is the same transition.
    record, _ = run([ev("a", "online", T0), ev("a", "offline", T0 + 1)])
    first = sweep(record, T0 + 2 + DEFAULT.user_retention_ms, DEFAULT, "0@5")[1].transitions
    later = sweep(record, T0 + 9 * MIN + DEFAULT.user_retention_ms, DEFAULT, "0@8")[1].transitions
    assert first == later


def test_s6_recreated_user_starts_a_new_epoch() -> None:
    record, out1 = run([ev("a", "online", T0), ev("a", "offline", T0 + 1)])
    final, result = sweep(record, T0 + 2 + DEFAULT.user_retention_ms, DEFAULT)
    assert result.deleted
    later = T0 + 3 + DEFAULT.user_retention_ms
    # The glue hands a deleted user's next event no record: the user is unknown again.
    _, out2 = run([ev("b", "online", later)])
    assert {t.epoch for t in [*out1, *result.transitions]} == {T0}
    assert [(t.epoch, t.seq, t.from_status) for t in out2] == [(later, 1, "offline")]


def test_s6_s7_after_a_deletion_a_record_created_by_an_end_agrees_with_what_a_follower_infers() -> None:
    # A follower of TRANSITIONS alone: online -> logged_out, then the deletion (-> offline, forget the user).
    record, out = run([ev("a", "online", T0), ev("a", "logout", T0 + 1)])
    _, deletion = sweep(record, T0 + 2 + DEFAULT.user_retention_ms, DEFAULT)
    assert [t.to_status for t in [*out, *deletion.transitions]] == ["online", "logged_out", "offline"]
    later = T0 + 3 + DEFAULT.user_retention_ms
    # Back with an offline: the query API answers offline, as the follower infers; nothing to say.
    created, silent = run([ev("b", "offline", later)])
    assert created is not None and created.status == "offline" and silent == []
    # Back with a logout: the follower must learn it.
    _, told = run([ev("b", "logout", later)])
    assert [(t.from_status, t.to_status, t.seq) for t in told] == [("offline", "logged_out", 1)]


def test_s10_a_reborn_record_remembers_the_deletion_until_newer_transitions_evict_it() -> None:
    cfg = PresenceConfig(transition_memory=3)
    record, out = run([ev("a", "online", T0), ev("a", "offline", T0 + 1)], cfg)
    final, result = sweep(record, T0 + 2 + cfg.user_retention_ms, cfg, "0@7")
    assert final is not None
    later = T0 + 3 + cfg.user_retention_ms
    new, out2 = run([ev("b", "online", later)], cfg)
    assert new is not None
    new = reborn(final, new, cfg)
    assert remembered(new) == (out[1], result.transitions[0], out2[0])
    # Redelivered, the user's last event before the deletion still re-sends what it caused, from the new record,
    # and everything since: a consumer that saw the deletion and the new epoch ends where it was.
    assert redelivered(new, ev("a", "offline", T0 + 1)).transitions == (
        out[1],
        result.transitions[0],
        out2[0],
    )


def test_s6_retention_is_in_stream_time_and_a_late_end_is_still_stale() -> None:
    # a ended at T0+1; stream time moves 5 minutes on; the retried online from before the end is still stale.
    record, _ = run([ev("a", "online", T0), ev("a", "offline", T0 + 1)])
    record, _ = sweep(record, T0 + 5 * MIN, DEFAULT)
    _, result = apply(record, ev("a", "online", T0), T0 + 5 * MIN, DEFAULT)
    assert result.outcome == "stale"
    _, result = apply(record, ev("a", "offline", T0 + 1), T0 + 5 * MIN, DEFAULT)
    assert result.outcome == "duplicate"


def test_s6_next_sweep_at_names_the_first_due_time() -> None:
    record, _ = run([ev("a", "online", T0), ev("b", "offline", T0 + 7)])
    assert record is not None
    due = next_sweep_at(record, DEFAULT)
    assert due == T0 + 7 + DEFAULT.ended_session_retention_ms + 1
    assert sweep(record, due - 1, DEFAULT)[0] is record
    assert sweep(record, due, DEFAULT)[0] is not record


# S7 ---------------------------------------------------------------------------------------------------------


def test_s7_transition_payload() -> None:
    _, out = run(
        [ev("a", "online", T0, os="iOS", ip="172.20.10.94:41748"), ev("b", "online", T0 + 1, os="PC")]
    )
    (t,) = out
    assert t.to_payload() == {
        "schema": 1,
        "userid": USER,
        "from": "offline",
        "to": "online",
        "at": T0,
        "cause": {"sessionId": "a", "event": "online", "os": "iOS", "clientIp": "172.20.10.94:41748"},
        "platforms": ["iOS"],
        "online_sessions": 1,
        "epoch": T0,
        "seq": 1,
    }
    assert t.to_payload(include_client_ip=False)["cause"]["clientIp"] is None


def test_s7_cause_os_falls_back_to_the_session() -> None:
    _, out = run([ev("a", "online", T0, os="Android"), ev("a", "offline", T0 + 1, os=None, ip=None)])
    assert out[1].cause.os == "Android"
    assert out[1].cause.client_ip == "10.0.0.1:4000"


def test_s7_epoch_and_seq() -> None:
    _, out = run(
        [
            ev("a", "offline", T0 - 5),  # creates the record: epoch = its time, no transition
            ev("a", "online", T0),
            ev("a", "offline", T0 + 1),
            ev("b", "online", T0 + 2),
            ev("b", "logout", T0 + 3),
        ]
    )
    assert [(t.epoch, t.seq) for t in out] == [(T0 - 5, i) for i in range(1, 5)]
    assert [t.to_status for t in out] == ["online", "offline", "online", "logged_out"]


def test_s7_no_transition_when_status_unchanged() -> None:
    _, out = run([ev("a", "online", T0), ev("b", "online", T0 + 1), ev("b", "offline", T0 + 2)])
    assert len(out) == 1


# S8 ---------------------------------------------------------------------------------------------------------

DAMPED = PresenceConfig(offline_grace_ms=30_000)


def test_s8_flap_within_grace_emits_nothing() -> None:
    record, out = run([ev("a", "online", T0), ev("a", "offline", T0 + 1000)], DAMPED)
    assert len(out) == 1
    assert record is not None and record.held is not None
    assert record.status == "online" and state_payload(record)["status"] == "online"
    record, out2 = run([ev("b", "online", T0 + 1000 + 30_000)], DAMPED, record)
    assert out2 == []
    assert record is not None and record.held is None and record.seq == 1


def test_s8_held_transition_released_by_sweep() -> None:
    record, _ = run([ev("a", "online", T0), ev("a", "offline", T0 + 1000)], DAMPED)
    same, result = sweep(record, T0 + 1000 + 30_000, DAMPED)
    assert same is record and not result.transitions
    released, result = sweep(record, T0 + 1000 + 30_001, DAMPED)
    assert released is not None and released.held is None and released.status == "offline"
    assert result.publish_state
    (t,) = result.transitions
    assert (t.from_status, t.to_status, t.at, t.seq, t.cause.session_id) == (
        "online",
        "offline",
        T0 + 1000,
        2,
        "a",
    )


def test_s8_online_after_window_releases_first() -> None:
    _, out = run(
        [ev("a", "online", T0), ev("a", "offline", T0 + 1000), ev("b", "online", T0 + 31_001)], DAMPED
    )
    assert [(t.from_status, t.to_status, t.seq) for t in out] == [
        ("offline", "online", 1),
        ("online", "offline", 2),
        ("offline", "online", 3),
    ]


def test_s8_hold_retargets_to_logged_out_but_keeps_its_deadline() -> None:
    record, _ = run(
        [ev("a", "online", T0), ev("a", "offline", T0 + 1000), ev("b", "logout", T0 + 2000)],
        DAMPED,
    )
    assert record is not None and record.held is not None
    assert record.held.to_status == "logged_out" and record.held.release_after == T0 + 1000 + 30_000
    _, result = sweep(record, T0 + 31_001, DAMPED)
    (t,) = result.transitions
    assert (t.to_status, t.at, t.cause.event) == ("logged_out", T0 + 2000, "logout")


def test_s8_late_end_past_its_window_is_emitted_at_once() -> None:
    record, _ = run([ev("a", "online", T0)], DAMPED)
    record, result = apply(record, ev("a", "offline", T0 + 1), T0 + 5 * MIN, DAMPED)
    assert [t.to_status for t in result.transitions] == ["offline"]
    assert record.held is None


def test_s8_damping_off_by_default() -> None:
    _, out = run([ev("a", "online", T0), ev("a", "offline", T0 + 1), ev("a2", "online", T0 + 2)])
    assert len(out) == 3


# S9 ---------------------------------------------------------------------------------------------------------


def test_s9_state_payload() -> None:
    record, _ = run(
        [
            ev("a", "online", T0, os="iOS", ip="1.1.1.1:1"),
            ev("b", "online", T0 + 5, os="PC", ip="2.2.2.2:2"),
            ev("c", "offline", T0 + 9),
            ev("a", "online", T0 + 7, os=None, ip=None),  # newer online on an online session keeps `since`
        ]
    )
    assert record is not None
    assert state_payload(record) == {
        "schema": 1,
        "userid": USER,
        "status": "online",
        "sessions": [
            {"sessionId": "a", "os": "iOS", "clientIp": "1.1.1.1:1", "since": T0},
            {"sessionId": "b", "os": "PC", "clientIp": "2.2.2.2:2", "since": T0 + 5},
        ],
        "platforms": ["PC", "iOS"],
        "last_seen": T0 + 9,
        "epoch": T0,
        "seq": 1,
    }
    assert all(s["clientIp"] is None for s in state_payload(record, include_client_ip=False)["sessions"])


def test_s9_client_ip_not_stored_when_excluded() -> None:
    cfg = PresenceConfig(include_client_ip=False)
    record, out = run([ev("a", "online", T0, ip="1.1.1.1:1")], cfg)
    assert record is not None and record.sessions["a"].client_ip is None
    assert out[0].cause.client_ip is None
    assert "1.1.1.1" not in json.dumps(record_to_dict(record))


def test_s9_applied_event_publishes_state_stale_does_not() -> None:
    record, result = apply(None, ev("a", "offline", T0), T0, DEFAULT)
    assert result.outcome == "applied" and result.publish_state and result.record_changed
    _, result = apply(record, ev("a", "online", T0 - 1), T0, DEFAULT)
    assert not result.publish_state


# S10 --------------------------------------------------------------------------------------------------------


def test_s10_redelivered_event_reemits_identical_transition() -> None:
    record, out = run([ev("a", "online", T0), ev("a", "offline", T0 + 10)])
    again, result = apply(record, ev("a", "offline", T0 + 10), T0 + 10, DEFAULT)
    assert again is record
    assert result.outcome == "duplicate" and result.reemitted
    assert result.transitions == (out[1],)
    # The older event is now stale but still re-sends what it caused, and what followed: a re-send always ends on
    # the user's latest transition.
    _, result = apply(record, ev("a", "online", T0), T0 + 10, DEFAULT)
    assert result.outcome == "stale" and result.transitions == (out[0], out[1])


def test_s10_redelivered_event_reemits_release_it_triggered() -> None:
    record, out = run(
        [ev("a", "online", T0), ev("a", "offline", T0 + 1000), ev("b", "online", T0 + 40_000)], DAMPED
    )
    _, result = apply(record, ev("b", "online", T0 + 40_000), T0 + 40_000, DAMPED)
    assert result.transitions == tuple(out[1:])


def test_s10_redelivered_tick_reemits_its_release() -> None:
    record, _ = run([ev("a", "online", T0), ev("a", "offline", T0 + 1000)], DAMPED)
    released, first = sweep(record, T0 + 40_000, DAMPED, "p3:1200")
    again, second = sweep(released, T0 + 40_000, DAMPED, "p3:1200")
    assert again is released and second.reemitted and second.publish_state
    assert second.transitions == first.transitions
    assert sweep(released, T0 + 40_000, DAMPED, "p3:1201")[1].transitions == ()
    assert sweep(released, T0 + 40_001, DAMPED, "p3:1200")[1].transitions == ()


def test_s10_upstream_retry_with_new_delivery_id_is_a_plain_duplicate() -> None:
    record, _ = run([ev("a", "online", T0)])
    retry = ev("a", "online", T0)
    retry = Event(retry.userid, "a", "online", T0, "iOS", None, T0 + 9000, "other-request:0")
    _, result = apply(record, retry, T0, DEFAULT)
    assert result.outcome == "duplicate" and result.transitions == ()


def test_s10_memory_is_bounded() -> None:
    cfg = PresenceConfig(transition_memory=3)
    events = [ev("s", "online" if i % 2 == 0 else "offline", T0 + i) for i in range(10)]
    record, out = run(events, cfg)
    assert record is not None and [m.transition(USER) for m in record.memory] == out[-3:]


# Table value ------------------------------------------------------------------------------------------------


def test_record_round_trips_through_json() -> None:
    record, _ = run(
        [ev("a", "online", T0), ev("b", "logout", T0 + 3, os=None), ev("a", "offline", T0 + 1000)], DAMPED
    )
    assert isinstance(record, UserRecord) and record.held is not None
    data = json.loads(json.dumps(record_to_dict(record)))
    assert record_from_dict(data) == record


def test_record_from_dict_refuses_unknown_version() -> None:
    record, _ = run([ev("a", "online", T0)])
    assert record is not None
    with pytest.raises(ValueError, match="version"):
        record_from_dict({**record_to_dict(record), "v": 99})


def test_config_rejects_negative_values() -> None:
    with pytest.raises(ValueError, match="offline_grace_ms"):
        PresenceConfig(offline_grace_ms=-1)
