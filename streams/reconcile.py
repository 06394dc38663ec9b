"""Which users to ask RongCloud about, and in what order: the checker's queue (pure: no I/O, no clock).

The worker doubts a user's status for four reasons, most urgent first (``core.contract.OBSERVATION_SOURCES``):

- ``on_demand``: someone asked (``presence reconcile``, the query API);
- ``suspect``: an event arrived too late to be judged (R5);
- ``intake_gap``: the gateway may have lost callbacks in a window (its marker on RAW);
- ``age``: the user is shown online but nothing was heard of them for ``max_silence``.

:class:`CheckQueue` holds at most one pending check per user (a more urgent reason raises it), skips users
whose last check is recent enough for the reason at hand, caps what one intake gap may queue, bounds its size
by evicting the least urgent entry, and retries a failed check a few times. The checker pops from it at the pace
of its budget, most urgent first with one exception: an ``age`` check that has waited ``age_patience_ms`` goes
before ``intake_gap`` checks (never before ``suspect`` or ``on_demand``), so a gap's backlog, drained for minutes,
cannot hold a ghost past ``max_silence`` and one recheck interval. Times are epoch milliseconds, passed in by the
caller.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Final, Protocol

from core.contract import OBSERVATION_SOURCES, GapMarker, ObservationSource

URGENCY: Final[dict[ObservationSource, int]] = {source: n for n, source in enumerate(OBSERVATION_SOURCES)}
# An overdue age check may go before checks of this urgency or less urgent ones, never before more urgent ones.
_AGE_MAY_PASS: Final = URGENCY["intake_gap"]
_AGE: Final = URGENCY["age"]


@dataclass(frozen=True, slots=True)
class Check:
    """One pending check of one user. ``rank`` orders checks of the same urgency (lower first)."""

    userid: str
    source: ObservationSource
    rank: int = 0
    queued_at: int = 0
    attempts: int = 0
    gap: str | None = None
    # A check sent at or after this moment satisfies this one.
    fresh_after: int = 0

    @property
    def key(self) -> tuple[int, int]:
        return (URGENCY[self.source], self.rank)


class Offer(StrEnum):
    """What :meth:`CheckQueue.offer` did (closed set: a metric label)."""

    QUEUED = "queued"
    RAISED = "raised"  # already queued for a less urgent reason: now queued for this one
    DUPLICATE = "duplicate"  # already queued for this reason or a more urgent one
    FRESH = "fresh"  # checked (or being checked) recently enough for this reason
    GAP_CAP = "gap_cap"  # this intake gap has queued its share already
    FULL = "full"  # the queue is full of checks at least as urgent


OFFER_RESULTS: Final = tuple(o.value for o in Offer)


class CheckSink(Protocol):
    """Where the stream's reasons for a check go (the worker's :class:`~streams.checkonline.Reconciler`)."""

    def offer(
        self,
        userid: str,
        source: ObservationSource,
        *,
        rank: int = 0,
        fresh_after: int | None = None,
        gap: str | None = None,
    ) -> Offer: ...


@dataclass(frozen=True, slots=True)
class AgePolicy:
    """When a user shown online is due an ``age`` check: silent for ``max_silence_ms``, then again every
    ``recheck_interval_ms`` while they stay online and silent (:func:`next_age_check_at`)."""

    max_silence_ms: int
    recheck_interval_ms: int

    def due(self, last_event_ms: int, verified_at_ms: int | None) -> int:
        return next_age_check_at(
            last_event_ms=last_event_ms,
            verified_at_ms=verified_at_ms,
            max_silence_ms=self.max_silence_ms,
            recheck_interval_ms=self.recheck_interval_ms,
        )


class CheckQueue:
    """Pending checks, most urgent first (then by rank, then by arrival); one per user.

    ``recheck_interval_ms``: an ``age`` check is skipped if the user was checked within it (so a user who stays
    online and silent is checked once per interval). Other reasons ask for a check sent after the moment given
    as ``fresh_after`` (default: now): a suspect after the late event arrived, a gap after the gap ended, an
    on-demand check always.

    ``age_patience_ms`` (default: half the recheck interval): an ``age`` check queued at least that long ago is
    overdue and goes before every ``intake_gap`` check and every ``age`` check not overdue, the one queued
    earliest first; ``suspect`` and ``on_demand`` checks still go before it. An intake gap can queue thousands
    of checks, drained at the budget's pace for minutes; without this, every age check would wait behind them
    and a ghost would outlive the promised bound (checked within ``max_silence`` and one recheck interval). A
    retried check keeps the moment it was first queued. A full queue still evicts the least urgent entry, which
    may be an overdue age check.
    """

    def __init__(
        self,
        *,
        recheck_interval_ms: int,
        capacity: int = 100_000,
        gap_cap: int = 10_000,
        max_attempts: int = 3,
        gaps_remembered: int = 1024,
        age_patience_ms: int | None = None,
    ) -> None:
        if age_patience_ms is None:
            age_patience_ms = recheck_interval_ms // 2
        if capacity < 1 or gap_cap < 0 or max_attempts < 1 or age_patience_ms < 0:
            raise ValueError(
                "capacity and max_attempts must be at least 1, gap_cap and age_patience_ms not negative"
            )
        self.recheck_interval_ms = recheck_interval_ms
        self.age_patience_ms = age_patience_ms
        self.capacity = capacity
        self.gap_cap = gap_cap
        self.max_attempts = max_attempts
        self._gaps_remembered = gaps_remembered
        self._seq = itertools.count()
        # userid -> (urgency, rank, seq) of its live entry; heap items that disagree with it are stale.
        self._live: dict[str, tuple[int, int, int]] = {}
        self._checks: dict[str, Check] = {}
        self._best: list[tuple[int, int, int, str]] = []  # min-heap: next to pop
        self._worst: list[tuple[int, int, int, str]] = []  # min-heap of negated keys: next to evict
        # min-heap of (queued_at, seq) of age entries: the one waiting longest
        self._aged: list[tuple[int, int, str]] = []
        self._in_flight: dict[str, int] = {}  # userid -> when it was popped
        self._deferred: dict[str, Check] = {}  # queued again while in flight: back in once that one ends
        # userid -> when its last answered check was sent, oldest first (pruned past the recheck interval).
        self._checked: OrderedDict[str, int] = OrderedDict()
        self._gap_admitted: OrderedDict[str, int] = OrderedDict()
        self.evicted = 0
        self.dropped = 0  # failed checks given up after max_attempts

    # --- offering ------------------------------------------------------------------------------------------

    def offer(
        self,
        userid: str,
        source: ObservationSource,
        now_ms: int,
        *,
        rank: int = 0,
        fresh_after: int | None = None,
        gap: str | None = None,
    ) -> Offer:
        """Queue a check of ``userid`` for ``source`` unless one is pending or recent enough."""
        if fresh_after is None:
            # An age check is due again once the interval has passed (as next_age_check_at says).
            fresh_after = now_ms - self.recheck_interval_ms + 1 if source == "age" else now_ms
        check = Check(userid, source, rank, now_ms, 0, gap, fresh_after)
        current = self._checks.get(userid) or self._deferred.get(userid)
        if current is not None:
            if current.key <= check.key:
                return Offer.DUPLICATE
            outcome = Offer.RAISED
        else:
            if source != "on_demand" and self._answered_since(userid, fresh_after):
                return Offer.FRESH
            outcome = Offer.QUEUED
        if gap is not None:
            admitted = self._gap_admitted.get(gap, 0)
            if admitted >= self.gap_cap:
                return Offer.GAP_CAP
            self._gap_admitted[gap] = admitted + 1
            self._gap_admitted.move_to_end(gap)
            while len(self._gap_admitted) > self._gaps_remembered:
                self._gap_admitted.popitem(last=False)
        if userid in self._deferred:
            self._deferred[userid] = check
            return outcome
        if userid not in self._live and len(self._live) >= self.capacity and not self._evict_below(check):
            return Offer.FULL
        self._push(check)
        return outcome

    def _answered_since(self, userid: str, moment: int) -> bool:
        sent = self._checked.get(userid)
        popped = self._in_flight.get(userid)
        return (sent is not None and sent >= moment) or (popped is not None and popped >= moment)

    def _push(self, check: Check) -> None:
        urgency, rank = check.key
        seq = next(self._seq)
        self._live[check.userid] = (urgency, rank, seq)
        self._checks[check.userid] = check
        heapq.heappush(self._best, (urgency, rank, seq, check.userid))
        heapq.heappush(self._worst, (-urgency, -rank, -seq, check.userid))
        if urgency == _AGE:
            heapq.heappush(self._aged, (check.queued_at, seq, check.userid))
        # Stale entries pile up in every heap (a check popped from one heap, raised or evicted leaves its entries
        # in the others, where only those reaching the top are discarded): rebuild a heap past twice the live
        # count, so each stays O(live) in size.
        limit = 2 * len(self._live) + 64
        if len(self._best) > limit:
            self._best = [(u, r, s, user) for user, (u, r, s) in self._live.items()]
            heapq.heapify(self._best)
        if len(self._worst) > limit:
            self._worst = [(-u, -r, -s, user) for user, (u, r, s) in self._live.items()]
            heapq.heapify(self._worst)
        if len(self._aged) > limit:
            self._aged = [
                (self._checks[user].queued_at, s, user) for user, (u, _, s) in self._live.items() if u == _AGE
            ]
            heapq.heapify(self._aged)

    def _evict_below(self, check: Check) -> bool:
        """Make room by dropping the least urgent live entry if it is less urgent than ``check``."""
        while self._worst:
            u, r, s, userid = self._worst[0]
            if self._live.get(userid) != (-u, -r, -s):
                heapq.heappop(self._worst)
                continue
            if (-u, -r) <= check.key:
                return False
            heapq.heappop(self._worst)
            del self._live[userid]
            del self._checks[userid]
            self.evicted += 1
            return True
        return False

    # --- serving -------------------------------------------------------------------------------------------

    def pop(self, now_ms: int) -> Check | None:
        """The most urgent pending check (or the longest waiting overdue age check if nothing more urgent than an
        intake gap is pending), now in flight until :meth:`done` or :meth:`failed`."""
        while True:
            best = self._top_best()
            if best is None:
                return None
            userid = best[3]
            aged = self._top_aged() if best[0] >= _AGE_MAY_PASS else None
            if aged is not None and now_ms - aged[0] >= self.age_patience_ms:
                heapq.heappop(self._aged)
                userid = aged[2]
            else:
                heapq.heappop(self._best)
            # The entry left in the other heap is stale from here on (its user is no longer live with that seq).
            del self._live[userid]
            check = self._checks.pop(userid)
            if userid in self._in_flight:
                # One check per user at a time: this one goes in again when the running one ends.
                self._deferred[userid] = check
                continue
            self._in_flight[userid] = now_ms
            return check

    def _top_best(self) -> tuple[int, int, int, str] | None:
        """The most urgent live entry, stale ones above it discarded."""
        while self._best:
            urgency, rank, seq, userid = self._best[0]
            if self._live.get(userid) == (urgency, rank, seq):
                return self._best[0]
            heapq.heappop(self._best)
        return None

    def _top_aged(self) -> tuple[int, int, str] | None:
        """The live age entry queued earliest, stale ones above it discarded (a raised entry is stale here: its
        seq is new and its urgency no longer that of age)."""
        while self._aged:
            _, seq, userid = self._aged[0]
            live = self._live.get(userid)
            if live is not None and live[0] == _AGE and live[2] == seq:
                return self._aged[0]
            heapq.heappop(self._aged)
        return None

    def done(self, check: Check, sent_at_ms: int) -> None:
        """The check was answered; its request was sent at ``sent_at_ms``."""
        self._in_flight.pop(check.userid, None)
        self._checked[check.userid] = sent_at_ms
        self._checked.move_to_end(check.userid)
        horizon = sent_at_ms - self.recheck_interval_ms
        # Answers older than the recheck interval satisfy no default offer: forget them (bounded memory).
        while self._checked:
            first_user, first_sent = next(iter(self._checked.items()))
            if first_sent >= horizon:
                break
            self._checked.popitem(last=False)
        self._release_deferred(check.userid, sent_at_ms)

    def failed(self, check: Check, now_ms: int) -> bool:
        """The check got no answer. Queue it again (True) unless its attempts are used up or it was on demand
        (the asker gets the error); a pending check of the same user takes precedence."""
        self._in_flight.pop(check.userid, None)
        deferred = self._deferred.pop(check.userid, None)
        if deferred is not None:
            self._push(deferred)
            return True
        if check.source == "on_demand" or check.attempts + 1 >= self.max_attempts:
            self.dropped += 1
            return False
        if check.userid not in self._live:
            self._push(replace(check, attempts=check.attempts + 1))
        return True

    def _release_deferred(self, userid: str, sent_at_ms: int) -> None:
        deferred = self._deferred.pop(userid, None)
        if deferred is None:
            return
        # The answer just in may be recent enough for the deferred check (never for one on demand).
        if deferred.source != "on_demand" and sent_at_ms >= deferred.fresh_after:
            return
        self._push(deferred)

    # --- inspection ----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._live) + len(self._deferred)

    def __contains__(self, userid: object) -> bool:
        return userid in self._live or userid in self._deferred

    def in_flight(self) -> int:
        return len(self._in_flight)

    def depth(self) -> Counter[ObservationSource]:
        """Pending checks by reason (for the queue-depth gauge)."""
        counts: Counter[ObservationSource] = Counter(c.source for c in self._checks.values())
        counts.update(c.source for c in self._deferred.values())
        return counts


# --- what makes a user worth a check -----------------------------------------------------------------------


def age_check_due(
    *,
    now_ms: int,
    last_event_ms: int,
    verified_at_ms: int | None,
    max_silence_ms: int,
    recheck_interval_ms: int,
) -> bool:
    """An online user silent for ``max_silence`` and not verified within the recheck interval is due a check."""
    return now_ms >= next_age_check_at(
        last_event_ms=last_event_ms,
        verified_at_ms=verified_at_ms,
        max_silence_ms=max_silence_ms,
        recheck_interval_ms=recheck_interval_ms,
    )


def next_age_check_at(
    *, last_event_ms: int, verified_at_ms: int | None, max_silence_ms: int, recheck_interval_ms: int
) -> int:
    """When an online user who stays silent is next due an ``age`` check."""
    due = last_event_ms + max_silence_ms
    if verified_at_ms is not None:
        due = max(due, verified_at_ms + recheck_interval_ms)
    return due


def gap_rank(
    *,
    shown_online: bool,
    online_since_ms: int | None,
    last_event_ms: int | None,
    gap_start_ms: int,
    gap_end_ms: int,
    lookback_ms: int,
    recent_ms: int | None = None,
) -> int | None:
    """Whether an intake gap makes a user worth a check, and how urgently (lower first), or None.

    Rank 0: shown online since before the gap began (an offline lost in the gap would leave them a ghost).
    Rank 1: heard of shortly before or during the gap (a lost online or offline would go unnoticed).
    Rank 2: any other user heard of within ``recent_ms`` before the gap began, or since (a user shown offline
    who came online in the gap is wrong until their next event, which may be hours away; the gap's cap and the
    ranks above go first). None: ``recent_ms`` None.
    """
    if shown_online and online_since_ms is not None and online_since_ms <= gap_start_ms:
        return 0
    if last_event_ms is not None and gap_start_ms - lookback_ms <= last_event_ms <= gap_end_ms:
        return 1
    if recent_ms is not None and last_event_ms is not None and last_event_ms >= gap_start_ms - recent_ms:
        return 2
    return None


def offer_gap_checks(sink: CheckSink, gap_id: str, gap_end_ms: int, ranked: Iterable[tuple[str, int]]) -> int:
    """Offer an intake gap's users to ``sink``, most urgent rank first, until the gap's cap is reached; a check
    sent after the gap ended satisfies each. Returns how many were queued (or raised)."""
    queued = 0
    for userid, rank in sorted(ranked, key=lambda item: item[1]):
        result = sink.offer(userid, "intake_gap", rank=rank, fresh_after=gap_end_ms, gap=gap_id)
        if result is Offer.GAP_CAP:
            break
        if result in (Offer.QUEUED, Offer.RAISED):
            queued += 1
    return queued


class GapGroups:
    """An intake gap's markers, gathered per gap for ``settle_ms`` after its first one, so the partitions of one gap
    are ranked together: one gap's cap is then spent on its most urgent users across every partition this worker
    owns, not on the first partition scanned. A gap's marker taken after its group went out starts a new group (it
    gets what is left of the cap)."""

    def __init__(self, settle_ms: int) -> None:
        self.settle_ms = settle_ms
        self._groups: dict[str, tuple[int, list[tuple[int, GapMarker]]]] = {}

    def add(self, partition: int, marker: GapMarker, now_ms: int) -> None:
        _, members = self._groups.setdefault(marker.id, (now_ms, []))
        members.append((partition, marker))

    def ready(self, now_ms: int) -> list[list[tuple[int, GapMarker]]]:
        """The groups settled by ``now_ms``, each its (partition, marker) pairs in the order taken; removed."""
        done = [gap for gap, (first, _) in self._groups.items() if now_ms - first >= self.settle_ms]
        return [self._groups.pop(gap)[1] for gap in done]

    def __len__(self) -> int:
        return len(self._groups)
