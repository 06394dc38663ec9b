"""Worked examples of the reconciliation rules R1-R5 (docs/stream-rules.md), one or more per rule."""

from __future__ import annotations

from core.contract import Observation
from streams.rules import (
    DELETION_SESSION,
    Cause,
    PresenceConfig,
    UserRecord,
    apply,
    apply_observation,
    computed_status,
    next_sweep_at,
    record_from_dict,
    record_to_dict,
    redelivered,
    state_payload,
    sweep,
)
from tests.unit.streams.helpers import USER, ev, run

MIN = 60_000
T0 = 1_700_000_000_000
DEFAULT = PresenceConfig()
MARGIN = DEFAULT.reconcile_margin_ms
RECONCILE = Cause(DELETION_SESSION, "reconcile", None, None)


def obs(online: bool, at: int, delivery: str = "0@1", user: str = USER) -> Observation:
    return Observation(user, online, at, "age", at + 100, delivery)


def online_record() -> UserRecord:
    record, _ = run([ev("a", "online", T0)])
    assert record is not None
    return record


# R2 ---------------------------------------------------------------------------------------------------------


def test_r2_offline_observation_ends_sessions_older_than_the_margin() -> None:
    record = online_record()
    at = T0 + 10 * MIN
    new, result = apply_observation(record, obs(False, at), T0, DEFAULT)
    assert new is not None
    assert computed_status(new) == "offline"
    assert result.correction == "session_ended"
    [t] = result.transitions
    assert (t.from_status, t.to_status, t.at, t.cause) == ("online", "offline", at, RECONCILE)
    assert (t.platforms, t.online_sessions, t.seq) == ((), 0, 2)
    assert new.offline_horizon == at - MARGIN


def test_r2_never_overrules_a_newer_event() -> None:
    record = online_record()
    # The session's newest event is within the margin of the observation: it stays online.
    new, result = apply_observation(record, obs(False, T0 + MARGIN - 1), T0, DEFAULT)
    assert new is not None
    assert computed_status(new) == "online"
    assert result.transitions == ()
    assert result.correction is None
    assert new.verified_at is None


def test_r2_ends_only_the_old_sessions() -> None:
    record, _ = run([ev("a", "online", T0), ev("b", "online", T0 + 10 * MIN, os="Android")])
    assert record is not None
    new, result = apply_observation(record, obs(False, T0 + 10 * MIN), T0 + 10 * MIN, DEFAULT)
    assert new is not None
    assert new.sessions["a"].status == "offline"
    assert new.sessions["b"].status == "online"
    assert result.transitions == ()  # still online, through b
    assert result.correction == "session_ended"


def test_r2_an_online_older_than_the_horizon_is_stale_even_for_an_unknown_session() -> None:
    record = online_record()
    at = T0 + 10 * MIN
    new, _ = apply_observation(record, obs(False, at), T0, DEFAULT)
    assert new is not None
    late, result = apply(new, ev("c", "online", at - MARGIN - 1), at, DEFAULT)
    assert result.outcome == "stale"
    assert result.transitions == ()
    assert "c" not in late.sessions
    # ... and an online of the ended session older than the horizon too (S1 on the ended session).
    _, result = apply(new, ev("a", "online", at - MARGIN - 1), at, DEFAULT)
    assert result.outcome == "stale"
    # A newer online applies as usual.
    _, result = apply(new, ev("c", "online", at + 1), at, DEFAULT)
    assert result.outcome == "applied"
    assert [t.to_status for t in result.transitions] == ["online"]


def test_r2_offline_for_an_unknown_user_creates_nothing() -> None:
    new, result = apply_observation(None, obs(False, T0), T0, DEFAULT)
    assert new is None
    assert result.transitions == ()
    assert not result.record_changed


# R3 ---------------------------------------------------------------------------------------------------------


def test_r3_online_observation_with_no_session_online_opens_a_synthetic_session() -> None:
    record, _ = run([ev("a", "online", T0), ev("a", "offline", T0 + MIN)])
    assert record is not None
    at = T0 + 5 * MIN
    new, result = apply_observation(record, obs(True, at), T0 + MIN, DEFAULT)
    assert new is not None
    assert result.correction == "synthetic_opened"
    [t] = result.transitions
    assert (t.from_status, t.to_status, t.at, t.cause) == ("offline", "online", at, RECONCILE)
    assert (t.platforms, t.online_sessions) == ((), 0)
    state = state_payload(new)
    assert state["status"] == "online"
    assert state["sessions"] == []  # synthetic: listed in no session
    assert new.observed_online_at == at


def test_r3_synthetic_session_ends_with_the_next_real_event_newer_than_t() -> None:
    record, _ = run([ev("a", "online", T0), ev("a", "offline", T0 + MIN)])
    assert record is not None
    at = T0 + 5 * MIN
    synthetic, _ = apply_observation(record, obs(True, at), T0 + MIN, DEFAULT)
    assert synthetic is not None
    # An event not newer than T leaves it open.
    kept, result = apply(synthetic, ev("b", "offline", at), at, DEFAULT)
    assert computed_status(kept) == "online"
    assert result.transitions == ()
    # A newer end closes it.
    ended, result = apply(synthetic, ev("b", "offline", at + 1), at + 1, DEFAULT)
    assert computed_status(ended) == "offline"
    [t] = result.transitions
    assert (t.from_status, t.to_status, t.cause.event) == ("online", "offline", "offline")


def test_r3_synthetic_session_ends_with_a_later_offline_observation() -> None:
    record, _ = run([ev("a", "online", T0), ev("a", "offline", T0 + MIN)])
    assert record is not None
    synthetic, _ = apply_observation(record, obs(True, T0 + 5 * MIN), T0 + MIN, DEFAULT)
    assert synthetic is not None
    ended, result = apply_observation(synthetic, obs(False, T0 + 6 * MIN, "0@2"), T0 + MIN, DEFAULT)
    assert ended is not None
    assert computed_status(ended) == "offline"
    assert result.correction == "session_ended"
    [t] = result.transitions
    assert (t.from_status, t.to_status, t.cause) == ("online", "offline", RECONCILE)


def test_r3_an_online_observation_older_than_the_newest_event_changes_nothing() -> None:
    record, _ = run([ev("a", "online", T0), ev("a", "offline", T0 + 5 * MIN)])
    assert record is not None
    new, result = apply_observation(record, obs(True, T0 + MIN), T0 + 5 * MIN, DEFAULT)
    assert new is not None
    assert computed_status(new) == "offline"
    assert result.transitions == ()
    assert result.correction is None


def test_r3_online_observation_creates_an_unknown_user() -> None:
    new, result = apply_observation(None, obs(True, T0), T0, DEFAULT)
    assert new is not None
    assert new.epoch == T0
    assert computed_status(new) == "online"
    [t] = result.transitions
    assert (t.from_status, t.to_status, t.seq, t.epoch) == ("offline", "online", 1, T0)


def test_r3_synthetic_session_blocks_deletion() -> None:
    new, _ = apply_observation(None, obs(True, T0), T0, DEFAULT)
    assert new is not None
    assert next_sweep_at(new, DEFAULT) is None
    later = T0 + DEFAULT.user_retention_ms + 1
    swept, result = sweep(new, later, DEFAULT)
    assert not result.deleted
    assert swept is new


# R4 ---------------------------------------------------------------------------------------------------------


def test_r4_agreement_changes_only_verified_at_and_publishes_it() -> None:
    record = online_record()
    new, result = apply_observation(record, obs(True, T0 + MIN), T0, DEFAULT)
    assert new is not None
    assert result.correction == "verified"
    assert result.transitions == ()
    assert new == record._replace(verified_at=T0 + MIN)
    assert state_payload(new)["verified_at"] == T0 + MIN
    assert "verified_at" not in state_payload(record)


def test_r4_offline_agreement() -> None:
    record, _ = run([ev("a", "online", T0), ev("a", "offline", T0 + MIN)])
    assert record is not None
    new, result = apply_observation(record, obs(False, T0 + 2 * MIN), T0 + MIN, DEFAULT)
    assert new is not None
    assert result.correction == "verified"
    assert result.transitions == ()
    assert new.verified_at == T0 + 2 * MIN


def test_r_fields_round_trip_and_old_records_read() -> None:
    record = online_record()
    new, _ = apply_observation(record, obs(False, T0 + 10 * MIN), T0, DEFAULT)
    assert new is not None
    new, _ = apply_observation(new, obs(True, T0 + 11 * MIN, "0@2"), T0, DEFAULT)
    assert new is not None
    assert new.observed_online_at is not None and new.offline_horizon is not None
    assert record_from_dict(record_to_dict(new)) == new
    # A record written before reconciliation has none of the keys.
    old = record_to_dict(record)
    assert not {"verified_at", "offline_horizon", "observed_online_at"} & set(old)
    assert record_from_dict(old) == record


# R5 ---------------------------------------------------------------------------------------------------------


def test_r5_the_16_minute_redelivery_opens_nothing() -> None:
    """An online re-delivered ~16 minutes after its session ended and was forgotten (S6) must not open a session
    no event will ever close."""
    record, _ = run([ev("a", "online", T0), ev("a", "offline", T0 + MIN)])
    assert record is not None
    now = T0 + 17 * MIN
    record, _ = sweep(record, now, DEFAULT)  # S6: the ended session is forgotten
    assert record is not None and "a" not in record.sessions
    # Upstream's retry went through the gateway again: a new RAW record, not a redelivery of the first (S10).
    retry = ev("a", "online", T0)._replace(delivery_id="0@99")
    late, result = apply(record, retry, now, DEFAULT)
    assert result.outcome == "too_late"
    assert result.transitions == ()
    assert computed_status(late) == "offline"
    assert "a" not in late.sessions


def test_r5_only_for_sessions_the_record_does_not_know_and_older_than_the_horizon() -> None:
    record = online_record()
    now = T0 + 20 * MIN
    # Within the ended-session horizon: applied as before.
    _, result = apply(record, ev("b", "online", now - DEFAULT.ended_session_retention_ms), now, DEFAULT)
    assert result.outcome == "applied"
    # A known session is judged by S1-S3, however old.
    _, result = apply(record, ev("a", "offline", T0 + 1), now, DEFAULT)
    assert result.outcome == "applied"
    # A user never seen has no forgotten session: its first event applies.
    _, result = apply(None, ev("a", "online", T0), now, DEFAULT)
    assert result.outcome == "applied"


# S10 --------------------------------------------------------------------------------------------------------


def test_s10_a_redelivered_observation_resends_identical_transitions() -> None:
    record = online_record()
    observation = obs(False, T0 + 10 * MIN, "0@7")
    new, first = apply_observation(record, observation, T0, DEFAULT)
    assert new is not None and first.transitions
    again = redelivered(new, observation)
    assert again.transitions == first.transitions
    assert again.reemitted
    # Another observation with the same time but a new position is not a redelivery.
    assert redelivered(new, obs(False, T0 + 10 * MIN, "0@8")).transitions == ()
