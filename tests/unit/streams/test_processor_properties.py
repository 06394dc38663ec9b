"""S10 at the processor: a crash at any instant, then a restart from the last commit, loses no transition.

A partition's traffic (several users, sweep releases and deletions in stream time, ticks on idle stretches) runs
once without interruption. Then the same traffic runs with a crash: the table keeps any prefix of its writes
that includes everything before the last commit; TRANSITIONS and STATE keep everything sent before the commit
and any prefix of what was sent after it (one partition: what reached Kafka is a prefix); a new processor starts
on that table and takes the messages again from the commit on, as Faust does. A consumer reading what reached
Kafka, deduplicating by ``(epoch, seq)`` as docs/consuming.md says, must never see a gap, and must end where the
query API ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.processor import Outgoing, Processor, state_of
from streams.rules import PresenceConfig

T0 = 1_700_000_000_000
SECOND = 1000
USERS = ["u0", "u1", "u2", "u3"]
CODES = {"online": 0, "offline": 1, "logout": 2}
PROPS = settings(max_examples=200, deadline=None)


@dataclass(frozen=True)
class Message:
    topic: str  # "raw" or "tick"
    offset: int
    now_ms: int
    value: bytes | None = None
    key: bytes | None = None


@st.composite
def traffic(draw: st.DrawFn, ticks: bool) -> list[Message]:
    """Users connecting and disconnecting, with quiet spells longer than the user retention in between."""
    messages: list[Message] = []
    raw_offset = tick_offset = 0
    clock = T0
    for _ in range(draw(st.integers(1, 40))):
        clock += draw(st.one_of(st.integers(0, 3 * SECOND), st.integers(5 * SECOND, 40 * SECOND)))
        if ticks and draw(st.integers(0, 3)) == 0:
            messages.append(Message("tick", tick_offset, clock))
            tick_offset += 1
            continue
        user = draw(st.sampled_from(USERS))
        status = draw(st.sampled_from(["online", "offline", "logout"]))
        session = f"{user}-{draw(st.integers(0, 2))}"
        at = clock - draw(st.one_of(st.just(0), st.integers(0, 2 * SECOND)))  # a little late at times
        value = orjson.dumps({"schema": 1, "userid": user, "status": CODES[status], "time": at,
                              "sessionId": session, "os": "iOS", "clientIp": None, "received_at": at,
                              "delivery_id": "d"})  # fmt: skip
        messages.append(Message("raw", raw_offset, clock, value, user.encode()))
        raw_offset += 1
    return messages


configs = st.builds(
    PresenceConfig,
    ended_session_retention_ms=st.sampled_from([5 * SECOND, 20 * SECOND]),
    user_retention_ms=st.sampled_from([15 * SECOND, 30 * SECOND]),
    offline_grace_ms=st.sampled_from([0, 4 * SECOND]),
    transition_memory=st.just(8),
)


class RecordingTable(dict[str, Any]):
    """A table that logs its writes in order: (message index, key, value or None for a delete)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[int, str, Any]] = []
        self.message = 0

    def __setitem__(self, key: str, value: Any) -> None:
        self.writes.append((self.message, key, value))
        super().__setitem__(key, value)

    def pop(self, key: str, default: Any = None) -> Any:
        if key in self:
            self.writes.append((self.message, key, None))
        return super().pop(key, default)


@dataclass
class Run:
    table: dict[str, Any]
    outputs: list[list[Outgoing]] = field(default_factory=list)


def process(processor: Processor, messages: list[Message], table: dict[str, Any], start: int = 0) -> Run:
    run = Run(table)
    for index, m in enumerate(messages[start:], start):
        if isinstance(table, RecordingTable):
            table.message = index
        if m.topic == "raw":
            run.outputs.append(processor.on_raw(0, m.offset, m.key, m.value, m.now_ms))
        else:
            run.outputs.append(processor.on_tick(0, m.offset, m.now_ms))
    return run


def new_processor(table: dict[str, Any], config: PresenceConfig) -> Processor:
    return Processor(table, config, lambda p: list(table.items()) if p == 0 else [])


def transitions(outputs: list[Outgoing]) -> Iterator[dict[str, Any]]:
    for o in outputs:
        if o.topic == "transitions" and o.value is not None:
            payload = orjson.loads(o.value)
            del payload["emitted_at"]
            yield payload


class Follower:
    """A consumer of TRANSITIONS alone, deduplicating by ``(epoch, seq)`` as docs/consuming.md describes; counts
    gaps. ``remembers_deletions``: it keeps the epochs deletions closed and drops anything of them that comes
    again (a repeat sent after a restart may span several epochs); otherwise it forgets a deleted user and may
    take such a repeat for news until the repeated deletion follows (every re-send runs to the user's latest
    transition)."""

    def __init__(self, remembers_deletions: bool) -> None:
        self.remembers_deletions = remembers_deletions
        self.users: dict[str, tuple[str, int, int]] = {}  # userid -> (status, epoch, seq)
        self.closed: dict[str, set[int]] = {}  # userid -> the epochs deletions closed
        self.gaps: list[str] = []

    def see(self, t: dict[str, Any]) -> None:
        userid, cur = t["userid"], self.users.get(t["userid"])
        deleted = t["cause"]["event"] == "deleted"
        if t["epoch"] in self.closed.get(userid, ()):
            return  # a repeat from an epoch that has ended
        if cur is None:
            if deleted:
                return  # the deletion of a user already forgotten
            if t["seq"] != 1:
                self.gaps.append(f"{userid}: {t['epoch']}/{t['seq']} on nothing")
        elif t["epoch"] == cur[1]:
            if t["seq"] <= cur[2]:
                return  # a repeat
            if t["seq"] != cur[2] + 1 or t["from"] != cur[0]:
                self.gaps.append(f"{userid}: {t['epoch']}/{t['seq']} after {cur}")
        elif t["seq"] != 1:
            self.gaps.append(f"{userid}: {t['epoch']}/{t['seq']} after {cur}")
        if deleted:
            self.users.pop(userid, None)
            if self.remembers_deletions:
                self.closed.setdefault(userid, set()).add(t["epoch"])
        else:
            self.users[userid] = (t["to"], t["epoch"], t["seq"])

    def status(self, userid: str) -> str:
        cur = self.users.get(userid)
        return "offline" if cur is None else cur[0]


def last_state(outputs: list[Outgoing]) -> dict[str, Any]:
    final: dict[str, Any] = {}
    for o in outputs:
        if o.topic == "state":
            final[(o.key or b"").decode()] = None if o.value is None else orjson.loads(o.value)
    return final


def crash_and_restart(
    messages: list[Message], config: PresenceConfig, data: st.DataObject, lose_writes: bool = True
) -> tuple[Run, list[Outgoing], list[Outgoing], Run, int]:
    """The uninterrupted run, what reached Kafka before the crash, what the restart sent, and the restart."""
    table = RecordingTable()
    clean = process(new_processor(table, config), messages, table)
    crash = data.draw(st.integers(0, len(messages) - 1), label="crashed after message")
    commit = data.draw(st.integers(0, crash + 1), label="committed up to (excluded)")
    # Table writes of the committed messages are acknowledged; later ones reached the changelog as a prefix.
    committed_writes = sum(1 for w in table.writes if w[0] < commit)
    written = sum(1 for w in table.writes if w[0] <= crash)
    kept = (
        data.draw(st.integers(committed_writes, written), label="table writes kept")
        if lose_writes
        else written
    )
    restored: dict[str, Any] = {}
    for _, key, value in table.writes[:kept]:
        if value is None:
            restored.pop(key, None)
        else:
            restored[key] = value
    before = [o for out in clean.outputs[:commit] for o in out]
    unacked = [o for out in clean.outputs[commit : crash + 1] for o in out]
    sent_t = [o for o in unacked if o.topic == "transitions"]
    sent_s = [o for o in unacked if o.topic == "state"]
    reached = (
        before
        + sent_t[: data.draw(st.integers(0, len(sent_t)), label="transitions kept")]
        + sent_s[: data.draw(st.integers(0, len(sent_s)), label="states kept")]
    )
    restart = process(new_processor(restored, config), messages, restored, commit)
    return clean, reached, [o for out in restart.outputs for o in out], restart, crash


@PROPS
@given(traffic(ticks=False), configs, st.data())
def test_s10_a_crash_anywhere_loses_nothing_and_repeats_identically(
    messages: list[Message], config: PresenceConfig, data: st.DataObject
) -> None:
    """Without ticks the restart must reproduce the uninterrupted run exactly, releases and deletions included."""
    clean, reached, resent, restart, _ = crash_and_restart(messages, config, data)
    expected = {(t["userid"], t["epoch"], t["seq"]): t for out in clean.outputs for t in transitions(out)}
    got: dict[tuple[str, int, int], dict[str, Any]] = {}
    follower, forgetful = Follower(remembers_deletions=True), Follower(remembers_deletions=False)
    for t in transitions(reached + resent):
        key = (t["userid"], t["epoch"], t["seq"])
        assert got.setdefault(key, t) == t, f"a repeat of {key} differs"
        follower.see(t)
        forgetful.see(t)
    assert got == expected
    assert follower.gaps == []
    # STATE (compacted: the last message per key) ends as the uninterrupted run's, and so does the query API.
    assert last_state(reached + resent) == last_state([o for out in clean.outputs for o in out])
    for user in USERS:
        assert state_of(restart.table, user, True) == state_of(clean.table, user, True)
        record = state_of(restart.table, user, True)
        answer = "offline" if record is None else record["status"]
        assert follower.status(user) == forgetful.status(user) == answer


@PROPS
@given(traffic(ticks=True), configs, st.data())
def test_s10_a_crash_anywhere_resends_what_ticks_released(
    messages: list[Message], config: PresenceConfig, data: st.DataObject
) -> None:
    """With ticks (wall-clock releases on idle stretches) the restart may release at other instants, so only
    this is required: every transition sent before the crash is sent again if it did not reach Kafka, identical;
    the consumer sees no gap and ends where the query API ends.

    The table keeps every write made before the crash here: a tick's release recomputed after a lost write may
    come at another instant or not at all (the one non-deterministic edge, docs/stream-rules.md S8).
    """
    clean, reached, resent, restart, crash = crash_and_restart(messages, config, data, lose_writes=False)
    sent_before_crash = {
        (t["userid"], t["epoch"], t["seq"]): t for out in clean.outputs[: crash + 1] for t in transitions(out)
    }
    got: dict[tuple[str, int, int], dict[str, Any]] = {}
    follower, forgetful = Follower(remembers_deletions=True), Follower(remembers_deletions=False)
    for t in transitions(reached + resent):
        key = (t["userid"], t["epoch"], t["seq"])
        assert got.setdefault(key, t) == t, f"a repeat of {key} differs"
        follower.see(t)
        forgetful.see(t)
    for key, t in sent_before_crash.items():
        assert got.get(key) == t, f"{key} was lost"
    assert follower.gaps == []
    for user in USERS:
        record = state_of(restart.table, user, True)
        answer = "offline" if record is None else record["status"]
        assert follower.status(user) == forgetful.status(user) == answer
