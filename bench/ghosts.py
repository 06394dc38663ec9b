"""Ghost presence: how long users are shown with the wrong status when RongCloud loses callbacks, with the worker's
reconciliation (checkOnline) off and on, against the ground truth of a RongCloud emulator.

Emulated traffic goes through the real gateway, Kafka and worker. A trace (:mod:`presence.trace`, fixed seed) is
delivered by the emulator's :class:`~presence.emulator.CallbackSender` as RongCloud delivers callbacks (signed,
batched, retried, offlines up to 5 minutes late, three attempts then dropped, a pause after many failures), with
1 % of the callbacks lost outright, and one gateway outage (the process killed, so upstream's attempts fail and are
dropped, then started again). The worker's reconciliation asks the emulator's ``/user/checkOnline.json``, which
answers from the same ground truth within RongCloud's rate limit. Both modes get the same trace, the same losses
(the same seed) and the outage at the same moment; each runs on its own topics and consumer group on one broker.

What a consumer of TRANSITIONS believes (each user's last transition by ``emitted_at``, deduplicated by
``(epoch, seq)``; no record: offline) is compared with the ground truth (online while any session is) over the
trace's span, for every user the trace names:

- wrong-status user-time as a share of all user-time, split into *ghost online* (shown online, really offline)
  and *ghost offline* (shown offline, really online);
- ghosts: maximal wrong intervals longer than the margin (shorter ones are the pipeline's own delay and
  upstream's batching), their duration p50 / p99 / max, and those still open when the trace ends;
- API calls per second (the emulator's record of every call) against the budget, and calls while nobody can be
  silent yet and nothing is suspect (before ``max_silence`` has passed, before the outage);
- corrections (transitions caused by an observation, ``cause.event == "reconcile"``) that were wrong: the status
  they set disagreed with the truth at their ``emitted_at`` for longer than the margin;
- the wrong time and ghosts by cause (:func:`attribute`: the outage, a lost callback, failed attempts, a late
  offline, the pipeline's delay, a correction, or other), to tell what reconciliation could have reached.

**Time compression.** Fifteen minutes twice do not fit in a benchmark's few minutes, so the default size runs a
trace ``speedup`` times faster: every duration is divided by the factor — the trace's times (and with them
upstream's batching window, retry delays and late offlines), upstream's failure window and pause, the outage,
and the product's timings set for the run (max_silence, recheck interval, margin, gap lookback, ended-session
retention, the checkOnline back-off) — and every rate multiplied by it (the budget and
RongCloud's rate limit per wall-clock second). With a fifth of the users the events and API calls per wall-clock
second are those of the full run. What does not compress is the processes' own latency (gateway to
``emitted_at``, an API call) and start-up: they weigh ``speedup`` times more in trace time, which adds to the
short wrong intervals (reported apart) and to the outage (the gateway's restart). For that reason a timeout on
one request (upstream's 5 s per attempt, the gateway's publish budget, the checkOnline timeout) is left as it is,
and so is the worker's tick (once a second; its timers, the one that offers age checks among them, take a good
part of a tick's interval already).
Results are reported in trace time. ``--full`` runs the issue's size (50,000 users, 15 minutes, no compression).

The modes run at the same time, on one broker, each with its own gateway, worker, topics and API emulator: the
same trace from the same moment, the outage at the same moment, and the machine's other load on both alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.common import (
    CpuMeter,
    Service,
    Workspace,
    percentile,
    python_module,
    say,
    table,
    workspace,
    write_results,
)
from bench.gateway import _healthy
from bench.kafka_tools import Offsets
from bench.recovery import ready
from bench.traffic import APP_KEY, APP_SECRET
from bench.worker import PARTITIONS, _settings, faust_worker
from core.contract import STATUS_BY_CODE, WEBHOOK_PATH
from core.topics import ensure_topics
from presence.children import wait_until
from presence.emulator import ApiEmulator, CallbackPolicy, CallbackSender, GroundTruth
from presence.localkafka import free_port
from presence.simulate import Target
from presence.trace import Delivery, Trace, TraceSpec, generate
from streams.config import WorkerSettings
from streams.main import worker_topics

T = TypeVar("T")
MODES = ("off", "on")
# The issue's sizing: a budget of 50 calls/s (half RongCloud's limit of 100/s) for 50,000 users. Smaller runs
# scale both with the population, so every run puts the same pressure per user on the budget.
BUDGET_PER_50K = 50.0
RATE_LIMIT_PER_50K = 100.0
# The trace generator makes about this many events per step of its clock (logins bring a second device,
# reconnects an end and an online, ...); used to aim its rate at events per second.
_EVENTS_PER_STEP = 1.37


@dataclass(frozen=True)
class Size:
    """One run's scenario, in trace seconds (durations) and per trace second (rates)."""

    name: str
    users: int
    trace_seconds: float
    speedup: float
    outage_at: float
    outage_seconds: float
    max_silence: float
    recheck_interval: float
    margin: float = 30.0
    gap_lookback: float = 60.0
    ended_session_retention: float = 15 * 60.0
    # Upstream events per user per second: one every 100 s, the trace's mix of logins, reconnects, kicks...
    events_per_user_per_second: float = 0.01
    loss_rate: float = 0.01
    seed: int = 14
    # The budget (and RongCloud's limit with it) times this: how wrong time answers to the budget.
    budget_factor: float = 1.0

    @property
    def budget(self) -> float:
        """The deployment's checkOnline budget, calls per trace second."""
        return BUDGET_PER_50K * self.users / 50_000 * self.budget_factor

    @property
    def rate_limit(self) -> float:
        """RongCloud's rate limit for the app, calls per trace second."""
        return RATE_LIMIT_PER_50K * self.users / 50_000 * self.budget_factor

    def wall(self, seconds: float) -> float:
        return seconds / self.speedup


SIZES = {
    "full": Size("full", users=50_000, trace_seconds=900, speedup=1, outage_at=360, outage_seconds=120,
                 max_silence=300, recheck_interval=300),
    "default": Size("default", users=10_000, trace_seconds=900, speedup=5, outage_at=360, outage_seconds=120,
                    max_silence=300, recheck_interval=300),
    # CI: seconds per mode; the numbers mean nothing, the run and its result's shape do.
    "smoke": Size("smoke", users=600, trace_seconds=300, speedup=30, outage_at=90, outage_seconds=120,
                  max_silence=60, recheck_interval=60),
}  # fmt: skip


# --- the trace and its truth ---------------------------------------------------------------------------------


def make_trace(size: Size) -> Trace:
    """The run's trace at trace time: ``users`` users for ``trace_seconds`` (the same for every mode)."""
    rate = size.users * size.events_per_user_per_second
    events = int(rate * size.trace_seconds * 1.05) + 1
    trace = generate(TraceSpec(seed=size.seed, users=size.users, events=events, rate=rate / _EVENTS_PER_STEP,
                               user_prefix="ghost-"))  # fmt: skip
    limit = int(size.trace_seconds * 1000)
    # Retries follow their originals, so cutting at a time keeps every retry's original.
    return Trace(trace.spec, [d for d in trace.deliveries if d.at_ms <= limit], trace.scenarios)


def compress(trace: Trace, speedup: float) -> Trace:
    """The same trace ``speedup`` times faster: every delivery time and event time divided by the factor."""
    if speedup == 1:
        return trace

    def scaled(ms: int) -> int:
        return round(ms / speedup)

    deliveries = [
        Delivery(scaled(d.at_ms), d.nonce, tuple({**e, "time": scaled(int(e["time"]))} for e in d.events),
                 d.retry_of)
        for d in trace.deliveries
    ]  # fmt: skip
    return Trace(trace.spec, deliveries, trace.scenarios)


# --- scoring (pure) ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shown:
    """A change of what a consumer shows: from ``at`` (emitted_at, ms) the user is ``online`` or not."""

    at: int
    online: bool
    reconcile: bool = False


@dataclass(frozen=True, slots=True)
class Wrong:
    """A maximal interval in which the shown status disagrees with the truth."""

    userid: str
    start: int
    end: int
    ghost_online: bool  # shown online, really offline (else shown offline, really online)
    open: bool  # still wrong when the window ends

    @property
    def duration(self) -> int:
        return self.end - self.start


def shown_changes(transitions: Iterable[dict[str, Any]]) -> dict[str, list[Shown]]:
    """Each user's shown status over time from TRANSITIONS payloads, as a consumer applies them: by
    ``emitted_at``, a repeated ``(epoch, seq)`` dropped (S10 redelivery)."""
    by_user: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for t in transitions:
        by_user[t["userid"]].append(t)
    shown: dict[str, list[Shown]] = {}
    for userid, items in by_user.items():
        items.sort(key=lambda t: (t["emitted_at"], t["epoch"], t["seq"]))
        seen: set[tuple[int, int]] = set()
        changes: list[Shown] = []
        for t in items:
            key = (t["epoch"], t["seq"])
            if key in seen:
                continue
            seen.add(key)
            changes.append(Shown(t["emitted_at"], t["to"] == "online", t["cause"]["event"] == "reconcile"))
        shown[userid] = changes
    return shown


def _truth_changes(intervals: Sequence[tuple[int, int | None]], base_ms: int) -> list[tuple[int, bool]]:
    changes: list[tuple[int, bool]] = []
    for start, end in intervals:
        changes.append((base_ms + start, True))
        if end is not None:
            changes.append((base_ms + end, False))
    return changes


def _status_at(changes: Sequence[tuple[int, bool]], at: int) -> bool:
    status = False
    for t, online in changes:
        if t > at:
            break
        status = online
    return status


def wrong_intervals(
    userid: str, truth: Sequence[tuple[int, bool]], shown: Sequence[Shown], window: tuple[int, int]
) -> list[Wrong]:
    """Where ``shown`` disagrees with ``truth`` (both as (ms, online) changes, sorted) within ``window``."""
    start, end = window
    points = sorted(
        {start, end, *(t for t, _ in truth if start < t < end), *(s.at for s in shown if start < s.at < end)}
    )
    shown_pairs = [(s.at, s.online) for s in shown]
    result: list[Wrong] = []
    current: tuple[int, bool] | None = None  # (start, ghost_online) of the open wrong interval
    for a in points[:-1]:
        really, seen = _status_at(truth, a), _status_at(shown_pairs, a)
        if really != seen:
            if current is not None and current[1] != seen:
                result.append(Wrong(userid, current[0], a, current[1], False))
                current = None
            if current is None:
                current = (a, seen)
        elif current is not None:
            result.append(Wrong(userid, current[0], a, current[1], False))
            current = None
    if current is not None:
        result.append(Wrong(userid, current[0], end, current[1], True))
    return result


def score(
    truth: GroundTruth, base_ms: int, shown: dict[str, list[Shown]], window: tuple[int, int], margin_ms: int,
    speedup: float, causes: Causes | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Wrong-status time, ghosts and wrong corrections over ``window`` (epoch ms), reported in trace time; with
    ``causes``, also split by cause (:func:`attribute`)."""
    users = sorted(set(truth.users()) | set(shown))
    wrong: list[Wrong] = []
    corrections: Counter[str] = Counter()
    wrong_corrections: list[dict[str, Any]] = []
    for userid in users:
        truth_changes = _truth_changes(truth.intervals(userid), base_ms)
        changes = shown.get(userid, [])
        intervals = wrong_intervals(userid, truth_changes, changes, window)
        wrong.extend(intervals)
        previous = False
        for change in changes:
            if change.reconcile and window[0] <= change.at < window[1] and change.online != previous:
                corrections["to_online" if change.online else "to_offline"] += 1
                if _status_at(truth_changes, change.at) != change.online:
                    # The status it set was wrong at once: wrong beyond the margin if it stayed wrong longer.
                    stretch = next((w for w in intervals if w.start <= change.at < w.end), None)
                    if stretch is not None and stretch.end - change.at > margin_ms:
                        wrong_corrections.append({"userid": userid, "emitted_at": change.at,
                                                  "set_online": change.online,
                                                  "wrong_for_s": (stretch.end - change.at) * speedup / 1000})  # fmt: skip
            previous = change.online
    span = window[1] - window[0]
    total = len(users) * span
    ghost_online = sum(w.duration for w in wrong if w.ghost_online)
    ghost_offline = sum(w.duration for w in wrong if not w.ghost_online)
    ghosts = [w for w in wrong if w.duration > margin_ms]
    short = sum(w.duration for w in wrong if w.duration <= margin_ms)

    def seconds(ms: float) -> float:
        return ms * speedup / 1000

    def stats(items: list[Wrong]) -> dict[str, Any]:
        durations = [seconds(w.duration) for w in items]
        return {"count": len(items), "open_at_end": sum(1 for w in items if w.open),
                "p50_s": percentile(durations, 50), "p99_s": percentile(durations, 99),
                "max_s": max(durations, default=0.0),
                "user_seconds": sum(durations)}  # fmt: skip

    return {
        "users": len(users),
        "user_seconds": seconds(total),
        "wrong_share": (ghost_online + ghost_offline) / total if total else math.nan,
        "ghost_online_share": ghost_online / total if total else math.nan,
        "ghost_offline_share": ghost_offline / total if total else math.nan,
        "wrong_user_seconds": seconds(ghost_online + ghost_offline),
        # Wrong intervals no longer than the margin: the pipeline's delay and upstream's batching.
        "short_wrong_user_seconds": seconds(short),
        "short_wrong_intervals": len(wrong) - len(ghosts),
        "ghosts": stats(ghosts),
        "ghosts_online": stats([w for w in ghosts if w.ghost_online]),
        "ghosts_offline": stats([w for w in ghosts if not w.ghost_online]),
        "corrections": dict(corrections),
        "wrong_corrections": len(wrong_corrections),
        "wrong_correction_examples": wrong_corrections[:10],
        **(
            _with_reach(by_cause(wrong, shown, causes, total, margin_ms, speedup), total, speedup)
            if causes is not None
            else {}
        ),  # fmt: skip
        "_ghost_list": ghosts,
    }


def _with_reach(causes: dict[str, dict[str, Any]], total_ms: int, speedup: float) -> dict[str, Any]:
    """``by_cause``, and the wrong time out of reconciliation's reach (:func:`out_of_reach`)."""
    unreachable = out_of_reach(causes)
    return {
        "by_cause": causes,
        "out_of_reach": {
            "user_seconds": unreachable,
            "share": unreachable * 1000 / speedup / total_ms if total_ms else math.nan,
        },
    }


def out_of_reach(causes: dict[str, dict[str, Any]]) -> float:
    """Wrong user-seconds no reconciliation could have removed, whatever its budget: the pipeline's own delay
    (the product had been told; cause ``pipeline``) and the outage's wrong time until the gateway was healthy
    again (nothing had told the worker anything yet; ``blind_user_seconds`` of cause ``outage``). A checker that
    asked about users while the outage lasted could reach part of the latter, but nothing tells a worker that
    the gateway is down: RAW merely goes quiet."""
    return float(causes["pipeline"]["user_seconds"] + causes["outage"]["blind_user_seconds"])


# --- where the wrong time comes from (pure) ------------------------------------------------------------------

# The causes a wrong interval is attributed to, in the order of precedence when several events are to blame.
CAUSES = ("correction", "outage", "lost", "retried", "late_offline", "pipeline", "other")
_PRECEDENCE = {"outage": 0, "lost": 1, "retried": 2, "late_offline": 3, "pipeline": 4}
# Upstream delivers an event this long after its time only when it is late on purpose (the trace's late offlines,
# 30 s to 5 min); batching (under a second) and a retry after a lost copy (5-6 s) stay below it. Trace seconds.
LATE_AFTER_S = 10.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one delivery (epoch ms): ``how`` is ``"delivered"``, ``"lost"`` or ``"dropped"``; ``at``
    when the gateway answered it 200 (delivered only); ``failed_at`` when its first failed attempt started."""

    how: str
    at: int | None = None
    failed_at: int | None = None


@dataclass(frozen=True, slots=True)
class Fate:
    """How one upstream event reached the product (epoch ms): ``received`` is when the gateway first accepted it
    (None: never), ``due`` when upstream meant to send its first copy, ``failed_at`` when an attempt of a copy
    first failed (None: none did); ``dropped``: a copy failed all its attempts."""

    time: int
    received: int | None
    due: int | None = None
    failed_at: int | None = None
    dropped: bool = False


@dataclass(frozen=True, slots=True)
class Session:
    """One session of the truth (epoch ms) and the fates of the events that opened and ended it."""

    start: int
    end: int | None
    opened: Fate
    ended: Fate | None


@dataclass(frozen=True)
class Causes:
    """What the benchmark knows about how the truth reached the product, for :func:`attribute`.

    ``held``: the epoch ms during which deliveries that fell due were not delivered on time because of the outage
    (the gateway killed until healthy again, plus upstream's pause that the failed attempts started).
    ``late_ms``: an event delivered more than this after its time was late by upstream's doing.
    ``pipeline_ms``: how long the pipeline may take to show what it was told (the run's p99 processing delay,
    at least the margin); a wrong interval told in time and lasting longer is ``other``.
    ``blind``: the epoch ms from the gateway's kill until it was healthy again. Until then nothing (no callback,
    no gap marker) can tell the worker anything: the ``outage`` wrong time in it is out of reconciliation's reach.
    """

    sessions: dict[str, list[Session]]
    held: tuple[int, int] | None
    late_ms: int
    pipeline_ms: int
    blind: tuple[int, int] | None = None


def sessions_from_trace(
    trace: Trace,
    base_ms: int,
    outcomes: dict[int, Outcome],
    accepted: dict[tuple[str, bool], int] | None = None,
) -> dict[str, list[Session]]:
    """Each user's sessions as the truth has them (:class:`~presence.emulator.GroundTruth`: the earliest online
    opens, the earliest end closes), with the fate of those two events: ``outcomes`` by a delivery's index in
    ``trace`` (one not named was delivered when due, at once); ``accepted``: when the gateway first accepted
    each (sessionId, online?) event (RAW's ``received_at``), which is what counts, as an attempt upstream gave
    up on may have reached the product all the same; without it, when upstream's attempt was answered."""
    # (userid, sessionId, opens?) -> event time -> [first answer, first due, first failure, a copy dropped]
    copies: dict[tuple[str, str, bool], dict[int, list[Any]]] = defaultdict(dict)
    for index, delivery in enumerate(trace.deliveries):
        due = base_ms + delivery.at_ms
        outcome = outcomes.get(index, Outcome("delivered", due))
        for event in delivery.events:
            key = (event["userid"], event["sessionId"], str(event["status"]) == "0")
            seen = copies[key].setdefault(int(event["time"]), [None, None, None, False])
            if outcome.how == "delivered" and outcome.at is not None:
                seen[0] = outcome.at if seen[0] is None else min(seen[0], outcome.at)
            seen[1] = due if seen[1] is None else min(seen[1], due)
            if outcome.failed_at is not None:
                seen[2] = outcome.failed_at if seen[2] is None else min(seen[2], outcome.failed_at)
            seen[3] = seen[3] or outcome.how == "dropped"

    def fate(key: tuple[str, str, bool]) -> Fate | None:
        if not copies.get(key):
            return None
        at = min(copies[key])
        answered, due, failed_at, dropped = copies[key][at]
        received = answered if accepted is None else accepted.get((key[1], key[2]))
        return Fate(base_ms + at, received, due, failed_at, dropped)

    sessions: dict[str, list[Session]] = defaultdict(list)
    for userid, session_id, opens in list(copies):
        if not opens:
            continue
        opened, ended = fate((userid, session_id, True)), fate((userid, session_id, False))
        assert opened is not None
        if ended is not None and ended.time <= opened.time:
            continue  # never online (GroundTruth drops it too)
        sessions[userid].append(Session(opened.time, None if ended is None else ended.time, opened, ended))
    for items in sessions.values():
        items.sort(key=lambda s: s.start)
    return dict(sessions)


def _blame(fate: Fate, at: int, causes: Causes) -> str | None:
    """Why the product had not been told of ``fate``'s event by ``at``; None if it had been."""
    if fate.received is not None and fate.received <= at:
        return None
    held = causes.held
    times = (fate.due, fate.failed_at, fate.received)
    if held is not None and any(t is not None and held[0] <= t <= held[1] for t in times):
        return "outage"
    if fate.received is None and not fate.dropped and fate.failed_at is None:
        return "lost"
    if fate.failed_at is not None or fate.received is None:
        return "retried"
    if fate.due is not None and fate.due - fate.time > causes.late_ms:
        return "late_offline"
    return "pipeline"


def attribute(wrong: Wrong, shown: Sequence[Shown], causes: Causes) -> str:
    """The cause of one wrong interval, from the truth change at (or just before) its start: which events the
    product needed to show the truth at the interval's start ``s``, and what had become of them by then.

    - ``correction``: the interval starts with a reconciliation's transition (it set a wrong status).
    - Shown online, really offline: the events to blame are the ends of the user's sessions that had ended by
      ``s`` and that the product may still have held open (the session's online was received, or its end
      happened, after the product last showed the user offline). Shown offline, really online: the onlines of
      the sessions open at ``s``.
    - Each such event the gateway had not accepted by ``s`` (accepted later, or never) is blamed on: ``outage``
      when it fell due, an attempt of it failed, or it was accepted, in the outage (the gateway killed until
      healthy again, plus upstream's pause after it; deliveries held back meanwhile go out after it, in a
      burst); ``lost`` when every copy was lost outright; ``retried`` when attempts of it failed outside the
      outage (the gateway too slow to answer within upstream's 5 s, or refusing; dropped after three);
      ``late_offline`` when upstream sent it more than :data:`LATE_AFTER_S` trace seconds after its time (in the
      trace, only the late offlines are); ``pipeline`` when it was sent on time and accepted just after ``s``
      (upstream's batching). With several, the first of that order wins.
    - If the product had been told of all of them (or none is to blame), or the only blame is ``pipeline``, the
      interval is ``pipeline`` when no longer than ``causes.pipeline_ms`` (told, but not shown yet) and
      ``other`` beyond (the stream held a status it had been told otherwise: worth a look).
    """
    s = wrong.start
    if any(c.at == s and c.reconcile for c in shown):
        return "correction"
    sessions = causes.sessions.get(wrong.userid, [])
    blamed: list[str] = []
    if wrong.ghost_online:
        since = max((c.at for c in shown if c.at <= s and not c.online), default=-1)
        for session in sessions:
            if session.end is None or session.end > s or session.ended is None:
                continue
            received = session.opened.received
            # Never told of its online, the product never held it open; shown offline since it ended and its
            # online was received, the product had let it go.
            held = received is not None and (session.end > since or received > since)
            if held and (blame := _blame(session.ended, s, causes)) is not None:
                blamed.append(blame)
    else:
        for session in sessions:
            if session.start <= s and (session.end is None or s < session.end):
                if (blame := _blame(session.opened, s, causes)) is not None:
                    blamed.append(blame)
    cause = min(blamed, key=_PRECEDENCE.__getitem__, default="pipeline")
    if cause == "pipeline" and wrong.duration > causes.pipeline_ms:
        return "other"
    return cause


def by_cause(
    wrong: Sequence[Wrong], shown: dict[str, list[Shown]], causes: Causes, total_ms: int, margin_ms: int,
    speedup: float,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Wrong user-time (share of all user-time, trace seconds) and ghosts (longer than the margin) per cause."""
    result: dict[str, dict[str, Any]] = {}
    for cause in CAUSES:
        result[cause] = {"share": 0.0, "user_seconds": 0.0, "ghost_online_user_seconds": 0.0,
                         "ghost_offline_user_seconds": 0.0, "intervals": 0, "ghosts": 0, "ghosts_online": 0,
                         "ghosts_offline": 0, "max_ghost_s": 0.0, "blind_user_seconds": 0.0}  # fmt: skip
    others: list[Wrong] = []
    for w in wrong:
        cause = attribute(w, shown.get(w.userid, []), causes)
        entry = result[cause]
        seconds = w.duration * speedup / 1000
        entry["user_seconds"] += seconds
        if causes.blind is not None:
            overlap = min(w.end, causes.blind[1]) - max(w.start, causes.blind[0])
            entry["blind_user_seconds"] += max(0, overlap) * speedup / 1000
        entry["ghost_online_user_seconds" if w.ghost_online else "ghost_offline_user_seconds"] += seconds
        entry["intervals"] += 1
        if w.duration > margin_ms:
            entry["ghosts"] += 1
            entry["ghosts_online" if w.ghost_online else "ghosts_offline"] += 1
            entry["max_ghost_s"] = max(entry["max_ghost_s"], seconds)
            if cause == "other":
                others.append(w)
    for entry in result.values():
        entry["share"] = entry["user_seconds"] * 1000 / speedup / total_ms if total_ms else math.nan
    # The longest "other" ghosts, with what the product showed and the sessions it was told of around them: a
    # status held although the product had been told otherwise is the stream's doing, to be looked at.
    longest = sorted(others, key=lambda w: -w.duration)[:EXAMPLES]
    result["other"]["examples"] = [_example(w, shown.get(w.userid, []), causes, speedup) for w in longest]
    return result


# How many of the longest "other" ghosts the result describes.
EXAMPLES = 5
# How far before a ghost its example looks (trace seconds).
_EXAMPLE_BEFORE_S = 600


def _example(wrong: Wrong, shown: Sequence[Shown], causes: Causes, speedup: float) -> dict[str, Any]:
    """One ghost, its times in trace seconds from its start: the changes shown and the user's sessions (truth)
    from ``_EXAMPLE_BEFORE_S`` before it to its end, each session with when the gateway accepted its online and
    its end (None: never)."""

    def offset(ms: int | None) -> float | None:
        return None if ms is None else round((ms - wrong.start) * speedup / 1000, 3)

    since = wrong.start - int(_EXAMPLE_BEFORE_S * 1000 / speedup)
    return {
        "userid": wrong.userid,
        "ghost_online": wrong.ghost_online,
        "duration_s": round(wrong.duration * speedup / 1000, 3),
        "shown": [[offset(c.at), c.online, c.reconcile] for c in shown if since <= c.at <= wrong.end],
        "sessions": [
            {"start": offset(x.start), "end": offset(x.end), "online_accepted": offset(x.opened.received),
             "end_accepted": None if x.ended is None else offset(x.ended.received)}
            for x in causes.sessions.get(wrong.userid, [])
            if x.start <= wrong.end and (x.end is None or x.end >= since)
        ],
    }  # fmt: skip


def max_in_window(times: Sequence[float], width: float) -> int:
    """The most of ``times`` (seconds) within any window of ``width`` seconds."""
    ordered = sorted(times)
    most, first = 0, 0
    for last, moment in enumerate(ordered):
        while moment - ordered[first] >= width:
            first += 1
        most = max(most, last - first + 1)
    return most


# --- one mode ------------------------------------------------------------------------------------------------


class OwnLoop:
    """An event loop in a thread of its own, for a server whose timing must not depend on the benchmark's loop."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    async def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on this loop and wait for it from the caller's loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self.loop))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


def _metrics(port: int) -> str:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return ""


def _reconcile_samples(text: str) -> dict[str, float]:
    """The worker's ``presence_worker_reconcile_*`` samples that are not zero."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("presence_worker_reconcile_") and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            metric = name.split("{", 1)[0]
            if metric.endswith(("_created", "_bucket")):
                continue  # creation times and histogram buckets: the count and sum say enough here
            with contextlib.suppress(ValueError):
                if float(value) != 0:
                    samples[name] = float(value)
    return samples


def processing_delays(
    raw: Iterable[dict[str, Any]], transitions: Iterable[dict[str, Any]]
) -> list[tuple[int, float]]:
    """(receipt ms, seconds) from the gateway's receipt of an event (``received_at`` on RAW, the first copy) to
    the ``emitted_at`` of the transition it caused: what the worker's lag adds to every status change."""
    received: dict[tuple[str, str], int] = {}
    for record in raw:
        if record.get("kind") is None and isinstance(record.get("received_at"), int):
            key = (record["sessionId"], STATUS_BY_CODE.get(record["status"], ""))
            received[key] = min(record["received_at"], received.get(key, record["received_at"]))
    delays = []
    for t in transitions:
        at = received.get((t["cause"]["sessionId"], t["cause"]["event"]))
        if at is not None:
            delays.append((at, (t["emitted_at"] - at) / 1000))
    return sorted(delays)


async def _read_transitions(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[dict[str, Any]] = []

        async def behind() -> bool:
            return any([await consumer.position(tp) < ends[tp] for tp in tps])

        while await behind():
            batch = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for records in batch.values():
                out.extend(orjson.loads(r.value) for r in records if r.value is not None)
        return out
    finally:
        await consumer.stop()


class DeliveryRecorder:
    """What became of each delivery of a trace (``outcomes``, by index in the trace: when the gateway answered it,
    when an attempt first failed, or that it was lost or dropped), for the attribution of wrong time; a
    :class:`~presence.emulator.DeliveryObserver` of the run's sender."""

    def __init__(self) -> None:
        self.outcomes: dict[int, Outcome] = {}
        self._failed_at: dict[int, int] = {}

    def attempted(self, index: int, started: float, finished: float, ok: bool) -> None:
        if ok:
            self.outcomes[index] = Outcome("delivered", int(finished * 1000), self._failed_at.get(index))
        else:
            self._failed_at.setdefault(index, int(started * 1000))

    def gave_up(self, index: int, how: str) -> None:
        self.outcomes[index] = Outcome(how, None, self._failed_at.get(index))


class Mode:
    """One run of the trace through a gateway and a worker of its own, reconciliation off or on."""

    def __init__(self, ws: Workspace, size: Size, trace: Trace, truth: GroundTruth, mode: str) -> None:
        self.ws, self.size, self.trace, self.truth, self.mode = ws, size, trace, truth, mode
        self.app_id = f"bench-ghosts-{mode}"
        self.topics = {"topic_raw": f"bench.ghosts.{mode}.raw", "topic_dlq": f"bench.ghosts.{mode}.dlq",
                       "topic_transitions": f"bench.ghosts.{mode}.transitions",
                       "topic_state": f"bench.ghosts.{mode}.state"}  # fmt: skip
        self.outage: dict[str, float] = {}
        self.skipped: str | None = None
        self.services: list[Service] = []
        self.wired = False
        self.result: dict[str, Any] = {}

    def _env(self, values: dict[str, Any]) -> dict[str, str]:
        return {f"PRESENCE_{k.upper()}": str(v) for k, v in values.items()}

    def worker_env(self, api_url: str) -> dict[str, str]:
        s = self.size
        return self._env({
            **self.topics,
            "app_key": APP_KEY, "app_secret": APP_SECRET,
            "reconcile_enabled": "true" if self.mode == "on" else "false",
            "reconcile_api_urls": api_url,
            "reconcile_budget_per_second": s.budget * s.speedup,
            "reconcile_max_silence_seconds": s.wall(s.max_silence),
            "reconcile_recheck_interval_seconds": s.wall(s.recheck_interval),
            "reconcile_margin_seconds": s.wall(s.margin),
            "reconcile_gap_lookback_seconds": s.wall(s.gap_lookback),
            # A timeout on one request is not compressed: it bounds a process's own latency, which does not.
            "reconcile_timeout_seconds": 5.0,
            "reconcile_backoff_seconds": s.wall(0.5),
            "worker_ended_session_retention_seconds": s.wall(s.ended_session_retention),
        })  # fmt: skip

    def gateway_env(self, port: int) -> dict[str, str]:
        values = _settings(self.ws, "ghosts")
        values.update(self.topics)
        values.update({"app_key": APP_KEY, "app_secret": APP_SECRET, "gateway_host": "127.0.0.1",
                       "gateway_port": port, "gateway_spool_dir": self.ws.path(f"spool-{self.mode}")})  # fmt: skip
        return self._env(values)

    async def prepare(self, stack: contextlib.AsyncExitStack) -> None:
        """Topics, the API emulator, the gateway, then the worker; ``skipped`` says why this mode cannot run."""
        size, ws = self.size, self.ws
        settings = WorkerSettings(**_settings(ws, "ghosts", worker_app_id=self.app_id, **self.topics))
        await ensure_topics(settings, extra=worker_topics(settings))
        self.api = ApiEmulator(self.truth, app_key=APP_KEY, secret=APP_SECRET,
                               rate_limit=max(1, round(size.rate_limit * size.speedup)))  # fmt: skip
        # The API is served from its own thread and loop: it stamps each call's arrival (the budget's measure)
        # when the request comes in, not when this loop, busy sending both modes' callbacks, gets to it.
        api_loop = OwnLoop(f"api-{self.mode}")
        stack.callback(api_loop.close)
        api_url = await api_loop.run(self.api.start())
        stack.push_async_callback(lambda: api_loop.run(self.api.stop()))
        self.port = port = free_port()
        self.worker = faust_worker(ws, ws.path(f"state-{self.mode}"), app_id=self.app_id,
                                   system=f"ghosts-{self.mode}", **self.worker_env(api_url))  # fmt: skip
        self.gateway = Service(f"gateway-{self.mode}", python_module("presence.cli", "gateway"),
                               self.gateway_env(port), ws.root)  # fmt: skip
        self.web_port = web_port = self.worker.web_port  # type: ignore[attr-defined]
        started = time.monotonic()
        self.services = [self.gateway, self.worker]
        self.gateway.start()
        self.worker.start()
        await asyncio.gather(
            asyncio.to_thread(wait_until, lambda: self.gateway.check() or _healthy(f"http://127.0.0.1:{port}"),
                              60, "the gateway"),
            asyncio.to_thread(wait_until, lambda: self.worker.check() or ready(web_port), 120,
                              "the worker to be ready"),
        )  # fmt: skip
        say(f"{self.mode}: gateway and worker ready in {time.monotonic() - started:.1f} s")
        self.wired = "presence_worker_reconcile_" in await asyncio.to_thread(_metrics, web_port)
        if self.mode == "on" and not self.wired:
            self.skipped = ("the worker does not run reconciliation yet (no presence_worker_reconcile_* metrics "
                            "on /metrics)")  # fmt: skip
            say(f"on: skipped: {self.skipped}")

    async def stop(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(service.stop) for service in self.services))

    async def traffic(self, start: float) -> None:
        self.result = await self._traffic(self.api, self.gateway, self.port, self.worker, start)
        self.result["reconciliation_wired"] = self.wired
        self.result["worker_reconcile_metrics"] = _reconcile_samples(
            await asyncio.to_thread(_metrics, self.web_port)
        )

    async def finish(self) -> dict[str, Any]:
        """Read TRANSITIONS and score them against the truth (the processes are stopped by now)."""
        if self.skipped:
            return {"skipped": self.skipped}
        size, result = self.size, self.result
        transitions = await _read_transitions(self.ws.bootstrap, self.topics["topic_transitions"])
        result["transitions"] = len(transitions)
        base_ms = result.pop("_base_ms")
        raw = await _read_transitions(self.ws.bootstrap, self.topics["topic_raw"])
        timed = processing_delays(raw, transitions)
        delays = [d for _, d in timed]
        # Wall-clock seconds: the processes' latency is not compressed; in trace time it weighs speedup times more.
        result["processing_delay_wall_s"] = {"p50": percentile(delays, 50), "p99": percentile(delays, 99),
                                             "max": max(delays, default=math.nan)}  # fmt: skip
        # By tenth of the trace (by receipt): where the worker fell behind.
        tenth_ms = size.wall(size.trace_seconds) * 100
        result["processing_delay_p99_wall_s_by_tenth"] = [
            percentile(
                [d for at, d in timed if base_ms + n * tenth_ms <= at < base_ms + (n + 1) * tenth_ms], 99
            )
            for n in range(10)
        ]
        window = (base_ms, base_ms + int(size.wall(size.trace_seconds) * 1000))
        margin_ms = int(size.wall(size.margin) * 1000)
        kill, healthy = self.outage.get("killed_at_ms"), self.outage.get("healthy_at_ms")
        # Deliveries due from the kill until upstream's pause (started by the failed attempts) ended after the
        # gateway was healthy again were held back by the outage.
        held = None if kill is None or healthy is None else (int(kill), int(healthy + size.wall(60.0) * 1000))
        p99 = result["processing_delay_wall_s"]["p99"]
        pipeline_ms = margin_ms if math.isnan(p99) else max(margin_ms, int(p99 * 1000))
        accepted: dict[tuple[str, bool], int] = {}
        for record in raw:
            if record.get("kind") is None and isinstance(record.get("received_at"), int):
                key = (record["sessionId"], record["status"] == 0)
                accepted[key] = min(record["received_at"], accepted.get(key, record["received_at"]))
        sessions = sessions_from_trace(self.trace, base_ms, self.recorder.outcomes, accepted)
        blind = None if kill is None or healthy is None else (int(kill), int(healthy))
        causes = Causes(sessions, held, late_ms=int(size.wall(LATE_AFTER_S) * 1000), pipeline_ms=pipeline_ms,
                        blind=blind)  # fmt: skip
        outcomes = self.recorder.outcomes.values()
        gave_up = Counter(o.how for o in outcomes)
        result["attribution"] = {
            "late_after_s": LATE_AFTER_S,
            "pipeline_bound_s": pipeline_ms * size.speedup / 1000,
            "held_back_s": None
            if held is None
            else [round((t - base_ms) * size.speedup / 1000, 1) for t in held],
            "deliveries_lost": gave_up["lost"],
            "deliveries_dropped": gave_up["dropped"],
            "deliveries_delivered_after_a_failed_attempt": sum(
                1 for o in outcomes if o.how == "delivered" and o.failed_at is not None
            ),
        }
        scored = score(
            self.truth, base_ms, shown_changes(transitions), window, margin_ms, size.speedup, causes
        )
        ghosts: list[Wrong] = scored.pop("_ghost_list")
        if kill is not None and healthy is not None:
            during = [g for g in ghosts if kill <= g.start <= healthy]
            scored["outage_ghosts"] = {
                "count": len(during),
                "max_s": max((g.duration * size.speedup / 1000 for g in during), default=0.0),
                "open_at_end": sum(1 for g in during if g.open),
            }
        result["score"] = scored
        return result

    async def _traffic(
        self, api: ApiEmulator, gateway: Service, port: int, worker: Service, start: float
    ) -> dict[str, Any]:
        size = self.size
        policy = CallbackPolicy(attempt_timeout=5.0, failure_window=size.wall(10.0), pause=size.wall(60.0),
                                loss_rate=size.loss_rate, seed=size.seed)  # fmt: skip
        target = Target(f"http://127.0.0.1:{port}{WEBHOOK_PATH}", APP_KEY, APP_SECRET)
        self.recorder = DeliveryRecorder()
        sender = CallbackSender(self.trace, target, policy=policy, observer=self.recorder)
        base_ms = int(start * 1000)
        api.base_ms = base_ms
        load_at_start = [round(x, 2) for x in os.getloadavg()]
        say(f"{self.mode}: sending {len(self.trace.deliveries):,} deliveries over "
            f"{size.wall(size.trace_seconds):.0f} s ({size.trace_seconds / 60:.0f} trace minutes)")  # fmt: skip
        meter = CpuMeter({"worker": worker.pid})
        meter.start()
        sending = asyncio.create_task(sender.run(start))
        outage = asyncio.create_task(self._outage(gateway, port, start))
        progress = asyncio.create_task(self._progress(sender, api, start))
        try:
            stats = await sending
            await outage
        finally:
            progress.cancel()
            outage.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress
            with contextlib.suppress(asyncio.CancelledError):
                await outage
        sent_seconds = time.time() - start
        meter.stop()
        drain_started = time.monotonic()
        # Everything on RAW when the trace ended processed (observations included), so TRANSITIONS holds every
        # answer to the trace. RAW goes on growing while reconciliation re-checks silent users.
        offsets = Offsets(self.ws.bootstrap)
        raw = self.topics["topic_raw"]
        try:
            ends = await asyncio.to_thread(offsets.end_each, raw, PARTITIONS)

            def drained() -> bool:
                worker.check()
                committed = offsets.committed_each(self.app_id, raw, PARTITIONS)
                return all(c >= e for c, e in zip(committed, ends, strict=True))

            await asyncio.to_thread(wait_until, drained, 300, f"the {self.mode} worker to process all of RAW",
                                    interval=0.5)  # fmt: skip
        finally:
            offsets.close()
        say(
            f"{self.mode}: the worker processed all of RAW {time.monotonic() - drain_started:.1f} s after the trace"
        )
        calls = list(api.calls)
        return {"_base_ms": base_ms, "seconds": round(sent_seconds, 1),
                "load_average_at_start": load_at_start,
                "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
                "worker_cores": meter.cores()["worker"],
                "callbacks": self._callbacks(stats),
                "outage": {k: v for k, v in self.outage.items() if not k.endswith("_ms")},
                "api": self._api(calls, start)}  # fmt: skip

    async def _outage(self, gateway: Service, port: int, start: float) -> None:
        """Kill the gateway at the outage's start; start it again at its end."""
        size = self.size
        await asyncio.sleep(max(0.0, start + size.wall(size.outage_at) - time.time()))
        assert gateway.process is not None
        killed = time.time()
        gateway.process.send_signal(signal.SIGKILL)
        gateway.process.wait()
        say(f"{self.mode}: gateway killed for {size.outage_seconds:.0f} trace seconds")
        # Started again when the outage is over: down for that long plus the gateway's start-up (reported).
        await asyncio.sleep(max(0.0, killed + size.wall(size.outage_seconds) - time.time()))
        gateway.start()
        await asyncio.to_thread(wait_until, lambda: gateway.check() or _healthy(f"http://127.0.0.1:{port}"), 60,
                                "the gateway to come back")  # fmt: skip
        healthy = time.time()
        say(f"{self.mode}: gateway back after {(healthy - killed) * size.speedup:.0f} trace seconds")
        self.outage = {"killed_at_ms": killed * 1000, "healthy_at_ms": healthy * 1000,
                       "at_s": round((killed - start) * size.speedup, 1),
                       "seconds": round((healthy - killed) * size.speedup, 1)}  # fmt: skip

    async def _progress(self, sender: CallbackSender, api: ApiEmulator, start: float) -> None:
        size = self.size
        step = size.wall(size.trace_seconds) / 10
        for tenth in range(1, 11):
            await asyncio.sleep(max(0.0, start + tenth * step - time.time()))
            s = sender.stats
            say(f"{self.mode}: {tenth * 10}% of the trace: {s.delivered:,} callbacks delivered, {s.lost:,} lost, "
                f"{s.dropped:,} dropped, {sender.pause_rule.pauses} pauses; {len(api.calls):,} API calls")  # fmt: skip

    def _callbacks(self, stats: Any) -> dict[str, Any]:
        missing = Counter(str(e["status"]) for e in stats.missing_events)
        return {"deliveries": stats.deliveries, "delivered": stats.delivered, "lost": stats.lost,
                "dropped": stats.dropped, "attempts": stats.attempts, "failed_attempts": stats.failed_attempts,
                "pauses": stats.pauses,
                "missing_events": {"online": missing.get("0", 0), "offline": missing.get("1", 0),
                                   "logout": missing.get("2", 0)}}  # fmt: skip

    def _api(self, calls: list[tuple[float, str, int]], start: float) -> dict[str, Any]:
        size = self.size
        end = start + size.wall(size.trace_seconds)
        in_trace = [c for c in calls if start <= c[0] < end]
        statuses = Counter(str(status) for _, _, status in calls)
        quiet_end = start + size.wall(min(size.max_silence, size.outage_at))
        budget_wall = size.budget * size.speedup
        times = [t for t, _, _ in calls]
        peak = max_in_window(times, 1.0)
        # Over ten seconds as well: the API's loop has a thread of its own, but on a loaded machine that thread
        # may still wait for the CPU (and this process's GIL) before it stamps an arrival.
        peak_10 = max_in_window(times, 10.0)
        return {
            "calls": len(calls),
            "statuses": dict(statuses),
            "calls_during_trace": len(in_trace),
            "calls_per_second": len(in_trace) / size.trace_seconds,
            "budget_per_second": size.budget,
            "used_share_of_budget": len(in_trace) / size.trace_seconds / size.budget,
            # Peaks in one wall-clock second against the budget as set for the run (per wall second): the
            # worker's token bucket holds a tenth of a wall second's calls whatever the compression.
            "peak_calls_in_one_wall_second": peak,
            "budget_per_wall_second": budget_wall,
            "peak_share_of_budget": peak / budget_wall,
            "peak_calls_in_ten_wall_seconds": peak_10,
            "peak_ten_seconds_share_of_budget": peak_10 / (10 * budget_wall),
            "calls_before_anyone_could_be_silent": sum(1 for c in calls if start <= c[0] < quiet_end),
        }


# --- the benchmark -------------------------------------------------------------------------------------------


def targets(off: dict[str, Any], on: dict[str, Any], size: Size) -> dict[str, dict[str, Any]]:
    """The issue's targets, computed (never asserted)."""
    if "score" not in on or "score" not in off:
        return {name: {"target": wanted, "value": None, "met": None} for name, wanted in (
            ("wrong_time_on_vs_off", "<= 0.05 (goal <= 0.01)"),
            ("longest_ghost_on_s", f"<= {size.max_silence + size.recheck_interval:.0f}"),
            ("outage_ghosts_cleared_s", "<= 120 (goal)"),
            ("api_peak_vs_budget", "<= 1"),
            ("api_calls_while_nothing_to_check", "== 0"),
            ("wrong_corrections", "== 0"))}  # fmt: skip
    ratio = (
        on["score"]["wrong_share"] / off["score"]["wrong_share"] if off["score"]["wrong_share"] else math.nan
    )
    longest = on["score"]["ghosts"]["max_s"]
    bound = size.max_silence + size.recheck_interval
    outage = on["score"].get("outage_ghosts", {}).get("max_s", math.nan)
    peak = on["api"]["peak_share_of_budget"]
    quiet = on["api"]["calls_before_anyone_could_be_silent"]
    wrong = on["score"]["wrong_corrections"]
    return {
        "wrong_time_on_vs_off": {"target": "<= 0.05 (goal <= 0.01)", "value": round(ratio, 4),
                                 "met": ratio <= 0.05},
        "longest_ghost_on_s": {"target": f"<= {bound:.0f}", "value": round(longest, 1), "met": longest <= bound},
        "outage_ghosts_cleared_s": {"target": "<= 120 (goal)", "value": round(outage, 1), "met": outage <= 120},
        "api_peak_vs_budget": {"target": "<= 1", "value": round(peak, 3), "met": peak <= 1},
        "api_calls_while_nothing_to_check": {"target": "== 0", "value": quiet, "met": quiet == 0},
        "wrong_corrections": {"target": "== 0", "value": wrong, "met": wrong == 0},
    }  # fmt: skip


# Added to the issue's targets: on vs off for the wrong time whose cause reconciliation is there to reach (a
# callback lost, or dropped or held back by the outage), all of it and the ghost-online part alone (R2's silence
# checks and the gap checks look at users shown online; a user shown offline is not doubted); and on vs off for
# the wrong time within reconciliation's reach (:func:`out_of_reach`), with the best on vs off any reconciliation
# could reach in this run: the off run's wrong time out of reach, over all of it.
_BY_CAUSE_TARGETS = (
    ("lost_and_outage_wrong_time_on_vs_off", "<= 0.05 (added)"),
    ("lost_and_outage_ghost_online_on_vs_off", "<= 0.05 (added)"),
    ("within_reach_wrong_time_on_vs_off", "<= 0.05 (added)"),
)


def targets_by_cause(off: dict[str, Any], on: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Targets added to the issue's (reported apart, under ``targets_by_cause``), computed, never asserted."""
    off, on = off.get("score", {}), on.get("score", {})
    if "by_cause" not in off or "by_cause" not in on:
        return {name: {"target": wanted, "value": None, "met": None} for name, wanted in _BY_CAUSE_TARGETS}

    def seconds(scored: dict[str, Any], key: str) -> float:
        return float(sum(scored["by_cause"][cause][key] for cause in ("lost", "outage")))

    result = {}
    for (name, wanted), key in zip(
        _BY_CAUSE_TARGETS[:2], ("user_seconds", "ghost_online_user_seconds"), strict=True
    ):
        before = seconds(off, key)
        ratio = seconds(on, key) / before if before else math.nan
        result[name] = {"target": wanted, "value": round(ratio, 4), "met": ratio <= 0.05}
    if "out_of_reach" in off and "out_of_reach" in on:
        reachable_off = off["wrong_user_seconds"] - off["out_of_reach"]["user_seconds"]
        reachable_on = on["wrong_user_seconds"] - on["out_of_reach"]["user_seconds"]
        ratio = reachable_on / reachable_off if reachable_off > 0 else math.nan
        name, wanted = _BY_CAUSE_TARGETS[2]
        result[name] = {"target": wanted, "value": round(ratio, 4), "met": ratio <= 0.05}
        best = (
            off["out_of_reach"]["user_seconds"] / off["wrong_user_seconds"]
            if off["wrong_user_seconds"]
            else 0
        )
        # Not a target: the floor under the issue's "wrong time on vs off" in this run.
        result["best_possible_wrong_time_on_vs_off"] = {
            "target": "(the floor: off's wrong time out of reach / off's wrong time)",
            "value": round(best, 4),
            "met": None,
        }
    return result


async def _run_modes(ws: Workspace, size: Size, trace: Trace, truth: GroundTruth,
                     modes: Sequence[str]) -> dict[str, Any]:  # fmt: skip
    """Every mode at once, on the same clock: the same trace from the same moment, the outage at the same
    time, and whatever else loads the machine falls on all of them alike."""
    runs = [Mode(ws, size, trace, truth, mode) for mode in modes]
    async with contextlib.AsyncExitStack() as stack:

        async def stop_all() -> None:
            await asyncio.gather(*(m.stop() for m in runs))

        stack.push_async_callback(stop_all)
        await asyncio.gather(*(m.prepare(stack) for m in runs))
        start = time.time() + 1.0
        await asyncio.gather(*(m.traffic(start) for m in runs if not m.skipped))
    return {m.mode: await m.finish() for m in runs}


def run(smoke: bool = False, out_dir: Path | None = None, full: bool = False,
        modes: Sequence[str] = MODES, budget_factor: float = 1.0) -> dict[str, Any]:  # fmt: skip
    """Run the benchmark; ``budget_factor`` multiplies the budget and RongCloud's limit (results then go to
    ``ghosts[.full].budget<factor>x.json``)."""
    size = SIZES["smoke" if smoke else "full" if full else "default"]
    if budget_factor != 1.0:
        size = replace(size, budget_factor=budget_factor)
    say(
        f"ghosts ({size.name}): {size.users:,} users, {size.trace_seconds / 60:.0f} trace minutes at "
        f"{size.speedup:g}x, {size.loss_rate:.0%} of callbacks lost, a {size.outage_seconds:.0f} s gateway outage"
    )
    started = time.monotonic()
    trace = make_trace(size)
    truth_trace = compress(trace, size.speedup)
    truth = GroundTruth.from_trace(truth_trace)
    say(f"trace: {trace.event_count:,} events in {len(trace.deliveries):,} deliveries "
        f"({time.monotonic() - started:.1f} s to generate)")  # fmt: skip
    # BENCH_KEEP=1 keeps the workspace (the processes' logs) for a look afterwards.
    with workspace("ghosts", heap="1g", keep=bool(os.environ.get("BENCH_KEEP"))) as ws:
        results = asyncio.run(_run_modes(ws, size, truth_trace, truth, modes))
    payload: dict[str, Any] = {
        "settings": {**asdict(size), "budget_per_second": size.budget, "rate_limit_per_second": size.rate_limit,
                     "events": trace.event_count, "deliveries": len(trace.deliveries),
                     "scenarios": dict(trace.scenarios), "partitions": PARTITIONS,
                     "note": "durations in trace seconds; the run's wall clock is speedup times faster"},
        "modes": results,
        "targets": targets(results.get("off", {}), results.get("on", {}), size),
        "targets_by_cause": targets_by_cause(results.get("off", {}), results.get("on", {})),
    }  # fmt: skip
    variants = ["full"] if full else []
    if budget_factor != 1.0:
        variants.append(f"budget{budget_factor:g}x")
    path = write_results("ghosts", smoke, payload, out_dir, variant=".".join(variants) or None)
    print(render(payload))
    say(f"results in {path}")
    return payload


def render(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    modes = {name: m for name, m in payload["modes"].items() if "score" in m}
    rows = []
    for name, m in modes.items():
        sc = m["score"]
        rows.append([name, f"{sc['wrong_share']:.3%}", f"{sc['ghost_online_share']:.3%}",
                     f"{sc['ghost_offline_share']:.3%}", sc["ghosts"]["count"], sc["ghosts"]["open_at_end"],
                     sc["ghosts"]["p50_s"], sc["ghosts"]["p99_s"], sc["ghosts"]["max_s"],
                     sum(sc["corrections"].values()), sc["wrong_corrections"]])  # fmt: skip
    title = (f"Ghosts: {s['users']:,} users, {s['trace_seconds'] / 60:.0f} minutes ({s['speedup']:g}x compressed), "
             f"{s['loss_rate']:.0%} callbacks lost, {s['outage_seconds']:.0f} s gateway outage; "
             f"max_silence {s['max_silence']:.0f} s, recheck {s['recheck_interval']:.0f} s, "
             f"margin {s['margin']:.0f} s")  # fmt: skip
    parts = [
        table(
            title,
            [
                "reconciliation",
                "wrong time",
                "ghost online",
                "ghost offline",
                "ghosts > margin",
                "open at end",
                "p50 s",
                "p99 s",
                "max s",
                "corrections",
                "wrong corrections",
            ],
            rows,
        )
    ]
    api_rows = [[name, m["api"]["calls"], m["api"]["calls_per_second"], m["api"]["budget_per_second"],
                 m["api"]["used_share_of_budget"], m["api"]["peak_share_of_budget"],
                 m["api"]["peak_ten_seconds_share_of_budget"],
                 m["api"]["statuses"].get("429", 0), m["api"]["calls_before_anyone_could_be_silent"],
                 m["callbacks"]["lost"], m["callbacks"]["dropped"], m["callbacks"]["pauses"],
                 m.get("outage", {}).get("seconds")]
                for name, m in modes.items()]  # fmt: skip
    parts.append(
        table(
            "API calls and callbacks",
            [
                "reconciliation",
                "API calls",
                "calls/s",
                "budget/s",
                "used",
                "peak 1 s/budget",
                "peak 10 s/budget",
                "429s",
                "calls before max_silence",
                "callbacks lost",
                "dropped",
                "pauses",
                "outage s",
            ],
            api_rows,
        )
    )
    pipeline_rows = [[name, m["transitions"], m["worker_cores"], m["processing_delay_wall_s"]["p50"],
                      m["processing_delay_wall_s"]["p99"], m["processing_delay_wall_s"]["max"],
                      m["load_average_at_start"][0], m["load_average_at_end"][0]]
                     for name, m in modes.items()]  # fmt: skip
    parts.append(table("Pipeline (wall clock: gateway receipt -> emitted_at; load average of the shared machine)",
                       ["reconciliation", "transitions", "worker cores", "delay p50 s", "delay p99 s",
                        "delay max s", "load at start", "load at end"], pipeline_rows))  # fmt: skip
    cause_rows = [
        [name, cause, f"{c['share']:.3%}", c["user_seconds"], c["ghost_online_user_seconds"],
         c["ghost_offline_user_seconds"], c["ghosts"], c["ghosts_online"], c["ghosts_offline"], c["max_ghost_s"]]
        for name, m in modes.items() if "by_cause" in m["score"]
        for cause, c in m["score"]["by_cause"].items()
    ]  # fmt: skip
    cause_rows += [
        [name, "(out of reach)", f"{m['score']['out_of_reach']['share']:.3%}",
         m["score"]["out_of_reach"]["user_seconds"], "", "", "", "", "", ""]
        for name, m in modes.items() if "out_of_reach" in m["score"]
    ]  # fmt: skip
    if cause_rows:
        parts.append(table("Wrong time by cause (share of all user-time; user-seconds, trace time; ghosts > margin)",
                           ["reconciliation", "cause", "wrong time", "user-s", "ghost online user-s",
                            "ghost offline user-s", "ghosts", "online", "offline", "max s"], cause_rows))  # fmt: skip
    skipped = [f"- {name}: skipped: {m['skipped']}" for name, m in payload["modes"].items() if "skipped" in m]
    if skipped:
        parts.append("\n" + "\n".join(skipped))
    parts.append(
        table(
            "Targets",
            ["target", "wanted", "value", "met"],
            [[n, t["target"], t["value"], t["met"]] for n, t in payload["targets"].items()],
        )
    )
    if payload.get("targets_by_cause"):
        parts.append(table("Targets by cause (added; the wrong time reconciliation is there to reach)",
                           ["target", "wanted", "value", "met"],
                           [[n, t["target"], t["value"], t["met"]]
                            for n, t in payload["targets_by_cause"].items()]))  # fmt: skip
    return "\n".join(parts)
