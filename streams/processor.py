"""Between Faust and the pure state machine: decode, apply, write the table, say what to send.

Kept free of Faust so it can be tested with plain dicts: the glue in :mod:`streams.runtime.app` hands it the table (a
mutable mapping of userid to encoded record), a way to list one partition's records, and the current wall
clock, and sends the :class:`Outgoing` messages it returns, in order.

Sweeps (S6 retention, S8 releases) run from the stream: after each message the partition's users whose
``next_sweep_at`` has been reached by stream time are swept, a bounded number per message. An in-memory index
(a heap of due times) finds them; it is rebuilt from the table when the partition is (re)assigned, so it is
safe under rebalance, and it is only a hint: every popped entry is checked against the record itself. The rebuild
reads the summary at the head of each table value (:func:`summarize`), not the whole record.

Stream time per partition is kept in memory and stored with every record the partition writes (``"t"``), so it
costs no write of its own: the restored stream time is the largest one among the restored records, read while
the index is rebuilt. A record purged from the table takes its stream time with it, so before a purge the
partition's stream time is also written under a reserved key.

Reconciliation (R1-R5, docs/reconciliation.md) asks this class for users worth a check with RongCloud: users shown
online and silent for ``max_silence`` come from a second in-memory index kept beside the sweep index (built in
the same pass, updated on every write, by wall-clock due time; :meth:`Processor.age_checks`), so no tick scans the
table. They go to a :class:`~streams.reconcile.CheckSink`, the worker's checker. A gateway's intake-gap marker
on RAW is set aside (:meth:`Processor.take_gaps`) for the runtime to scan the partition's records outside the
agent (:meth:`Processor.gap_candidates`): scanning a partition is too slow to do between two messages.

Re-sends after a restart (S10). A redelivered RAW record re-sends what it caused from its user's memory, but a
sweep's release or deletion belongs to another user and would be missed, so a restart also re-sends, before
anything else, every remembered transition that may not have reached Kafka:

* Faust commits every partition's processed offsets together, after the producer has every message sent so far
  acknowledged. So the first offset processed after a (re)assignment, ``f``, is the committed one, and a
  message of that topic partition triggered an unacknowledged send only if its offset is ``>= f``.
* Every remembered transition names its trigger's position (``p@offset`` on RAW, ``tick:p@offset`` on the tick
  topic). When the first message of a topic arrives, the user of every transition triggered at ``>= f`` gets its
  whole memory re-sent in ``seq`` order, with its STATE; before the first message of the other topic, a user
  remembering a transition of that topic is re-sent the same way before anything new is sent for it. A user's
  re-sends therefore always precede its new transitions: no consumer sees a ``seq`` jump.
* A deleted user's final record stays in the table as a marker (``"x"``: the deleting message's position):
  invisible to queries, gauges and sweeps, treated as unknown by a new event, recognised by a redelivered one.
  It is purged once its position is known committed (below ``f`` at a restart), or when the partition holds
  more than ``deletion_memory`` of them, oldest first.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple

import orjson

from core import contract
from core.contract import MAX_USERID_LENGTH
from streams import envelope, rules
from streams.metrics import WorkerMetrics, platform_label
from streams.reconcile import AgePolicy, CheckSink, gap_rank
from streams.rules import PresenceConfig, Transition, UserRecord

OutTopic = Literal["transitions", "state", "dlq"]
_MAX_RAW_IN_DLQ = 16 * 1024
# Stale entries the sweep index may hold beyond twice its live ones before it is rebuilt (amortised O(1)).
_HEAP_SLACK = 1000


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to send. ``value`` None is a tombstone (STATE only). ``headers``: Kafka headers
    (:mod:`streams.envelope` for TRANSITIONS and STATE)."""

    topic: OutTopic
    key: bytes | None
    value: bytes | None
    headers: envelope.Headers | None = None


# The table value is the record plus "o": the newest RAW offset applied to it. A user lives in one partition,
# so a message at or below that offset is one the record already reflects: a redelivery (S10).
_APPLIED = "o"
# ... and "t": the partition's stream time when the record was written. Every applied message writes its user's
# record, in the same changelog partition and in order, so after a crash the largest "t" among the restored
# records is the stream time that belongs to them.
_STREAM_TIME = "t"
# Before a sweep deletes a record, the stream time is also written under a key no userid can take (userids are
# at most 64 characters), so the deleted record's "t" is not lost with it.
STREAM_TIME_KEY = "~" * (MAX_USERID_LENGTH + 1) + "stream-time/"


# ... and "x" on a deleted user's final record (a marker): the position of the message whose sweep deleted it.
_DELETED_BY = "x"
_TICK_PREFIX = "tick:"
RAW: Final = "raw"
TICK: Final = "tick"
_KINDS: Final = frozenset((RAW, TICK))


class Stored(NamedTuple):
    """A table value decoded: the record, the newest RAW offset applied to it, the stream time it was written at,
    and, for a deleted user's marker, the position of the message that deleted it."""

    record: UserRecord | None
    applied: int
    stream_time: int
    deleted_by: str | None = None

    @property
    def live(self) -> UserRecord | None:
        """The record if the user exists (not deleted)."""
        return self.record if self.deleted_by is None else None


_NOTHING = Stored(None, -1, 0)


def decode_stored(value: bytes | None) -> Stored:
    if value is None:
        return _NOTHING
    data = orjson.loads(value)
    return Stored(
        rules.record_from_dict(data),
        int(data.get(_APPLIED, -1)),
        int(data.get(_STREAM_TIME, 0)),
        data.get(_DELETED_BY),
    )


def decode_record(value: bytes | None) -> UserRecord | None:
    """The user's record, None if there is none or the user is deleted."""
    return decode_stored(value).live


def encode_record(
    record: UserRecord, applied_offset: int = -1, stream_time: int = 0, deleted_by: str | None = None
) -> bytes:
    """The table value: the record's summary (``"i"``, first), the record, ``"o"``, ``"t"`` and ``"x"``."""
    data: dict[str, Any] = {_SUMMARY: summarize(record, stream_time, deleted_by)}
    data.update(rules.record_to_dict(record))
    data[_APPLIED] = applied_offset
    data[_STREAM_TIME] = stream_time
    if deleted_by is not None:
        data[_DELETED_BY] = deleted_by
    return orjson.dumps(data)


# --- the record's summary --------------------------------------------------------------------------------------
#
# Rebuilding a partition's indexes (sweep, age, gauges, stream time, S10's re-sends) after a restart reads every
# record of the partition, and decoding a record whole costs about 10 us: 10 s of a warm restart per million
# users. So every value starts with a summary of what the rebuild needs, a flat JSON array of numbers (and of
# platform labels, which never hold "]"): ``{"i":[...],"v":1,...}``. The rebuild finds the array's end and
# parses those few dozen bytes alone (:func:`read_summary`). The value stays one JSON object whose other keys
# are exactly what they were, so a worker of the previous release reads it unchanged (it ignores "i"; rolling
# upgrades and roll-backs), and a value written before the summary existed (no "i") is decoded whole and
# summarised on the spot. The summary holds the rule inputs, not the due times, so a change of retention
# settings between two runs needs no full decode. Change the layout by bumping _SUMMARY_LAYOUT: a value of
# another layout is decoded whole.
_SUMMARY: Final = "i"
_SUMMARY_HEAD: Final = b'{"i":['
_SUMMARY_LAYOUT: Final = 1
# Positions in the summary (a list, read by index: no object per record on the rebuild's path).
_S_TIME = 1  # "t": the partition's stream time when the record was written
_S_MARKER = 2  # 1 for a deleted user's marker (decoded whole by the rebuild: there are few)
_S_RAW_TRIGGER = 3  # the largest RAW offset among the remembered transitions' triggers, -1 if none (S10)
_S_TICK_TRIGGER = 4  # the same on the tick topic
_S_ONLINE = 5  # 1 if the status shown is online (gauges, age checks)
_S_SESSIONS = 6  # number of sessions (gauges)
_S_LAST_SEEN = 7  # (sweep, age checks)
_S_VERIFIED_AT = 8  # R4 (age checks), null if never
_S_RELEASE_AFTER = 9  # the S8 hold's release time, null if none (sweep)
_S_ENDED = 10  # the earliest event time among the sessions not online, null if every one is (S6 sweep)
_S_SYNTHETIC = 11  # 1 if R3 keeps the user online without a session online (S6 sweep)
_S_PLATFORMS = 12  # from here: the platform label of each session online (gauges; none: no session online)


def summarize(record: UserRecord, stream_time: int, deleted_by: str | None = None) -> list[Any]:
    """What rebuilding the indexes needs of ``record`` (see above), in summary order."""
    raw_trigger = tick_trigger = -1
    for memo in record.memory:
        position = parse_position(memo.trigger_delivery)
        if position is None:
            continue
        if position[0] == RAW:
            raw_trigger = max(raw_trigger, position[1])
        else:
            tick_trigger = max(tick_trigger, position[1])
    platforms: list[str] = []
    ended: int | None = None
    for session in record.sessions.values():
        if session.status == "online":
            platforms.append(platform_label(session.os))
        elif ended is None or session.time < ended:
            ended = session.time
    held = record.held
    observed = record.observed_online_at
    return [
        _SUMMARY_LAYOUT,
        stream_time,
        0 if deleted_by is None else 1,
        raw_trigger,
        tick_trigger,
        1 if record.status == "online" else 0,
        len(record.sessions),
        record.last_seen,
        record.verified_at,
        None if held is None else held.release_after,
        ended,
        1 if observed is not None and observed >= record.last_seen else 0,
        *platforms,
    ]


def read_summary(value: bytes) -> list[Any]:
    """The summary of a table value: read from its head, or, for a value without one (written before it existed)
    or of another layout, by decoding the value whole."""
    if value.startswith(_SUMMARY_HEAD):
        summary: list[Any] = orjson.loads(value[len(_SUMMARY_HEAD) - 1 : value.index(b"]") + 1])
        if summary[0] == _SUMMARY_LAYOUT:
            return summary
    stored = decode_stored(value)
    assert stored.record is not None  # noqa: S101 - a value always holds a record
    return summarize(stored.record, stored.stream_time, stored.deleted_by)


def _summary_sweep_at(summary: list[Any], config: PresenceConfig) -> int | None:
    """:func:`streams.rules.next_sweep_at` of the summarised record (a property test holds the two together)."""
    due: int | None = None
    release_after = summary[_S_RELEASE_AFTER]
    if release_after is not None:
        due = release_after + 1
    ended = summary[_S_ENDED]
    if ended is not None:
        at = ended + config.ended_session_retention_ms + 1
        if due is None or at < due:
            due = at
    if len(summary) == _S_PLATFORMS and release_after is None and not summary[_S_SYNTHETIC]:
        at = summary[_S_LAST_SEEN] + config.user_retention_ms + 1
        if due is None or at < due:
            due = at
    return due


def _summary_triggered_at_or_after(summary: list[Any], kind: str, first: int) -> bool:
    """:func:`_triggered_at_or_after` of the summarised record."""
    return bool(summary[_S_RAW_TRIGGER if kind == RAW else _S_TICK_TRIGGER] >= first)


def raw_position(partition: int, offset: int) -> str:
    return f"{partition}@{offset}"


def tick_position(partition: int, offset: int) -> str:
    return f"{_TICK_PREFIX}{partition}@{offset}"


def parse_position(position: str) -> tuple[str, int] | None:
    """``(kind, offset)`` of a position written by :func:`raw_position` or :func:`tick_position`, else None."""
    kind = RAW
    if position.startswith(_TICK_PREFIX):
        kind, position = TICK, position[len(_TICK_PREFIX) :]
    _, sep, offset = position.partition("@")
    if not sep or not offset.isdigit():
        return None
    return kind, int(offset)


def _triggered_at_or_after(record: UserRecord, kind: str, first: int) -> bool:
    """Whether a remembered transition of ``record`` was triggered by a message of ``kind`` at offset >= ``first``."""
    for memo in record.memory:
        position = parse_position(memo.trigger_delivery)
        if position is not None and position[0] == kind and position[1] >= first:
            return True
    return False


def _triggered_by_any(record: UserRecord, kinds: set[str]) -> bool:
    for memo in record.memory:
        position = parse_position(memo.trigger_delivery)
        if position is not None and position[0] in kinds:
            return True
    return False


def is_user_key(key: str) -> bool:
    return not key.startswith(STREAM_TIME_KEY)


def dead_letter(reason: str, detail: str, key: bytes | None, value: bytes | None, now_ms: int) -> Outgoing:
    letter = contract.dead_letter(
        source="worker",
        reason=reason,
        detail=detail,
        raw=value or b"",
        raw_limit=_MAX_RAW_IN_DLQ,
        received_at=now_ms,
    )
    return Outgoing("dlq", key, orjson.dumps(letter))


#: (offset, key, value) of one RAW record.
RawRecord = tuple[int, bytes | None, bytes | None]

#: The most transitions one RAW record can send for one user: its event's own (a release of a held transition
#: and a status change), the user's sweep in the same step (a release) and one more for rules yet to come. The
#: property tests check that no record sends more.
MAX_TRANSITIONS_PER_RECORD = 4


class TransitionTally:
    """Transitions sent per user and not yet acknowledged (S10 with batches).

    A redelivered record re-sends its transitions from the record's memory, which holds the last
    ``transition_memory`` of them; a transition not yet acknowledged must still be there. So no user may have more
    transitions in flight than the memory holds. The caller seals what it sent as a segment (:meth:`seal`), with a way
    to tell that all of it is acknowledged, and retires acknowledged segments (:meth:`retire`) before going on.
    """

    __slots__ = ("counts", "top", "_segment", "_sealed")

    def __init__(self) -> None:
        self.counts: dict[bytes | None, int] = {}
        self.top = 0
        self._segment: dict[bytes | None, int] = {}
        self._sealed: deque[tuple[dict[bytes | None, int], Callable[[], bool]]] = deque()

    def count(self, outgoing: Iterable[Outgoing]) -> None:
        counts, segment = self.counts, self._segment
        for message in outgoing:
            if message.topic == "transitions":
                key = message.key
                segment[key] = segment.get(key, 0) + 1
                n = counts[key] = counts.get(key, 0) + 1
                if n > self.top:
                    self.top = n

    def seal(self, acknowledged: Callable[[], bool]) -> None:
        """What was counted since the last seal was sent; ``acknowledged()`` tells when all of it is."""
        if self._segment:
            self._sealed.append((self._segment, acknowledged))
            self._segment = {}

    def retire(self) -> None:
        """Forget the sealed segments that are acknowledged (oldest first, as sent)."""
        sealed, counts = self._sealed, self.counts
        changed = False
        while sealed and sealed[0][1]():
            segment, _ = sealed.popleft()
            changed = True
            for key, n in segment.items():
                left = counts[key] - n
                if left:
                    counts[key] = left
                else:
                    del counts[key]
        if changed:
            self.top = max(counts.values(), default=0)

    def clear(self) -> None:
        """Everything sent is acknowledged."""
        self.counts.clear()
        self._segment.clear()
        self._sealed.clear()
        self.top = 0


class _Collected:
    """What a batch did to one metric: increments and last values per label set, histogram observations."""

    __slots__ = ("counts", "last", "observed", "_labels")

    def __init__(self) -> None:
        self.counts: dict[tuple[str, ...], float] = {}
        self.last: dict[tuple[str, ...], float] = {}
        self.observed: list[float] = []
        self._labels: tuple[str, ...] = ()

    def labels(self, *labels: str) -> _Collected:
        # Always chained at once (``labels(...).inc()``), in synchronous code: remembering them is enough.
        self._labels = labels
        return self

    def inc(self, amount: float = 1) -> None:
        labels, self._labels = self._labels, ()
        self.counts[labels] = self.counts.get(labels, 0) + amount

    def set(self, value: float) -> None:
        labels, self._labels = self._labels, ()
        self.last[labels] = value

    def observe(self, value: float) -> None:
        self.observed.append(value)


class _BatchMetrics:
    """Stands in for :class:`WorkerMetrics` while a batch is processed; :meth:`apply_to` hands the totals over."""

    def __init__(self) -> None:
        self._collected: dict[str, _Collected] = {}

    def __getattr__(self, name: str) -> _Collected:
        if name.startswith("_"):
            raise AttributeError(name)
        # Only the first access of a name comes here: the attribute is then set, and found directly.
        collected = self._collected[name] = _Collected()
        setattr(self, name, collected)
        return collected

    def apply_to(self, metrics: WorkerMetrics) -> None:
        for name, collected in self._collected.items():
            metric = getattr(metrics, name)
            for labels, amount in collected.counts.items():
                (metric.labels(*labels) if labels else metric).inc(amount)
            for labels, value in collected.last.items():
                (metric.labels(*labels) if labels else metric).set(value)
            for value in collected.observed:
                metric.observe(value)


class Processor:
    """Applies RAW events and sweeps to a table; one instance per worker, all partitions."""

    def __init__(
        self,
        table: MutableMapping[str, Any],
        config: PresenceConfig,
        records_of_partition: Callable[[int], Iterable[tuple[str, bytes]]],
        metrics: WorkerMetrics | None = None,
        sweep_batch: int = 1000,
        source: str = contract.DEFAULT_WORKER_APP_ID,
    ) -> None:
        """``records_of_partition(p)`` lists the table's (key, value) pairs of partition ``p``; ``source`` is the
        messages' ``ce_source`` (the worker's app id)."""
        self._source = source
        self._table = table
        self._config = config
        self._records_of_partition = records_of_partition
        self._metrics = metrics
        self._sweep_batch = sweep_batch
        self._due: dict[int, list[tuple[int, str]]] = {}
        self._stream_time: dict[int, int] = {}
        # The one due time that counts per user: heap entries that disagree with it are stale and skipped, so
        # the heap holds about one entry per user instead of one per write.
        self._scheduled: dict[int, dict[str, int]] = {}
        # Wall clock of the last stream-time advance per partition, for the idle-partition S8 release.
        self._advanced_at: dict[int, int] = {}
        # Gauges per partition: users, online users, sessions, online sessions by platform.
        self._counts: dict[int, _Counts] = {}
        # S10 after a (re)assignment: the topics (RAW, tick) whose first offset is not known yet, the users whose
        # memory was re-sent meanwhile, and the deleted users' markers, oldest first: (userid, deleted by).
        self._undecided: dict[int, set[str]] = {}
        self._first: dict[int, dict[str, int]] = {}
        self._resent: dict[int, set[str]] = {}
        self._markers: dict[int, deque[tuple[str, str]]] = {}
        # What S10 knew of each partition's first offsets before its current batch (checkpoint(), rebuild()).
        self._checkpoints: dict[int, tuple[set[str], dict[str, int], set[str]] | None] = {}
        # First offsets decided within a discarded batch: still the first after the commit (rebuild()).
        self._carried_first: dict[int, dict[str, int]] = {}
        # Reconciliation (off until enable_reconciliation): where checks go, and the age index per partition.
        self._checks: CheckSink | None = None
        self._age: AgePolicy | None = None
        self._age_index: dict[int, _DueIndex] = {}
        self._gaps: list[tuple[int, contract.GapMarker]] = []

    def enable_reconciliation(self, checks: CheckSink, age: AgePolicy | None) -> None:
        """Offer users worth a check to ``checks``: ``age`` ones by ``age`` (None: no age checks)."""
        self._checks = checks
        self._age = age
        self.forget_all()  # the indexes are rebuilt with the age index on next use

    # --- messages -------------------------------------------------------------------------------------------

    def on_raw(
        self, partition: int, offset: int, key: bytes | None, value: bytes | None, now_ms: int
    ) -> list[Outgoing]:
        """Process the RAW message at ``offset`` of ``partition``."""
        source = raw_position(partition, offset)
        out: list[Outgoing] = []
        # Any record, valid or not, may be the first after a (re)assignment: its offset is the committed one.
        self._start(partition, RAW, offset, out, now_ms)
        try:
            # The Kafka position names the delivery: only a redelivery of this very record (after a crash or
            # a rebalance) re-sends what it caused; an upstream retry is a new record and a plain duplicate.
            event = contract.decode_raw_record(key, value, delivery_id=source)
        except contract.InvalidRaw as exc:
            if self._metrics:
                self._metrics.events.labels("invalid").inc()
                self._metrics.dead_letters.labels(exc.reason).inc()
            out.append(dead_letter(exc.reason, str(exc), key, value, now_ms))
            return out
        if isinstance(event, contract.GapMarker):
            self._on_gap(partition, event)
            return out
        if isinstance(event, contract.Observation):
            self._on_observation(partition, offset, event, out, now_ms)
            return out
        stream_time = self._stream_time[partition]
        if event.time > stream_time:
            self._stream_time[partition] = event.time
            self._advanced_at[partition] = now_ms
            if self._metrics:
                self._metrics.stream_time_seconds.labels(str(partition)).set(event.time / 1000)

        userid = event.userid
        stored = self._stored(partition, userid, out, now_ms)
        old = stored.record
        if old is not None and offset <= stored.applied:
            # Already applied (a redelivery after a crash or rebalance): applying it again could re-create a
            # session S6 has dropped since, or a user deleted since. Re-send what it caused, and write the record
            # again: the first write may never have reached the changelog.
            new, result = old, rules.redelivered(old, event)
            self._write(partition, userid, stored.live, old, stored.applied, stored.deleted_by)
            deleted = stored.deleted_by is not None
        else:
            # Rules see the stream time from before this event: an event does not make itself late. A deleted
            # user's marker is no record: the event starts a new one.
            new, result = rules.apply(stored.live, event, stream_time, self._config)
            if stored.deleted_by is not None and stored.record is not None:
                new = rules.reborn(stored.record, new, self._config)
            # Every applied message is recorded in the record's applied offset, duplicates and stale ones too.
            self._write(partition, userid, stored.live, new, offset)
            deleted = False
        if self._metrics:
            self._metrics.events.labels(result.outcome).inc()
            self._metrics.event_time_lag.observe(max(0, now_ms - event.time) / 1000)
        if result.outcome == "too_late" and self._checks is not None:
            # R5: too old to judge; RongCloud's answer after the event's receipt settles the user's status.
            self._checks.offer(userid, "suspect", fresh_after=event.received_at)
        self._emit(out, userid, new, result.transitions, result.reemitted,
                   result.publish_state, now_ms, event.received_at, tombstone=deleted)  # fmt: skip
        out.extend(self._sweep_due(partition, max(stream_time, event.time), now_ms, source))
        return out

    def on_batch(
        self,
        partition: int,
        records: Sequence[RawRecord],
        now_ms: int,
        tally: TransitionTally | None = None,
    ) -> tuple[list[Outgoing], int]:
        """Process RAW ``records`` of ``partition`` in order, as :meth:`on_raw` one by one would; return what to
        send, in order, and how many records were processed.

        With a ``tally`` (transitions sent per user since every output was last acknowledged) it stops before a
        record that could take one user past ``transition_memory`` (S10): the caller sends what it has, waits
        for the acknowledgements, clears the tally and calls again with the rest. The re-sends of the first
        record after a (re)assignment count first, and may stop the batch before the record itself (processed
        count 0, output not empty). With an empty tally each call makes progress.
        """
        out: list[Outgoing] = []
        limit = self._config.transition_memory - MAX_TRANSITIONS_PER_RECORD
        done = 0
        metrics = self._metrics
        if metrics is not None:
            # Metrics are collected per batch and applied once: Prometheus' labels() and inc() per event cost
            # about a fifth of the processing.
            self._metrics = _BatchMetrics()  # type: ignore[assignment]
        try:
            for offset, key, value in records:
                if tally is not None and limit >= 0 and tally.top > limit:
                    break
                if tally is not None and self.starting(partition, RAW):
                    # The first record after a (re)assignment re-sends whole memories (S10): those count
                    # before the record's own transitions, so that the cut can come between them.
                    resent: list[Outgoing] = []
                    self._start(partition, RAW, offset, resent, now_ms)
                    tally.count(resent)
                    out.extend(resent)
                    if limit >= 0 and tally.top > limit:
                        break
                produced = self.on_raw(partition, offset, key, value, now_ms)
                if tally is not None:
                    tally.count(produced)
                out.extend(produced)
                done += 1
        finally:
            if metrics is not None:
                collected, self._metrics = self._metrics, metrics
                collected.apply_to(metrics)  # type: ignore[union-attr]
        return out, done

    def _on_observation(
        self, partition: int, offset: int, observation: contract.Observation, out: list[Outgoing], now_ms: int
    ) -> None:
        """Apply an observation (R2-R4) in order with the user's events. Its time is the checker's wall clock, not
        an event time, so it does not move stream time."""
        userid = observation.userid
        stream_time = self._stream_time[partition]
        stored = self._stored(partition, userid, out, now_ms)
        old = stored.record
        if old is not None and offset <= stored.applied:
            # A redelivery (S10): re-send what it caused, change nothing.
            result = rules.redelivered(old, observation)
            self._write(partition, userid, stored.live, old, stored.applied, stored.deleted_by)
            deleted = stored.deleted_by is not None
            self._emit(out, userid, old, result.transitions, result.reemitted,
                       result.publish_state, now_ms, None, tombstone=deleted)  # fmt: skip
            return
        new, result = rules.apply_observation(stored.live, observation, stream_time, self._config)
        if self._metrics and result.correction is not None:
            self._metrics.reconcile_corrections.labels(result.correction).inc()
        if new is None:
            return  # offline and unknown: nothing to keep
        if stored.deleted_by is not None and stored.record is not None:
            new = rules.reborn(stored.record, new, self._config)
        self._write(partition, userid, stored.live, new, offset)
        self._emit(out, userid, new, result.transitions, result.reemitted, result.publish_state, now_ms, None)
        out.extend(self._sweep_due(partition, stream_time, now_ms, raw_position(partition, offset)))

    def on_tick(self, partition: int, offset: int, now_ms: int) -> list[Outgoing]:
        """A periodic tick for ``partition``: releases S8 holds on a partition with no events for G of wall time.

        Stream time stands still on an idle partition, so a held offline would wait forever; after the grace
        period of wall time the hold is released as if stream time had moved on (the one non-deterministic
        edge of the rules). Nothing is written to the stream time itself.
        """
        grace = self._config.offline_grace_ms
        if grace <= 0:
            return []
        out: list[Outgoing] = []
        self._start(partition, TICK, offset, out, now_ms)
        idle = now_ms - self._advanced_at.setdefault(partition, now_ms)
        if idle < grace:
            return out
        out.extend(
            self._sweep_due(
                partition,
                self._stream_time[partition] + idle,
                now_ms,
                tick_position(partition, offset),
                holds_only=True,
            )
        )
        return out

    def stream_time(self, partition: int) -> int:
        """The largest event time applied on ``partition`` (restored from the table after a restart)."""
        self._ensure_index(partition)
        return self._stream_time[partition]

    # --- rebalance ------------------------------------------------------------------------------------------

    def forget(self, partitions: Iterable[int]) -> None:
        """Drop in-memory state of partitions this worker no longer owns (rebuilt on reassignment)."""
        for partition in partitions:
            self._due.pop(partition, None)
            self._stream_time.pop(partition, None)
            self._scheduled.pop(partition, None)
            self._advanced_at.pop(partition, None)
            self._counts.pop(partition, None)
            self._age_index.pop(partition, None)
            self._undecided.pop(partition, None)
            self._first.pop(partition, None)
            self._resent.pop(partition, None)
            self._markers.pop(partition, None)
            self._carried_first.pop(partition, None)
        self._publish_gauges()

    def forget_all(self) -> None:
        self.forget(list(self._due))

    def checkpoint(self, partition: int) -> None:
        """Before a batch of ``partition`` whose table writes may be discarded: remember what S10 knows of the
        partition's first offsets, for :meth:`rebuild` to return to (cheap: nothing is copied once every topic's
        first offset is known)."""
        undecided = self._undecided.get(partition)
        self._checkpoints[partition] = (
            None
            if undecided is None
            else (set(undecided), dict(self._first[partition]), set(self._resent[partition]))
        )

    def rebuild(self, partition: int) -> None:
        """After a batch of ``partition`` whose table writes were discarded: drop the in-memory indexes (rebuilt
        from the table by the next message) and return S10's knowledge of first offsets to the last
        :meth:`checkpoint`. The next message is not the first after a commit and must not be taken for one: a
        first offset decided within the discarded batch is decided again, at the same offset, by the next
        message of its topic, since its re-sends were discarded with the batch (see module doc)."""
        checkpoint = self._checkpoints.pop(partition, None)
        carried = {**self._carried_first.get(partition, {}), **self._first.get(partition, {})}
        self.forget([partition])
        if checkpoint is not None:
            undecided, first, resent = checkpoint
            self._undecided[partition], self._first[partition], self._resent[partition] = (
                undecided,
                first,
                resent,
            )
            carried = {kind: offset for kind, offset in carried.items() if kind not in first}
        if carried:
            self._carried_first[partition] = carried

    def ensure_indexed(self, partitions: Iterable[int]) -> None:
        """Build the in-memory indexes of owned ``partitions`` not built yet (one pass over each one's records;
        a quiet partition is otherwise indexed by its first message)."""
        for partition in partitions:
            self._ensure_index(partition)

    def starting(self, partition: int, kind: str) -> bool:
        """Whether the next message of ``kind`` on ``partition`` is the first since a (re)assignment or a rebuild,
        so :meth:`start` would re-send what may have been lost."""
        undecided = self._undecided.get(partition)
        return partition not in self._due or undecided is None or kind in undecided

    def start(self, partition: int, kind: str, offset: int, now_ms: int) -> list[Outgoing]:
        """What the message of ``kind`` at ``offset`` re-sends first if it is :meth:`starting`; processing it
        afterwards re-sends nothing more on that account."""
        out: list[Outgoing] = []
        self._start(partition, kind, offset, out, now_ms)
        return out

    def _start(self, partition: int, kind: str, offset: int, out: list[Outgoing], now_ms: int) -> None:
        """Before a message of ``kind`` at ``offset``: rebuild the partition's state, and if this is the first
        message of its topic since, re-send what may have been lost (see module doc)."""
        carried = self._carried_first.get(partition)
        if carried and kind in carried:
            offset = carried.pop(kind)
        if partition not in self._due:
            self._ensure_index(partition, (kind, offset), out, now_ms)
        elif kind in self._undecided[partition]:
            self._decide(partition, kind, offset, out, now_ms, None)

    def _ensure_index(
        self,
        partition: int,
        first: tuple[str, int] | None = None,
        out: list[Outgoing] | None = None,
        now_ms: int = 0,
    ) -> None:
        if partition in self._due:
            return
        scheduled: dict[str, int] = {}
        counts = _Counts()
        age = _DueIndex() if self._age is not None else None
        markers: list[tuple[int, str, str]] = []
        resend: list[str] = []
        stored_time = self._table.get(f"{STREAM_TIME_KEY}{partition}")
        stream_time = int(stored_time) if stored_time else 0
        config, age_policy = self._config, self._age
        # One pass over the partition's records, reading each one's summary (not the whole record): sweep index,
        # gauges, the stream time they were written at, the deleted users' markers and the users to re-send to
        # (when the first message's position is known).
        for userid, value in self._records_of_partition(partition):
            if not is_user_key(userid):
                continue
            summary = read_summary(value)
            if summary[_S_TIME] > stream_time:
                stream_time = summary[_S_TIME]
            if first is not None and _summary_triggered_at_or_after(summary, *first):
                resend.append(userid)
            if summary[_S_MARKER]:
                deleted_by = decode_stored(value).deleted_by
                assert deleted_by is not None  # noqa: S101 - the summary says it is a marker
                position = parse_position(deleted_by)
                markers.append((-1 if position is None else position[1], userid, deleted_by))
                continue
            counts.add_summary(summary)
            due = _summary_sweep_at(summary, config)
            if due is not None:
                scheduled[userid] = due
            if age is not None and age_policy is not None and summary[_S_ONLINE]:
                # As _age_due: R4 postpones the next check by the recheck interval after an agreeing observation.
                age.set(userid, age_policy.due(summary[_S_LAST_SEEN], summary[_S_VERIFIED_AT]))
        if age is not None:
            self._age_index[partition] = age
        self._stream_time[partition] = stream_time
        self._due[partition] = _heap_of(scheduled)
        self._scheduled[partition] = scheduled
        self._counts[partition] = counts
        self._markers[partition] = deque((userid, by) for _, userid, by in sorted(markers))
        if partition not in self._undecided:
            self._resent[partition] = set()
            self._first[partition] = {}
            # Without damping no tick is ever processed (nor sent): nothing to wait for on the tick topic.
            self._undecided[partition] = set(_KINDS) if self._config.offline_grace_ms > 0 else {RAW}
        # else rebuilt after a discarded batch (see rebuild()): the first offsets already decided stand.
        if first is not None and first[0] in self._undecided[partition]:
            self._decide(partition, first[0], first[1], out if out is not None else [], now_ms, resend)
        self._publish_gauges()

    def _decide(
        self,
        partition: int,
        kind: str,
        first: int,
        out: list[Outgoing],
        now_ms: int,
        resend: list[str] | None,
    ) -> None:
        """The first message of ``kind`` since the rebuild is at offset ``first``: everything of that topic below
        it is committed, so acknowledged (S10). Re-send every user with a transition triggered at or after it,
        and purge the markers of deletions below it."""
        self._undecided[partition].discard(kind)
        self._first[partition][kind] = first
        resent = self._resent[partition]
        if resend is None:
            resend = []
            for userid, value in self._records_of_partition(partition):
                if not is_user_key(userid) or userid in resent:
                    continue
                if _summary_triggered_at_or_after(read_summary(value), kind, first):
                    resend.append(userid)
        for userid in resend:
            if userid not in resent:
                self._resend(partition, userid, decode_stored(self._table.get(userid)), out, now_ms)
        markers = self._markers[partition]
        kept = deque(m for m in markers if not _committed_below(m[1], kind, first))
        for userid, deleted_by in markers:
            if _committed_below(deleted_by, kind, first):
                self._purge(partition, userid, deleted_by)
        self._markers[partition] = kept
        if not self._undecided[partition]:
            resent.clear()

    def _stored(self, partition: int, userid: str, out: list[Outgoing], now_ms: int) -> Stored:
        """The user's table value, after re-sending its memory if a restart may have lost part of it and the
        position of the topic that triggered it is not known yet (see module doc)."""
        stored = decode_stored(self._table.get(userid))
        undecided = self._undecided.get(partition)
        if (
            undecided
            and stored.record is not None
            and stored.record.memory
            and userid not in self._resent[partition]
            and _triggered_by_any(stored.record, undecided)
        ):
            self._resend(partition, userid, stored, out, now_ms)
        return stored

    def _resend(self, partition: int, userid: str, stored: Stored, out: list[Outgoing], now_ms: int) -> None:
        """Re-send the user's remembered transitions from the first one a restart may have lost, and its STATE."""
        record = stored.record
        if record is None:
            return
        self._resent[partition].add(userid)
        undecided = self._undecided[partition]
        first = self._first[partition]
        # Memory is in processing order: from the first transition triggered after the last commit (or by a
        # topic whose first offset is not known yet), every later one may be lost too; the earlier ones are not.
        # A topic neither waited for nor seen (ticks without damping) has nothing waiting.
        start = next(
            (
                i
                for i, memo in enumerate(record.memory)
                if (position := parse_position(memo.trigger_delivery)) is not None
                and (position[0] in undecided or position[1] >= first.get(position[0], position[1] + 1))
            ),
            None,
        )
        if start is None:
            return
        deleted = stored.deleted_by is not None
        lost = rules.remembered(record)[start:]
        self._emit(out, userid, record, lost, True, True, now_ms, None, tombstone=deleted)

    # --- internals ------------------------------------------------------------------------------------------

    def _write(
        self,
        partition: int,
        userid: str,
        old: UserRecord | None,
        new: UserRecord,
        applied: int,
        deleted_by: str | None = None,
    ) -> None:
        """Write ``new`` over ``old`` (the live record, None for none or a marker); a marker if ``deleted_by``."""
        counts = self._counts.get(partition)
        if counts is not None:
            if old is not None:
                counts.add(old, -1)
            if deleted_by is None:
                counts.add(new, 1)
        self._table[userid] = encode_record(new, applied, self._stream_time[partition], deleted_by)
        live = deleted_by is None
        self._schedule(partition, userid, rules.next_sweep_at(new, self._config) if live else None)
        self._schedule_age(partition, userid, new if live else None)

    def _purge(self, partition: int, userid: str, deleted_by: str) -> None:
        """Remove a deleted user's marker, unless the user has come back since."""
        if decode_stored(self._table.get(userid)).deleted_by != deleted_by:
            return
        # The marker's "t" may be the partition's largest: keep the stream time (see module doc).
        self._table[f"{STREAM_TIME_KEY}{partition}"] = str(self._stream_time[partition]).encode()
        self._table.pop(userid, None)

    def _schedule(self, partition: int, userid: str, due: int | None) -> None:
        heap = self._due.get(partition)
        scheduled = self._scheduled.get(partition)
        if heap is None or scheduled is None:
            return
        if due is None:
            scheduled.pop(userid, None)
        elif scheduled.get(userid) != due:
            scheduled[userid] = due
            heapq.heappush(heap, (due, userid))
            if len(heap) > 2 * len(scheduled) + _HEAP_SLACK:
                # Superseded entries are only dropped when popped, and a due time can lie 30 days ahead
                # (user retention): rebuild from the live entries before the heap grows with every write.
                heap[:] = _heap_of(scheduled)

    def _emit(
        self,
        out: list[Outgoing],
        userid: str,
        record: UserRecord | None,
        transitions: tuple[Transition, ...],
        reemitted: bool,
        publish_state: bool,
        now_ms: int,
        received_at: int | None,
        tombstone: bool = False,
    ) -> None:
        """Queue ``transitions``, then the user's STATE: ``record`` if ``publish_state``, or a tombstone
        (``record`` is then the deleted user's final record)."""
        key = userid.encode()
        include_ip = self._config.include_client_ip
        source = self._source
        for transition in transitions:
            payload = transition.to_payload(include_ip)
            payload["emitted_at"] = now_ms
            headers = envelope.transition_headers(source, transition)
            out.append(Outgoing("transitions", key, orjson.dumps(payload), headers))
            if self._metrics:
                self._metrics.transitions.labels(transition.from_status, transition.to_status).inc()
                if received_at:
                    self._metrics.pipeline_latency.observe(max(0, now_ms - received_at) / 1000)
        if reemitted and self._metrics:
            self._metrics.reemitted.inc()
        if tombstone:
            # The final record's last transition is its deletion (S6): the tombstone is dated by it.
            marks = None
            if record is not None:
                final = record.memory[-1:]
                deleted_at = final[0].at if final else envelope.state_time(record)
                marks = envelope.tombstone_headers(source, record, deleted_at)
            out.append(Outgoing("state", key, None, marks))
        elif publish_state and record is not None:
            value = orjson.dumps(rules.state_payload(record, include_ip))
            out.append(Outgoing("state", key, value, envelope.state_headers(source, record, value)))
        else:
            return
        if self._metrics:
            self._metrics.state_updates.inc()

    def _sweep_due(
        self, partition: int, stream_time: int, now_ms: int, source: str, holds_only: bool = False
    ) -> list[Outgoing]:
        heap = self._due.get(partition)
        scheduled = self._scheduled.get(partition)
        out: list[Outgoing] = []
        if not heap or scheduled is None:
            return out
        budget = self._sweep_batch
        deferred: list[tuple[int, str]] = []
        swept: set[str] = set()
        while heap and heap[0][0] <= stream_time and budget > 0:
            entry_due, userid = heapq.heappop(heap)
            if scheduled.get(userid) != entry_due:
                continue  # superseded by a later write
            del scheduled[userid]
            if userid in swept:
                # Swept already at this stream time and by this message: sweeping it again with the same trigger
                # would take its own transitions for a redelivery's. The next message sweeps it.
                deferred.append((entry_due, userid))
                continue
            stored = self._stored(partition, userid, out, now_ms)
            record = stored.live
            if record is None:
                continue
            due = rules.next_sweep_at(record, self._config)
            if due is None:
                continue
            if holds_only and record.held is None:
                deferred.append((due, userid))
                continue
            if due > stream_time:
                # The index was behind the record: file it at its real time.
                self._schedule(partition, userid, due)
                continue
            budget -= 1
            swept.add(userid)
            new, result = rules.sweep(record, stream_time, self._config, source, releases_only=holds_only)
            if result.deleted:
                assert new is not None  # noqa: S101 - a deleting sweep returns the final record
                # The final record stays as a marker until its deletion is known to have reached Kafka (S10).
                self._write(partition, userid, record, new, stored.applied, source)
                self._markers[partition].append((userid, source))
                self._emit(out, userid, new, result.transitions, False, False, now_ms, None, tombstone=True)
                if self._metrics:
                    self._metrics.users_deleted.inc()
                markers = self._markers[partition]
                while len(markers) > self._config.deletion_memory:
                    self._purge(partition, *markers.popleft())
                continue
            if result.record_changed and new is not None:
                self._write(partition, userid, record, new, stored.applied)
            else:
                # Nothing was due after all (a tick releases holds only): keep the user in the index.
                deferred.append((due, userid))
            self._emit(out, userid, new, result.transitions, result.reemitted, result.publish_state, now_ms,
                       None)  # fmt: skip
        for due, userid in deferred:
            self._schedule(partition, userid, due)
        return out

    # --- reconciliation -------------------------------------------------------------------------------------

    def _age_due(self, record: UserRecord) -> int | None:
        """When ``record``'s user is due an ``age`` check if nothing changes (None: not while not shown online)."""
        if self._age is None or record.status != "online":
            return None
        # R4: an agreeing observation postpones the next check by the recheck interval.
        return self._age.due(record.last_seen, record.verified_at)

    def _schedule_age(self, partition: int, userid: str, record: UserRecord | None) -> None:
        index = self._age_index.get(partition)
        if index is not None:
            index.set(userid, None if record is None else self._age_due(record))

    def _on_gap(self, partition: int, marker: contract.GapMarker) -> None:
        if self._metrics:
            reason = marker.reason if marker.reason in contract.GAP_REASONS else "other"
            self._metrics.intake_gaps.labels(reason).inc()
        if self._checks is not None:
            self._ensure_index(partition)  # owned from now on, even if the marker is its first message
            self._gaps.append((partition, marker))

    def take_gaps(self) -> list[tuple[int, contract.GapMarker]]:
        """The intake-gap markers read since the last call (with their partitions), for the runtime to scan.
        Those of partitions no longer owned are left out: their new owner reads the markers it has not
        committed past."""
        gaps, self._gaps = self._gaps, []
        return [(partition, marker) for partition, marker in gaps if partition in self._due]

    def gap_candidates(
        self, partition: int, marker: contract.GapMarker, lookback_ms: int
    ) -> Iterator[tuple[str, int | None]]:
        """Every user of ``partition`` with the rank an intake gap gives them (``gap_rank``: 0 shown online since
        before the gap, 1 heard of shortly before or during it, None not worth a check), in table order. One
        pass over the partition's records; a generator, so the caller can pause between records."""
        for userid, value in self._records_of_partition(partition):
            if not is_user_key(userid):
                continue
            stored = decode_stored(value)
            record = stored.record
            if record is None or stored.deleted_by is not None:
                continue
            online = record.status == "online"
            since = min((s.since for s in record.sessions.values() if s.status == "online"), default=None)
            yield (
                userid,
                gap_rank(
                    shown_online=online,
                    online_since_ms=since,
                    last_event_ms=record.last_seen,
                    gap_start_ms=marker.start,
                    gap_end_ms=marker.end,
                    lookback_ms=lookback_ms,
                    # Rank 2, users heard of within max_silence: with age checks off, none.
                    recent_ms=None if self._age is None else self._age.max_silence_ms,
                ),
            )

    def age_checks(self, now_ms: int, limit: int = 10_000) -> int:
        """Offer an ``age`` check of every indexed user shown online whose silence reached ``max_silence`` by
        ``now_ms`` (wall clock: a quiet partition's stream time stands still, and a ghost is silent by
        definition); at most ``limit`` per call. Each offered user is filed again one recheck interval later
        (the queue skips a user checked within it), so a user who stays online and silent is offered once per
        interval. Returns how many were offered."""
        age, checks = self._age, self._checks
        if age is None or checks is None:
            return 0
        offered = 0
        for index in self._age_index.values():
            for userid in index.pop_due(now_ms, limit - offered):
                record = decode_record(self._table.get(userid))
                due = None if record is None else self._age_due(record)
                if due is None:
                    continue
                if due > now_ms:
                    index.set(userid, due)  # the index was behind the record
                    continue
                checks.offer(userid, "age")
                offered += 1
                index.set(userid, now_ms + age.recheck_interval_ms)
            if offered >= limit:
                break
        return offered

    def publish_gauges(self) -> None:
        """Set the users/sessions gauges from the per-partition counts (called periodically, not per event)."""
        self._publish_gauges()

    def _publish_gauges(self) -> None:
        if self._metrics is None:
            return
        total = _Counts()
        for counts in self._counts.values():
            total.merge(counts)
        m = self._metrics
        m.users.set(total.users)
        m.online_users.set(total.online_users)
        m.sessions.set(total.sessions)
        for platform, count in total.online_by_platform.items():
            m.online_sessions.labels(platform).set(count)


def _committed_below(position: str, kind: str, first: int) -> bool:
    parsed = parse_position(position)
    return parsed is not None and parsed[0] == kind and parsed[1] < first


def _heap_of(scheduled: Mapping[str, int]) -> list[tuple[int, str]]:
    """The sweep index holding exactly the live entries: (due time, userid), earliest first."""
    heap = [(due, userid) for userid, due in scheduled.items()]
    heapq.heapify(heap)
    return heap


class _DueIndex:
    """Users by due time: a heap with at most one live entry per user (stale entries are skipped when popped
    and dropped when the heap outgrows twice the live ones)."""

    __slots__ = ("heap", "due")

    def __init__(self) -> None:
        self.heap: list[tuple[int, str]] = []
        self.due: dict[str, int] = {}

    def set(self, userid: str, due: int | None) -> None:
        if due is None:
            self.due.pop(userid, None)
            return
        if self.due.get(userid) == due:
            return
        self.due[userid] = due
        heapq.heappush(self.heap, (due, userid))
        if len(self.heap) > 2 * len(self.due) + _HEAP_SLACK:
            self.heap[:] = _heap_of(self.due)

    def pop_due(self, now: int, limit: int) -> list[str]:
        """Remove and return up to ``limit`` users due at or before ``now``, earliest first."""
        out: list[str] = []
        heap, due = self.heap, self.due
        while heap and heap[0][0] <= now and len(out) < limit:
            at, userid = heapq.heappop(heap)
            if due.get(userid) == at:
                del due[userid]
                out.append(userid)
        return out

    def __len__(self) -> int:
        return len(self.due)


class _Counts:
    __slots__ = ("users", "online_users", "sessions", "online_by_platform")

    def __init__(self) -> None:
        self.users = 0
        self.online_users = 0
        self.sessions = 0
        self.online_by_platform: dict[str, int] = {}

    def add(self, record: UserRecord, sign: int) -> None:
        self.users += sign
        if record.status == "online":
            self.online_users += sign
        self.sessions += sign * len(record.sessions)
        for session in record.sessions.values():
            if session.status == "online":
                label = platform_label(session.os)
                self.online_by_platform[label] = self.online_by_platform.get(label, 0) + sign

    def add_summary(self, summary: list[Any]) -> None:
        """:meth:`add` of the summarised record (sign 1)."""
        self.users += 1
        self.online_users += summary[_S_ONLINE]
        self.sessions += summary[_S_SESSIONS]
        by_platform = self.online_by_platform
        for label in summary[_S_PLATFORMS:]:
            # Labelled again: a platform the metrics no longer know counts as "other", as a new write would.
            label = platform_label(label)
            by_platform[label] = by_platform.get(label, 0) + 1

    def merge(self, other: _Counts) -> None:
        self.users += other.users
        self.online_users += other.online_users
        self.sessions += other.sessions
        for label, count in other.online_by_platform.items():
            self.online_by_platform[label] = self.online_by_platform.get(label, 0) + count


def state_of(table: Mapping[str, bytes], userid: str, include_client_ip: bool) -> dict[str, Any] | None:
    """The user's record as published on STATE (Q1), or None if the table has none."""
    if len(userid) > MAX_USERID_LENGTH or not is_user_key(userid):
        return None
    record = decode_record(table.get(userid))
    return None if record is None else rules.state_payload(record, include_client_ip)
