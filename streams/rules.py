"""The presence state machine (rules S1-S9 of the behaviour contract, and S10's transition memory).

Pure: no Faust, no Kafka, no clock, no I/O. The glue decodes a RAW event, calls :func:`apply` with the user's
record from the table and the partition's stream time, writes the returned record back (assigning a new object:
a Faust table only persists on assignment) and sends what the outputs ask for. Periodic tick messages on a
co-partitioned topic drive :func:`sweep` for S6 retention and S8 releases.

Every value here is immutable and is replaced, never changed in place. The per-event types are ``NamedTuple``s
rather than frozen dataclasses: they build several times faster, which matters at tens of thousands of events
per second per core, and encode straight to JSON arrays. A record's ``sessions`` mapping is a plain
``dict`` for speed but is treated as frozen: each change builds a new one.

Decisions on cases the contract leaves open:

* **First event of a user.** A user never seen is ``offline`` (S5), so a record created by an online emits
  ``offline -> online``; one created by an offline emits nothing (the status stays ``offline``, but the record and
  its STATE are still written: the user is now known); one created by a logout emits ``offline -> logged_out``,
  because S7 emits whenever the S5 status changes and that is the information a consumer needs.
* **epoch** is the time of the event that created the record. A user deleted under S6 and seen again starts a new
  record, hence a new epoch (normally far later), and ``seq`` restarts at 1.
* **Deletion (S6, S7).** Deleting a user changes what the query API answers (a record, then 404, which consumers
  read as ``offline``), so it is a transition like any other: ``from`` the status shown ``to: "offline"``, with
  cause event ``deleted`` (session ``-``, no os or IP), ``at`` = ``last_seen + user_retention_ms`` (the instant the
  retention ran out, a function of the record alone, so a recomputed deletion is identical), next ``seq`` of
  the epoch. It is emitted even from ``offline``: ``to`` stays within the statuses every v1 reader knows, and the
  cause tells a follower to forget the user. A consumer that saw it infers ``offline``, which is exactly what a
  new record created by an offline shows, so such a record still emits nothing, and one created by a logout or
  an online emits its change from ``offline``.
* **Stream time** inside :func:`apply` is ``max(stream_time, event.time)``: the event being applied belongs to
  the partition, so stream time has reached it. A held transition whose window that time has passed is released
  *before* the event is applied, so an online later than ``t + G`` never cancels an expired hold.
* **S8 while held.** If the user's status moves between ``offline`` and ``logged_out`` while an
  ``online -> offline`` is held, the held transition is retargeted (new ``to``, ``at`` and cause) but keeps its
  original release time, so a stream of ends cannot postpone the release forever. An end whose own window has
  already passed in stream time (e.g. a 5-minute-late offline with a short grace) is emitted at once.
  While held, the record shows ``online`` (what TRANSITIONS has shown) with the sessions actually online (none).
* **STATE** is republished after every applied event, every release and every S1 duplicate. The duplicate case
  serves S10: a redelivery after a crash may be exactly the event whose STATE publish was lost, and republishing
  an unchanged record to a compacted topic is harmless. Stale events and retention drops publish nothing.
* **Client IPs.** With ``include_client_ip`` off, IPs are not even stored in the record (nor in its changelog):
  what is never published need not be kept.
* **Re-emits (S10).** The record remembers its last ``transition_memory`` transitions with the event (or sweep
  stream time and delivery) that triggered them. An event found duplicate or stale that matches a remembered
  trigger, delivery id included, re-emits those transitions unchanged, and every remembered one after them (a
  re-send always ends on the user's latest transition), so a worker that wrote the table but died
  before its sends were acknowledged repairs the gap on redelivery. :func:`remembered` hands out the whole memory,
  for the glue to re-send what a restart may have lost but no redelivered event names: sweep releases and
  deletions. A deleting sweep therefore returns the user's final record, memory included, for the glue to keep
  as long as a re-send may be needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple

from core.contract import CODE_BY_STATUS, STATUS_BY_CODE, Event, EventStatus, Observation

UserStatus = Literal["online", "offline", "logged_out"]
# ``too_late`` (R5): an event for a session the record does not know, older than the ended-session horizon.
Outcome = Literal["applied", "duplicate", "stale", "too_late"]
# What caused a transition: an upstream event, the deletion of an idle user (S6), or an observation (R2, R3).
CauseEvent = Literal["online", "offline", "logout", "deleted", "reconcile"]
# What an applied observation did (R2-R4); a metric label.
Correction = Literal["session_ended", "synthetic_opened", "verified"]

SCHEMA_VERSION: Final = 1
MINUTE_MS: Final = 60_000
DAY_MS: Final = 24 * 60 * MINUTE_MS

# S3: within one session and one millisecond, logout beats offline beats online. The upstream codes happen to
# rank the same way, so the code doubles as the priority.
_PRIORITY: Final = CODE_BY_STATUS
_SWEEP_TRIGGER: Final = "sweep"
RECONCILE: Final = "reconcile"
# A deletion's cause names no session; the schema requires a non-empty string, so it is a fixed placeholder.
DELETION_SESSION: Final = "-"

# An event's trigger is ``Event.trigger``. A trigger names what caused transitions to be emitted, so a redelivery of it can re-emit them:
# (session_id, event status, event time, delivery id) for an event, (None, "sweep", stream time, tick id) for a
# sweep. The delivery id tells a redelivered RAW record (same id: re-emit) from an upstream retry that went
# through the gateway again (new id: a plain duplicate, nothing to repeat); the tick id does the same for ticks.
Trigger = tuple[str | None, str, int, str]


@dataclass(frozen=True, slots=True)
class PresenceConfig:
    """Tuning of the state machine; every value is a setting of the worker."""

    ended_session_retention_ms: int = 15 * MINUTE_MS
    user_retention_ms: int = 30 * DAY_MS
    offline_grace_ms: int = 0
    include_client_ip: bool = True
    transition_memory: int = 8
    # Deleted users whose final record the glue keeps per partition, to re-send their deletion after a crash (S10).
    deletion_memory: int = 10_000
    # R2: an offline observation at T ends only sessions whose newest event is older than T - margin (clock skew
    # between our clock and RongCloud's, and the moment RongCloud registers a new connection).
    reconcile_margin_ms: int = 30_000

    def __post_init__(self) -> None:
        for name in (
            "ended_session_retention_ms",
            "user_retention_ms",
            "offline_grace_ms",
            "transition_memory",
            "deletion_memory",
            "reconcile_margin_ms",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")


class SessionState(NamedTuple):
    """A session as decided by its newest applied event.

    ``since`` is when the session entered its current side (online, or ended): an online newer than another
    online keeps it, an online re-opening an ended session resets it.
    """

    status: EventStatus
    time: int
    os: str | None
    client_ip: str | None
    since: int


class Cause(NamedTuple):
    session_id: str
    event: CauseEvent
    os: str | None
    client_ip: str | None


class Transition(NamedTuple):
    """One TRANSITIONS event (S7) before the glue stamps ``emitted_at``."""

    userid: str
    from_status: UserStatus
    to_status: UserStatus
    at: int
    cause: Cause
    platforms: tuple[str, ...]
    online_sessions: int
    epoch: int
    seq: int

    def to_payload(self, include_client_ip: bool = True) -> dict[str, Any]:
        cause = self.cause
        return {
            "schema": SCHEMA_VERSION,
            "userid": self.userid,
            "from": self.from_status,
            "to": self.to_status,
            "at": self.at,
            "cause": {
                "sessionId": cause.session_id,
                "event": cause.event,
                "os": cause.os,
                "clientIp": cause.client_ip if include_client_ip else None,
            },
            "platforms": list(self.platforms),
            "online_sessions": self.online_sessions,
            "epoch": self.epoch,
            "seq": self.seq,
        }


class HeldTransition(NamedTuple):
    """An ``online -> offline|logged_out`` held by S8 damping.

    Holding only happens with no session online, so the released transition always has no platforms and
    ``online_sessions == 0``; ``seq`` is assigned at release.
    """

    to_status: UserStatus
    at: int
    cause: Cause
    release_after: int


class Memo(NamedTuple):
    """A remembered transition and its trigger, flat and primitive-only so a record decodes cheaply.

    Only a redelivery turns it back into a :class:`Transition` (see :meth:`transition`).
    """

    trigger_session: str | None
    trigger_status: str
    trigger_time: int
    trigger_delivery: str
    from_status: UserStatus
    to_status: UserStatus
    at: int
    cause_session: str
    cause_event: CauseEvent
    cause_os: str | None
    cause_ip: str | None
    platforms: tuple[str, ...]
    online_sessions: int
    epoch: int
    seq: int

    def matches(self, trigger: Trigger) -> bool:
        return (
            self.trigger_time == trigger[2]
            and self.trigger_session == trigger[0]
            and self.trigger_status == trigger[1]
            and self.trigger_delivery == trigger[3]
        )

    def transition(self, userid: str) -> Transition:
        cause = Cause(self.cause_session, self.cause_event, self.cause_os, self.cause_ip)
        return Transition(
            userid,
            self.from_status,
            self.to_status,
            self.at,
            cause,
            self.platforms,
            self.online_sessions,
            self.epoch,
            self.seq,
        )


class UserRecord(NamedTuple):
    """Everything the worker keeps for one user (the table value).

    ``status`` is the status shown to consumers (the ``to`` of the last emitted transition); it differs from
    :func:`computed_status` only while an S8 transition is held. ``last_end_time``/``last_end_logout`` remember
    the newest end applied to any session, so dropping ended sessions (S6) never changes the S5 status.
    """

    userid: str
    sessions: Mapping[str, SessionState]
    epoch: int
    seq: int
    last_seen: int
    last_end_time: int | None
    last_end_logout: bool
    status: UserStatus
    held: HeldTransition | None
    memory: tuple[Memo, ...]
    # Reconciliation (R2-R4); None until an observation sets them. ``verified_at``: the newest observation that
    # agreed (R4). ``offline_horizon``: the largest T - margin among offline observations (R2): an online event
    # older than it is stale, even for a session the record does not know. ``observed_online_at``: the newest
    # online observation (R3): while it is at or after ``last_seen`` and no later offline observation arrived,
    # the user counts as online (a synthetic session, listed in no session).
    verified_at: int | None = None
    offline_horizon: int | None = None
    observed_online_at: int | None = None


class ApplyResult(NamedTuple):
    """What the glue must do after :func:`apply`.

    ``transitions`` are in ``seq`` order; ``reemitted`` says some of them were sent before (S10).
    ``record_changed`` means the table must be written; ``publish_state`` means STATE must be sent.
    """

    outcome: Outcome
    transitions: tuple[Transition, ...]
    record_changed: bool
    publish_state: bool
    reemitted: bool
    # For an observation: what it corrected or confirmed (None: nothing, e.g. overruled by newer events).
    correction: Correction | None = None


class SweepResult(NamedTuple):
    """What the glue must do after :func:`sweep`.

    ``deleted`` means the user is deleted: send ``transitions`` (the deletion), then a STATE tombstone. The
    record returned with it is the user's final form, kept only to re-send the deletion (S10), never shown.
    """

    transitions: tuple[Transition, ...]
    record_changed: bool
    publish_state: bool
    deleted: bool
    reemitted: bool


_NO_TRANSITIONS: Final[tuple[Transition, ...]] = ()
_SWEEP_NOTHING: Final = SweepResult(_NO_TRANSITIONS, False, False, False, False)


def _has_online(sessions: Mapping[str, SessionState]) -> bool:
    for s in sessions.values():
        if s.status == "online":
            return True
    return False


def _synthetic(record: UserRecord) -> bool:
    """R3: an online observation at or after the newest event, with no later offline observation, keeps the user
    online although no session is."""
    observed = record.observed_online_at
    return observed is not None and observed >= record.last_seen


def _down_status(last_end_logout: bool) -> UserStatus:
    return "logged_out" if last_end_logout else "offline"


def computed_status(record: UserRecord | None) -> UserStatus:
    """The S5 status from the sessions alone, ignoring any S8 hold."""
    if record is None:
        return "offline"
    if _has_online(record.sessions) or _synthetic(record):
        return "online"
    return _down_status(record.last_end_logout)


def platforms_of(sessions: Mapping[str, SessionState]) -> tuple[str, ...]:
    """Sorted unique ``os`` of the online sessions (sessions without an ``os`` are not counted)."""
    found = {s.os for s in sessions.values() if s.status == "online" and s.os is not None}
    return tuple(sorted(found))


def _online_count(sessions: Mapping[str, SessionState]) -> int:
    return sum(1 for s in sessions.values() if s.status == "online")


def _remember(
    memory: tuple[Memo, ...], trigger: Trigger, emitted: list[Transition], size: int
) -> tuple[Memo, ...]:
    if size == 0:
        return ()
    added = memory + tuple(
        Memo(
            *trigger,
            t.from_status,
            t.to_status,
            t.at,
            *t.cause,
            t.platforms,
            t.online_sessions,
            t.epoch,
            t.seq,
        )
        for t in emitted
    )
    return added[-size:] if len(added) > size else added


def _recall(userid: str, memory: tuple[Memo, ...], trigger: Trigger) -> list[Transition]:
    """What ``trigger`` caused, and every transition remembered after it.

    The re-send runs to the user's latest transition so that a consumer ends on it whatever it received
    meanwhile: a repeat of an older transition alone could otherwise follow a deletion the consumer has seen.
    """
    for i, memo in enumerate(memory):
        if memo.matches(trigger):
            return [m.transition(userid) for m in memory[i:]]
    return []


def _new_record(userid: str, at: int) -> UserRecord:
    """The record of a user first seen at ``at``: shown ``offline``, S5's status for a user never seen."""
    return UserRecord(
        userid=userid,
        sessions={},
        epoch=at,
        seq=0,
        last_seen=at,
        last_end_time=None,
        last_end_logout=False,
        status="offline",
        held=None,
        memory=(),
    )


def _release_expired(
    record: UserRecord, now: int, emitted: list[Transition]
) -> tuple[int, UserStatus, HeldTransition | None]:
    """Release ``record``'s held transition (S8) if stream time ``now`` is past its window, appending it to
    ``emitted``: before anything else is applied, so a later event never cancels an expired hold. Returns the
    seq, shown status and hold that remain."""
    held = record.held
    if held is None or now <= held.release_after:
        return record.seq, record.status, held
    seq = record.seq + 1
    emitted.append(_release(record.userid, record.status, held, record.epoch, seq))
    return seq, held.to_status, None


def _release(
    record_userid: str, from_status: UserStatus, held: HeldTransition, epoch: int, seq: int
) -> Transition:
    return Transition(record_userid, from_status, held.to_status, held.at, held.cause, (), 0, epoch, seq)


def apply(
    record: UserRecord | None, event: Event, stream_time: int, config: PresenceConfig
) -> tuple[UserRecord, ApplyResult]:
    """Apply one event to a user's record (S1-S5, S7, S8; S10 re-emits).

    ``record`` is ``None`` for a user the table does not know. ``stream_time`` is the partition's stream time
    (S6); the event's own time is folded in. Returns the new record (the same object when nothing changed) and
    what to emit.
    """
    now = stream_time if stream_time >= event.time else event.time
    existed = record is not None
    if record is None:
        record = _new_record(event.userid, event.time)

    emitted: list[Transition] = []
    seq, shown, held = _release_expired(record, now, emitted)

    sessions = record.sessions
    old = sessions.get(event.session_id)
    prio = _PRIORITY[event.status]
    if old is not None and (
        event.time < old.time or (event.time == old.time and prio <= _PRIORITY[old.status])
    ):
        # S1 / S2 / S3: the session's newest event wins; this one changes nothing.
        duplicate = event.time == old.time and event.status == old.status
        return _unapplied(
            record, event, seq, shown, held, emitted, config, "duplicate" if duplicate else "stale"
        )
    if old is None and existed:
        horizon = record.offline_horizon
        if event.status == "online" and horizon is not None and event.time < horizon:
            # R2: an online older than an offline observation's horizon is stale, even for a session never seen.
            return _unapplied(record, event, seq, shown, held, emitted, config, "stale")
        if event.time < now - config.ended_session_retention_ms:
            # R5: the session may have ended and been forgotten (S6); opening it could leave it online for good.
            return _unapplied(record, event, seq, shown, held, emitted, config, "too_late")
    return _applied(record, event, now, seq, shown, held, emitted, old, config)


def _unapplied(
    record: UserRecord,
    event: Event,
    seq: int,
    shown: UserStatus,
    held: HeldTransition | None,
    emitted: list[Transition],
    config: PresenceConfig,
    outcome: Outcome,
) -> tuple[UserRecord, ApplyResult]:
    """An event that changes no session (S1-S3, R2's horizon, R5): only a release it triggered, and re-sends."""
    duplicate = outcome == "duplicate"
    reemits = _recall(record.userid, record.memory, event.trigger)
    if emitted:
        record = record._replace(
            seq=seq,
            status=shown,
            held=held,
            memory=_remember(record.memory, event.trigger, emitted, config.transition_memory),
        )
    return record, ApplyResult(
        outcome,
        tuple(reemits + emitted),
        bool(emitted),
        duplicate or bool(emitted),
        bool(reemits),
    )


def _applied(
    record: UserRecord,
    event: Event,
    now: int,
    seq: int,
    shown: UserStatus,
    held: HeldTransition | None,
    emitted: list[Transition],
    old: SessionState | None,
    config: PresenceConfig,
) -> tuple[UserRecord, ApplyResult]:
    sessions = record.sessions
    # A redelivery can find its session already dropped by S6 and apply again; it must still re-send what it
    # caused the first time.
    reemits = _recall(record.userid, record.memory, event.trigger) if old is None and record.memory else []
    online = event.status == "online"
    os = event.os
    ip = event.client_ip if config.include_client_ip else None
    if old is None:
        # S4: an end for an unseen session creates it ended, so an older online for it is stale later.
        since = event.time
    else:
        if os is None:
            os = old.os
        if ip is None:
            ip = old.client_ip
        since = old.since if (old.status == "online") == online else event.time
    new_sessions = dict(sessions)
    new_sessions[event.session_id] = SessionState(event.status, event.time, os, ip, since)

    last_end_time = record.last_end_time
    last_end_logout = record.last_end_logout
    if not online and (
        last_end_time is None
        or event.time > last_end_time
        or (event.time == last_end_time and event.status == "logout")
    ):
        last_end_time = event.time
        last_end_logout = event.status == "logout"

    last_seen = record.last_seen if record.last_seen >= event.time else event.time
    observed = record.observed_online_at
    if online or _has_online(new_sessions) or (observed is not None and observed >= last_seen):
        target: UserStatus = "online"
    else:
        target = _down_status(last_end_logout)

    cause: Cause | None = None
    if held is not None:
        if target == "online":
            held = None  # S8: back online within the grace window; nothing was shown, nothing is emitted.
        elif target != held.to_status:
            cause = Cause(event.session_id, event.status, os, ip)
            held = HeldTransition(target, event.time, cause, held.release_after)
    elif target != shown:
        cause = Cause(event.session_id, event.status, os, ip)
        grace = config.offline_grace_ms
        if shown == "online" and grace > 0 and now <= event.time + grace:
            held = HeldTransition(target, event.time, cause, event.time + grace)
        else:
            seq += 1
            if target == "online":
                plats = platforms_of(new_sessions)
                count = _online_count(new_sessions)
            else:
                plats = ()
                count = 0
            emitted.append(
                Transition(record.userid, shown, target, event.time, cause, plats, count, record.epoch, seq)
            )
            shown = target

    memory = record.memory
    if emitted:
        memory = _remember(memory, event.trigger, emitted, config.transition_memory)
    new_record = record._replace(
        sessions=new_sessions,
        seq=seq,
        last_seen=last_seen,
        last_end_time=last_end_time,
        last_end_logout=last_end_logout,
        status=shown,
        held=held,
        memory=memory,
    )
    return new_record, ApplyResult("applied", tuple(reemits + emitted), True, True, bool(reemits))


def observation_trigger(observation: Observation) -> Trigger:
    """An observation's trigger (S10): its time and RAW position, so only a redelivery of it re-sends."""
    return (None, RECONCILE, observation.at, observation.delivery_id)


def apply_observation(
    record: UserRecord | None, observation: Observation, stream_time: int, config: PresenceConfig
) -> tuple[UserRecord | None, ApplyResult]:
    """Apply an observation of RongCloud's answer (R2-R4) to a user's record.

    Offline at T (R2) ends every online session whose newest event is older than T - margin, and ends a synthetic
    online older than T; sessions with newer events stay. Online at T (R3) with no session online makes the user
    online by a synthetic session, unless an event or an offline observation is newer than T. One that agrees
    changes ``verified_at`` only (R4). Returns ``None`` for a user the table does not know and who is offline: no
    record is created. Transitions name the cause ``reconcile`` (session ``-``) at T.
    """
    at = observation.at
    if record is None:
        if not observation.online:
            return None, ApplyResult("applied", _NO_TRANSITIONS, False, False, False, "verified")
        record = _new_record(observation.userid, at)
    trigger = observation_trigger(observation)
    emitted: list[Transition] = []
    seq, shown, held = _release_expired(record, stream_time, emitted)

    sessions = record.sessions
    last_end_time = record.last_end_time
    last_end_logout = record.last_end_logout
    horizon = record.offline_horizon
    observed = record.observed_online_at
    verified = record.verified_at
    correction: Correction | None = None
    if observation.online:
        if _has_online(sessions) or _synthetic(record):
            correction = "verified"
            if _synthetic(record) and observed is not None and at > observed:
                observed = at
        elif at >= record.last_seen and (horizon is None or at > horizon + config.reconcile_margin_ms):
            correction = "synthetic_opened"
            observed = at
    else:
        cutoff = at - config.reconcile_margin_ms
        if horizon is None or cutoff > horizon:
            horizon = cutoff
        ended = [sid for sid, s in sessions.items() if s.status == "online" and s.time < cutoff]
        synthetic_ended = observed is not None and observed >= record.last_seen and observed < at
        if synthetic_ended:
            observed = None
        if ended:
            new_sessions = dict(sessions)
            for sid in ended:
                s = sessions[sid]
                # The session ends at the horizon: an online of it older than that is stale from now on (S1).
                new_sessions[sid] = SessionState("offline", cutoff, s.os, s.client_ip, cutoff)
            sessions = new_sessions
            if last_end_time is None or cutoff > last_end_time:
                last_end_time = cutoff
                last_end_logout = False
        if ended or synthetic_ended:
            correction = "session_ended"
        elif not _has_online(sessions):
            correction = "verified"
    new_record = record._replace(
        sessions=sessions,
        last_end_time=last_end_time,
        last_end_logout=last_end_logout,
        offline_horizon=horizon,
        observed_online_at=observed,
    )
    if correction is not None and (verified is None or at > verified):
        verified = at
    new_record = new_record._replace(verified_at=verified)
    target = computed_status(new_record)
    if held is not None and target == "online":
        held = None  # S8: back online within the grace window; nothing was shown, nothing is emitted.
    elif held is None and target != shown:
        # A correction is not a flap: it is emitted at once, never held (S8).
        seq += 1
        cause = Cause(DELETION_SESSION, RECONCILE, None, None)
        if target == "online":
            plats = platforms_of(sessions)
            count = _online_count(sessions)
        else:
            plats, count = (), 0
        emitted.append(Transition(record.userid, shown, target, at, cause, plats, count, record.epoch, seq))
        shown = target
    reemits = _recall(record.userid, record.memory, trigger) if record.memory else []
    memory = record.memory
    if emitted:
        memory = _remember(memory, trigger, emitted, config.transition_memory)
    new_record = new_record._replace(seq=seq, status=shown, held=held, memory=memory)
    changed = new_record != record
    return new_record, ApplyResult(
        "applied", tuple(reemits + emitted), changed, changed or bool(reemits), bool(reemits), correction
    )


def remembered(record: UserRecord) -> tuple[Transition, ...]:
    """Every transition the record remembers, oldest first (``seq`` order), for re-sending after a restart (S10)."""
    userid = record.userid
    return tuple(m.transition(userid) for m in record.memory)


def reborn(final: UserRecord, record: UserRecord, config: PresenceConfig) -> UserRecord:
    """``record``, the new record of a user deleted before (``final``: its final record), also remembering the
    final record's transitions: a crash may yet require re-sending the deletion (S10). Newer transitions evict
    them as usual."""
    if not final.memory:
        return record
    memory = final.memory + record.memory
    size = config.transition_memory
    return record._replace(memory=memory[-size:] if len(memory) > size else memory)


def redelivered(record: UserRecord, event: Event | Observation) -> ApplyResult:
    """An event the glue knows ``record`` already reflects (S10): change nothing, re-send what it caused.

    The glue recognises a redelivery by the source position it stored with the record, so this also holds when
    the event's session has since been dropped (S6) and applying it again would re-create the session.
    """
    trigger = observation_trigger(event) if isinstance(event, Observation) else event.trigger
    reemits = _recall(record.userid, record.memory, trigger) if record.memory else []
    return ApplyResult("duplicate", tuple(reemits), False, True, bool(reemits))


def sweep(
    record: UserRecord | None,
    stream_time: int,
    config: PresenceConfig,
    tick_id: str = "",
    releases_only: bool = False,
) -> tuple[UserRecord | None, SweepResult]:
    """Advance a record to ``stream_time`` without an event (S6 retention, S8 release).

    Releases a held transition whose window stream time has passed; drops ended sessions older than
    ``ended_session_retention_ms`` (status unchanged, nothing emitted, STATE unchanged since STATE lists online
    sessions only); deletes a user with no session online, nothing held and nothing seen for
    ``user_retention_ms``: emits the deletion transition and returns the final record with ``deleted`` set (the
    glue publishes a tombstone and no longer treats the user as known). Returns the same record object when
    nothing changed.

    ``releases_only``: only release a hold; for the idle-partition tick, whose ``stream_time`` is made up of wall
    time (S8) and must decide nothing else (sessions and users are dropped in stream time only).

    ``tick_id`` names the tick message driving the sweep (e.g. its partition and offset): a redelivered tick
    with the same id and stream time re-emits the release it caused (S10). Left empty, every sweep at the same
    stream time counts as a redelivery and repeats it (harmless, identical).
    """
    if record is None:
        return None, _SWEEP_NOTHING
    trigger: Trigger = (None, _SWEEP_TRIGGER, stream_time, tick_id)
    reemits = _recall(record.userid, record.memory, trigger) if record.memory else []
    emitted: list[Transition] = []
    seq = record.seq
    shown = record.status
    held = record.held
    memory = record.memory
    if held is not None and stream_time > held.release_after:
        seq += 1
        emitted.append(_release(record.userid, shown, held, record.epoch, seq))
        shown = held.to_status
        held = None
        memory = _remember(memory, trigger, emitted, config.transition_memory)

    sessions = record.sessions
    cutoff = stream_time - config.ended_session_retention_ms
    if not releases_only and any(s.status != "online" and s.time < cutoff for s in sessions.values()):
        sessions = {k: s for k, s in sessions.items() if s.status == "online" or s.time >= cutoff}

    # Stream time can pass a hold's window and the user retention at once: release, then delete. A sweep that
    # re-sends (a redelivered tick) decides nothing more.
    if (
        held is None
        and not releases_only
        and not reemits
        and stream_time - record.last_seen > config.user_retention_ms
        and not _has_online(sessions)
        and not _synthetic(record)
    ):
        seq += 1
        cause = Cause(DELETION_SESSION, "deleted", None, None)
        at = record.last_seen + config.user_retention_ms
        emitted.append(Transition(record.userid, shown, "offline", at, cause, (), 0, record.epoch, seq))
        final = record._replace(
            sessions={},
            seq=seq,
            status="offline",
            held=None,
            memory=_remember(memory, trigger, emitted, config.transition_memory),
        )
        return final, SweepResult(tuple(emitted), True, False, True, False)

    if sessions is record.sessions and not emitted:
        if reemits:
            return record, SweepResult(tuple(reemits), False, True, False, True)
        return record, _SWEEP_NOTHING
    new_record = record._replace(sessions=sessions, seq=seq, status=shown, held=held, memory=memory)
    return new_record, SweepResult(
        tuple(reemits + emitted), True, bool(emitted) or bool(reemits), False, bool(reemits)
    )


def next_sweep_at(record: UserRecord, config: PresenceConfig) -> int | None:
    """The smallest stream time at which :func:`sweep` would change ``record``, or ``None`` if never.

    Lets the glue index users by due time instead of sweeping every key on every tick.
    """
    due: int | None = None
    if record.held is not None:
        due = record.held.release_after + 1
    online = False
    for s in record.sessions.values():
        if s.status == "online":
            online = True
        else:
            at = s.time + config.ended_session_retention_ms + 1
            if due is None or at < due:
                due = at
    if not online and record.held is None and not _synthetic(record):
        at = record.last_seen + config.user_retention_ms + 1
        if due is None or at < due:
            due = at
    return due


def state_payload(record: UserRecord, include_client_ip: bool = True) -> dict[str, Any]:
    """The STATE value (S9), also served by the query API (Q1). Sessions are the online ones, by ``since``."""
    online = sorted(
        ((sid, s) for sid, s in record.sessions.items() if s.status == "online"),
        key=lambda item: (item[1].since, item[0]),
    )
    payload: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "userid": record.userid,
        "status": record.status,
        "sessions": [
            {
                "sessionId": sid,
                "os": s.os,
                "clientIp": s.client_ip if include_client_ip else None,
                "since": s.since,
            }
            for sid, s in online
        ],
        "platforms": list(platforms_of(record.sessions)),
        "last_seen": record.last_seen,
        "epoch": record.epoch,
        "seq": record.seq,
    }
    if record.verified_at is not None:
        payload["verified_at"] = record.verified_at  # R4; absent until an observation agreed
    return payload


# Table value layout. Lists instead of dicts for the repeated parts keep the changelog small and the
# encode/decode cheap; bump _RECORD_VERSION on any change and keep a reader for the old one.
_RECORD_VERSION: Final = 1


def _cause_to_list(c: Cause) -> list[Any]:
    return [c.session_id, c.event, c.os, c.client_ip]


def _cause_from_list(v: list[Any]) -> Cause:
    return Cause(v[0], v[1], v[2], v[3])


def record_to_dict(record: UserRecord) -> dict[str, Any]:
    """JSON-able form of a record for the table (round-trips through :func:`record_from_dict`)."""
    held = record.held
    data: dict[str, Any] = {
        "v": _RECORD_VERSION,
        "userid": record.userid,
        "sessions": {
            sid: [_PRIORITY[s.status], s.time, s.os, s.client_ip, s.since]
            for sid, s in record.sessions.items()
        },
        "epoch": record.epoch,
        "seq": record.seq,
        "last_seen": record.last_seen,
        "last_end": None if record.last_end_time is None else [record.last_end_time, record.last_end_logout],
        "status": record.status,
        "held": None
        if held is None
        else [held.to_status, held.at, _cause_to_list(held.cause), held.release_after],
        "memory": [list(m) for m in record.memory],
    }
    # Reconciliation's fields are optional keys, written only when set: a record without them reads as before,
    # and a worker of the previous release still reads the version (rolling upgrades).
    if record.verified_at is not None:
        data["verified_at"] = record.verified_at
    if record.offline_horizon is not None:
        data["offline_horizon"] = record.offline_horizon
    if record.observed_online_at is not None:
        data["observed_online_at"] = record.observed_online_at
    return data


def record_from_dict(data: Mapping[str, Any]) -> UserRecord:
    """Inverse of :func:`record_to_dict`."""
    version = data.get("v")
    if version != _RECORD_VERSION:
        raise ValueError(f"unsupported record version {version!r}")
    userid: str = data["userid"]
    statuses = STATUS_BY_CODE
    sessions = {
        sid: SessionState(statuses[v[0]], v[1], v[2], v[3], v[4]) for sid, v in data["sessions"].items()
    }
    last_end = data["last_end"]
    held_v = data["held"]
    held = (
        None
        if held_v is None
        else HeldTransition(held_v[0], held_v[1], _cause_from_list(held_v[2]), held_v[3])
    )
    memory = tuple(
        Memo(
            m[0],
            m[1],
            m[2],
            m[3],
            m[4],
            m[5],
            m[6],
            m[7],
            m[8],
            m[9],
            m[10],
            tuple(m[11]),
            m[12],
            m[13],
            m[14],
        )
        for m in data["memory"]
    )
    return UserRecord(
        userid=userid,
        sessions=sessions,
        epoch=data["epoch"],
        seq=data["seq"],
        last_seen=data["last_seen"],
        last_end_time=None if last_end is None else last_end[0],
        last_end_logout=False if last_end is None else bool(last_end[1]),
        status=data["status"],
        held=held,
        memory=memory,
        verified_at=data.get("verified_at"),
        offline_horizon=data.get("offline_horizon"),
        observed_online_at=data.get("observed_online_at"),
    )
