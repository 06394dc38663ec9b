"""The record's summary at the head of every table value: what rebuilding a partition's indexes after a restart
reads instead of decoding each record whole (the S6/S8 sweep index, the R4 age index, the gauges, stream time and
S10's re-sends), and compatibility both ways with values written by the previous release (no summary).

The previous release's encoding is kept here verbatim (:func:`previous_encoding`): a new value minus its summary is
byte for byte what it wrote, so it reads new values unchanged; and a table it wrote (or a changelog it filled,
restored as is) gives a restarted worker exactly the indexes, and then the outputs, of a table written with
summaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from core.contract import Observation, encode_observation
from streams import processor as proc
from streams import rules
from streams.processor import (
    RAW,
    TICK,
    Outgoing,
    Processor,
    _Counts,
    _summary_sweep_at,
    _summary_triggered_at_or_after,
    _triggered_at_or_after,
    decode_stored,
    encode_record,
    is_user_key,
    read_summary,
    summarize,
)
from streams.reconcile import AgePolicy
from streams.rules import PresenceConfig, UserRecord, next_sweep_at
from tests.unit.streams.test_processor_reconcile import Recorder

T0 = 1_700_000_000_000
SECOND = 1000
USERS = ["u0", "u1", "u2", "u3", "u4"]
CODES = {"online": 0, "offline": 1, "logout": 2}
# A client's os is any string: one holding "]" and a quote must not end the summary early.
OSES = ["iOS", "PC", "Android", 'we]ird"os']
AGE = AgePolicy(max_silence_ms=20 * SECOND, recheck_interval_ms=7 * SECOND)
PROPS = settings(max_examples=150, deadline=None)


def previous_encoding(
    record: UserRecord, applied_offset: int = -1, stream_time: int = 0, deleted_by: str | None = None
) -> bytes:
    """The table value as the release before the summary wrote it (its ``encode_record``, verbatim)."""
    data = rules.record_to_dict(record)
    data["o"] = applied_offset
    data["t"] = stream_time
    if deleted_by is not None:
        data["x"] = deleted_by
    return orjson.dumps(data)


def as_previous(value: bytes) -> bytes:
    """``value`` as the previous release would have written it: the same JSON object without the summary."""
    data = orjson.loads(value)
    del data["i"]
    return orjson.dumps(data)


@dataclass(frozen=True)
class Message:
    topic: str  # "raw" or "tick"
    offset: int
    now_ms: int
    value: bytes | None = None
    key: bytes | None = None


@st.composite
def traffic(draw: st.DrawFn) -> list[Message]:
    """Events, RongCloud's observations (R2-R4) and ticks, with quiet spells beyond the retentions: records with
    holds, ended sessions, synthetic online users, verified ones, deleted users' markers and users reborn."""
    messages: list[Message] = []
    raw_offset = tick_offset = 0
    clock = T0
    for _ in range(draw(st.integers(1, 50))):
        clock += draw(st.one_of(st.integers(0, 3 * SECOND), st.integers(5 * SECOND, 40 * SECOND)))
        kind = draw(st.integers(0, 9))
        if kind == 0:
            messages.append(Message("tick", tick_offset, clock))
            tick_offset += 1
            continue
        user = draw(st.sampled_from(USERS))
        if kind == 1:
            at = clock - draw(st.integers(0, 2 * SECOND))
            value = encode_observation(Observation(user, draw(st.booleans()), at, "age", answered_at=clock))
        else:
            status = draw(st.sampled_from(["online", "offline", "logout"]))
            at = clock - draw(st.one_of(st.just(0), st.integers(0, 2 * SECOND)))
            value = orjson.dumps({"schema": 1, "userid": user, "status": CODES[status], "time": at,
                                  "sessionId": f"{user}-{draw(st.integers(0, 2))}", "os": draw(st.sampled_from(OSES)),
                                  "clientIp": None, "received_at": at, "delivery_id": "d"})  # fmt: skip
        messages.append(Message("raw", raw_offset, clock, value, user.encode()))
        raw_offset += 1
    return messages


configs = st.builds(
    PresenceConfig,
    ended_session_retention_ms=st.sampled_from([5 * SECOND, 20 * SECOND]),
    user_retention_ms=st.sampled_from([15 * SECOND, 30 * SECOND]),
    offline_grace_ms=st.sampled_from([0, 4 * SECOND]),
    transition_memory=st.just(8),
    deletion_memory=st.sampled_from([1, 100]),
    reconcile_margin_ms=st.just(1 * SECOND),
)


class Recording(dict[str, Any]):
    """A table keeping every value ever written, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    def __setitem__(self, key: str, value: Any) -> None:
        if is_user_key(key):
            self.written.append(value)
        super().__setitem__(key, value)


def new_processor(table: dict[str, Any], config: PresenceConfig, checks: Recorder | None = None) -> Processor:
    # In key order, as RocksDB scans.
    processor = Processor(table, config, lambda p: sorted(table.items()) if p == 0 else [])
    processor.enable_reconciliation(checks or Recorder(), AGE)
    return processor


def process(processor: Processor, messages: list[Message]) -> list[Outgoing]:
    """Each message, then the age checks due by its wall clock (R4, from the age index)."""
    out: list[Outgoing] = []
    for m in messages:
        if m.topic == "raw":
            out.extend(processor.on_raw(0, m.offset, m.key, m.value, m.now_ms))
        else:
            out.extend(processor.on_tick(0, m.offset, m.now_ms))
        processor.age_checks(m.now_ms)
    return out


def indexes(processor: Processor) -> dict[str, Any]:
    """Everything the rebuild of partition 0 built, comparable."""
    counts = processor._counts[0]
    return {
        "scheduled": dict(processor._scheduled[0]),
        "heap": sorted(processor._due[0]),
        "stream_time": processor._stream_time[0],
        "counts": (counts.users, counts.online_users, counts.sessions, dict(counts.online_by_platform)),
        "age": dict(processor._age_index[0].due),
        "markers": list(processor._markers[0]),
    }


@PROPS
@given(traffic(), configs)
def test_a_value_is_the_previous_releases_value_with_a_summary_in_front(
    messages: list[Message], config: PresenceConfig
) -> None:
    table = Recording()
    process(new_processor(table, config), messages)
    for value in table.written:
        assert value.startswith(b'{"i":[')
        stored = decode_stored(value)
        assert stored.record is not None
        previous = previous_encoding(stored.record, stored.applied, stored.stream_time, stored.deleted_by)
        # The previous release reads the value as it wrote it (it ignores "i"): rolling upgrades, roll-backs.
        assert as_previous(value) == previous
        # ... and this release reads what the previous one wrote: the same record, the same summary.
        assert decode_stored(previous) == stored
        assert read_summary(previous) == read_summary(value)
        assert read_summary(value) == summarize(stored.record, stored.stream_time, stored.deleted_by)


@PROPS
@given(traffic(), configs, configs)
def test_the_summary_gives_what_the_rules_give_of_the_whole_record(
    messages: list[Message], config: PresenceConfig, restarted_with: PresenceConfig
) -> None:
    """S6/S8 due times, S10 triggers, R4 age due times and gauges, from the summary and from the record; the
    due times under the settings written with and under changed retentions (the summary holds no due time)."""
    table = Recording()
    process(new_processor(table, config), messages)
    age_reader = new_processor({}, config)
    for value in table.written:
        stored = decode_stored(value)
        record = stored.record
        assert record is not None
        summary = read_summary(value)
        for settings_ in (config, restarted_with):
            assert _summary_sweep_at(summary, settings_) == next_sweep_at(record, settings_)
        for kind in (RAW, TICK):
            for first in range(0, 60):
                assert _summary_triggered_at_or_after(summary, kind, first) == (
                    bool(record.memory) and _triggered_at_or_after(record, kind, first)
                )
        whole, summed = _Counts(), _Counts()
        whole.add(record, 1)
        summed.add_summary(summary)
        assert (whole.users, whole.online_users, whole.sessions, whole.online_by_platform) == (
            summed.users,
            summed.online_users,
            summed.sessions,
            summed.online_by_platform,
        )
        age_due = (
            AGE.due(summary[proc._S_LAST_SEEN], summary[proc._S_VERIFIED_AT])
            if summary[proc._S_ONLINE]
            else None
        )
        assert age_due == age_reader._age_due(record)
        assert bool(summary[proc._S_MARKER]) == (stored.deleted_by is not None)


@PROPS
@given(traffic(), configs, st.data())
def test_s6_s8_s10_a_restart_on_the_previous_releases_table_gives_what_a_restart_on_summaries_gives(
    messages: list[Message], config: PresenceConfig, data: st.DataObject
) -> None:
    """Stop after any message; restart on the table as written (summaries), as the previous release would have
    written it, and mixed (a table half rewritten since an upgrade): the same indexes, then the same outputs,
    re-sends (S10), sweeps (S6, S8) and the age checks offered (R4) included, and the same table at the end."""
    stop = data.draw(st.integers(0, len(messages)), label="stopped after")
    table: dict[str, Any] = {}
    process(new_processor(table, config), messages[:stop])
    tables = {
        "summaries": dict(table),
        "previous": {k: as_previous(v) if is_user_key(k) else v for k, v in table.items()},
        "mixed": {
            k: as_previous(v) if is_user_key(k) and n % 2 else v for n, (k, v) in enumerate(table.items())
        },
    }
    rest = messages[stop:]
    results: dict[str, Any] = {}
    for name, restored in tables.items():
        checks = Recorder()
        restarted = new_processor(restored, config, checks)
        restarted.ensure_indexed([0])
        built = indexes(restarted)
        out = process(restarted, rest)
        final = {k: decode_stored(v) if is_user_key(k) else v for k, v in restored.items()}
        results[name] = (built, out, final, [(userid, source) for userid, source, _ in checks.offers])
    assert results["previous"] == results["summaries"]
    assert results["mixed"] == results["summaries"]


def test_a_summary_of_another_layout_is_not_trusted_the_record_is_decoded_whole() -> None:
    table: dict[str, Any] = {}
    process(new_processor(table, PresenceConfig()), [
        Message("raw", 0, T0, orjson.dumps({"schema": 1, "userid": "u0", "status": 0, "time": T0, "sessionId": "s",
                                           "os": "iOS", "clientIp": None, "received_at": T0, "delivery_id": "d"}),
                b"u0"),
    ])  # fmt: skip
    value = table["u0"]
    stored = decode_stored(value)
    assert stored.record is not None
    future = value.replace(b'{"i":[1,', b'{"i":[2,', 1)
    assert future != value
    assert read_summary(future) == summarize(stored.record, stored.stream_time)
    # A value without a record's summary head at all (the previous release's) is decoded whole too.
    assert read_summary(as_previous(value)) == read_summary(value)
    assert encode_record(stored.record, stored.applied, stored.stream_time) == value
