"""A batch of RAW records processed as a batch gives exactly what processing them one by one gives (S1-S10).

The subject is the agent's path minus Kafka: the users table of a real Faust app (RocksDB in a temporary
directory) with its batch overlay, ``Processor.on_batch`` with the S10 transition tally, one ``WriteBatch`` and
one changelog record per key written. The reference is ``Processor.on_raw`` record by record over a plain dict.
The generated streams hold upstream events, observations (R2-R5), intake-gap markers, invalid records, sweeps
that release and delete users, restarts (with the records since an earlier point delivered again, so S10's
re-sends run) and batches discarded part-way (the agent's failure path).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import contract
from streams.config import WorkerSettings
from streams.metrics import WorkerMetrics
from streams.processor import MAX_TRANSITIONS_PER_RECORD, Outgoing, Processor, TransitionTally
from streams.reconcile import AgePolicy, Offer
from streams.runtime.app import Worker, create_app

T0 = 1_700_000_000_000
MIN = 60_000
USERS = ["u1", "u2", "u3"]
PARTITION = 1


def raw(userid: str, session: str, status: int, at: int) -> bytes:
    return orjson.dumps({"schema": 1, "userid": userid, "status": status, "time": at, "sessionId": session,
                         "os": "iOS", "clientIp": "1.2.3.4:5", "received_at": at, "delivery_id": "d"})  # fmt: skip


Record = tuple[int, bytes | None, bytes | None]
#: One step of a run: ("batch", records), ("abort", records): a batch processed and then discarded (its table
#: writes aborted, its outputs never sent; only the batch side sees it), or ("restart", []): every partition
#: forgotten, as after a crash or a rebalance.
Step = tuple[str, list[Record]]


def observation(userid: str, online: bool, at: int) -> bytes:
    return contract.encode_observation(contract.Observation(userid, online, at, "age", at + 100))


def gap(at: int) -> bytes:
    return contract.encode_gap_marker(contract.GapMarker(f"g{at}", "gw-1", "error_answer", at - 5_000, at))


@st.composite
def records(draw: st.DrawFn) -> list[Record]:
    """RAW records of a few users: sessions opening and ending out of order, duplicates, invalid records,
    observations agreeing or not with the events, intake-gap markers, and event times spread far enough for
    retention sweeps (deletions) and held offlines to happen inside the run."""
    out: list[Record] = []
    t = T0
    for offset in range(draw(st.integers(1, 60))):
        user = draw(st.sampled_from(USERS))
        t += draw(st.sampled_from([0, 1_000, MIN, 20 * MIN]))
        kind = draw(st.integers(0, 23))
        if kind == 0:
            out.append((offset, user.encode(), b"not json"))
            continue
        if kind in (1, 2):
            at = t - draw(st.sampled_from([0, 30_000, 5 * MIN]))
            out.append((offset, user.encode(), observation(user, draw(st.booleans()), at)))
            continue
        if kind == 3:
            out.append((offset, None, gap(t)))
            continue
        session = f"s{draw(st.integers(0, 2))}"
        status = draw(st.sampled_from([0, 1, 2]))
        # Now and then far older than the ended-session horizon: too late (R5).
        at = t - draw(st.sampled_from([0, 0, 30_000, 5 * MIN, 15 * MIN]))
        out.append((offset, user.encode(), raw(user, session, status, at)))
    return out


def _config_env() -> dict[str, Any]:
    # Short windows so that S6 retention and S8 holds act within a generated run; a small memory so cuts happen.
    return {
        "worker_offline_grace_seconds": 30,
        "worker_ended_session_retention_seconds": 600,
        "worker_user_retention_seconds": 1800,
        "worker_transition_memory": MAX_TRANSITIONS_PER_RECORD + 1,
    }


class Subject:
    """One Faust app reused across examples (building one costs most of a second); :meth:`reset` empties it."""

    def __init__(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="batches-"))
        self.settings = WorkerSettings(
            kafka_bootstrap_servers="127.0.0.1:9",
            worker_data_dir=directory / "state",
            worker_app_id="unit-worker",
            topic_partitions=4,
            **_config_env(),
        )
        self.worker: Worker = create_app(self.settings)

    def reset(self) -> None:
        table = self.worker.table
        table._pending.clear()
        for key, _ in list(table.records(PARTITION)):
            table.partition = PARTITION
            del table[key]
        table._pending.clear()
        self.checks = Checks()
        self.worker.processor.enable_reconciliation(self.checks, AGE)
        self.worker.processor.take_gaps()


class Checks:
    """The checker's side of reconciliation: records every offer."""

    def __init__(self) -> None:
        self.offers: list[tuple[str, str, int, int | None, str | None]] = []

    def offer(
        self,
        userid: str,
        source: contract.ObservationSource,
        *,
        rank: int = 0,
        fresh_after: int | None = None,
        gap: str | None = None,
    ) -> Offer:
        self.offers.append((userid, source, rank, fresh_after, gap))
        return "queued"


AGE = AgePolicy(max_silence_ms=10 * MIN, recheck_interval_ms=5 * MIN)


_SUBJECT: list[Subject] = []


def subject() -> Subject:
    if not _SUBJECT:
        _SUBJECT.append(Subject())
    _SUBJECT[0].reset()
    return _SUBJECT[0]


def in_batches(
    worker: Worker, steps: list[Step], now: list[int], tally: TransitionTally | None = None
) -> tuple[list[Outgoing], list[list[tuple[bytes, bytes | None]]], int]:
    """The agent's loop for RAW batches (streams.runtime.app), sends replaced by collecting; every cut counts as
    acknowledged at once. Returns the outputs, the changelog records of each written segment, and the cuts.
    With a ``tally``, checks after every segment that no user has more transitions in flight than it remembers."""
    table, processor = worker.table, worker.processor
    memory = worker.settings.worker_transition_memory
    tally = tally or TransitionTally()
    out: list[Outgoing] = []
    segments: list[list[tuple[bytes, bytes | None]]] = []
    cuts = 0
    for (step, batch), batch_now in zip(steps, now, strict=True):
        if step == "restart":
            processor.forget_all()
            tally.clear()
            continue
        start = 0
        while start < len(batch):
            table.begin_batch(PARTITION)
            processor.checkpoint(PARTITION)
            produced, done = processor.on_batch(PARTITION, batch[start:], batch_now, tally)
            assert tally.top <= memory, "no user has more transitions in flight than its record remembers"
            if step == "abort":
                table.abort_batch()
                processor.rebuild(PARTITION)
                tally.clear()
                break
            table.end_batch()
            segments.append([(key, value) for key, value, _ in table._pending])
            table._pending.clear()
            out.extend(produced)
            start += done
            assert done > 0 or produced, "a segment always makes progress"
            if start < len(batch):
                cuts += 1
            tally.clear()  # acknowledged
    return out, segments, cuts


def one_by_one(
    settings_: WorkerSettings, steps: list[Step], now: list[int]
) -> tuple[list[Outgoing], dict[str, Any], Processor, Checks]:
    table: dict[str, Any] = {}
    # In key order, as RocksDB scans: a restart re-sends users in the order of the scan.
    processor = Processor(
        table,
        settings_.presence_config(),
        lambda p: sorted(table.items()) if p == PARTITION else [],
        source=settings_.worker_app_id,
    )
    checks = Checks()
    processor.enable_reconciliation(checks, AGE)
    out: list[Outgoing] = []
    for (step, batch), batch_now in zip(steps, now, strict=True):
        if step == "restart":
            processor.forget_all()
        elif step == "batch":
            for offset, key, value in batch:
                out.extend(processor.on_raw(PARTITION, offset, key, value, batch_now))
    return out, table, processor, checks


@st.composite
def split(draw: st.DrawFn) -> tuple[list[Step], list[int]]:
    stream = draw(records())
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=4))))
    bounds = [0, *[c for c in cuts if c < len(stream)], len(stream)]
    steps: list[Step] = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        if b <= a:
            continue
        if a > 0 and draw(st.integers(0, 3)) == 0:
            # A restart: the records since an earlier point (the last commit) are delivered again first.
            steps.append(("restart", []))
            steps.append(("batch", stream[draw(st.integers(0, a)) : a]))
        if draw(st.integers(0, 5)) == 0:
            steps.append(("abort", stream[a:b]))
        steps.append(("batch", stream[a:b]))
    now = [T0 + 3_600_000 + i for i in range(len(steps))]
    return steps, now


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(split())
def test_s10_a_batch_gives_what_its_records_one_by_one_give(case: tuple[list[Step], list[int]]) -> None:
    steps, now = case
    s = subject()
    out, segments, _ = in_batches(s.worker, steps, now)
    expected_out, expected_table, reference, expected_checks = one_by_one(s.settings, steps, now)

    assert out == expected_out
    assert dict(s.worker.table.records(PARTITION)) == expected_table
    # Observations' and events' reasons for a check (R5), and the intake gaps set aside for a scan, match too
    # (a discarded batch offers its too-late users and sets its markers aside once more: harmless repeats).
    batch_gaps = s.worker.processor.take_gaps()
    expected_gaps = reference.take_gaps()
    assert set(s.checks.offers) == set(expected_checks.offers)
    assert {g for _, g in batch_gaps} == {g for _, g in expected_gaps}
    if not any(step == "abort" for step, _ in steps):
        assert s.checks.offers == expected_checks.offers and batch_gaps == expected_gaps
    for segment in segments:
        keys = [key for key, _ in segment]
        assert len(keys) == len(set(keys)), "one changelog record per key written in a segment"
    # Replaying the changelog (what a restore does) ends in the table's state: each key's last value.
    replayed: dict[str, Any] = {}
    for segment in segments:
        for key, value in segment:
            if value is None:
                replayed.pop(key.decode(), None)
            else:
                replayed[key.decode()] = value
    assert replayed == expected_table


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(split())
def test_s10_no_user_is_sent_more_transitions_than_its_memory_between_acknowledgements(
    case: tuple[list[Step], list[int]],
) -> None:
    steps, now = case
    s = subject()
    in_batches(s.worker, steps, now, TransitionTally())  # asserts the bound after every segment


def test_a_batch_reads_its_own_writes_and_deletes_before_rocksdb(worker: Worker) -> None:
    table = worker.table
    table.partition = 2
    table["kept"] = b"old"
    table["gone"] = b"old"
    table._pending.clear()

    table.begin_batch(2)
    table["kept"] = b"new-1"
    table["kept"] = b"new-2"
    del table["gone"]
    table["added"] = b"a"
    assert table.get("kept") == b"new-2" and table.get("gone") is None and table["added"] == b"a"
    assert dict(table.records(2)) == {"kept": b"old", "gone": b"old"}, (
        "nothing reaches RocksDB before the end"
    )
    assert table._pending == []

    assert table.end_batch() == 3
    assert dict(table.records(2)) == {"kept": b"new-2", "added": b"a"}
    assert sorted(table._pending) == [(b"added", b"a", 2), (b"gone", None, 2), (b"kept", b"new-2", 2)]
    # Outside a batch, Faust's own store API sees the batch's writes.
    assert worker.table._table.data[b"kept"] == b"new-2"


def test_an_aborted_batch_writes_nothing(worker: Worker) -> None:
    table = worker.table
    table.begin_batch(0)
    table["u1"] = b"v"
    table.abort_batch()
    assert table.get("u1") is None and list(table.records(0)) == [] and table._pending == []


@pytest.fixture
def many_users_batch() -> Iterator[list[tuple[int, bytes | None, bytes | None]]]:
    yield [(i, b"u1", raw("u1", "s0", 0 if i % 2 == 0 else 1, T0 + i * 1000)) for i in range(40)]


def test_s10_a_batch_is_cut_before_one_user_exceeds_the_transition_memory(
    worker: Worker, many_users_batch: list[tuple[int, bytes | None, bytes | None]]
) -> None:
    memory = worker.settings.worker_transition_memory
    tally = TransitionTally()
    worker.table.begin_batch(0)
    out, done = worker.processor.on_batch(0, many_users_batch, T0 + 60 * MIN, tally)
    worker.table.end_batch()
    assert 0 < done < len(many_users_batch), "one user's flapping sessions cut the batch"
    assert tally.top <= memory and tally.top > memory - MAX_TRANSITIONS_PER_RECORD
    assert sum(1 for o in out if o.topic == "transitions") == tally.top


def _samples(metrics: WorkerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


@settings(max_examples=60, deadline=None)
@given(split())
def test_metrics_collected_per_batch_equal_metrics_per_record(case: tuple[list[Step], list[int]]) -> None:
    steps, now = case
    config = WorkerSettings(kafka_bootstrap_servers="127.0.0.1:9", **_config_env()).presence_config()
    per_batch, per_record = WorkerMetrics(), WorkerMetrics()
    table_a: dict[str, Any] = {}
    table_b: dict[str, Any] = {}
    a = Processor(table_a, config, lambda p: list(table_a.items()), per_batch)
    b = Processor(table_b, config, lambda p: list(table_b.items()), per_record)
    for processor in (a, b):
        processor.enable_reconciliation(Checks(), AGE)
    for (step, batch), batch_now in zip(steps, now, strict=True):
        if step == "restart":
            a.forget_all()
            b.forget_all()
        elif step == "batch":
            a.on_batch(PARTITION, batch, batch_now)
            for offset, key, value in batch:
                b.on_raw(PARTITION, offset, key, value, batch_now)
    assert _samples(per_batch) == _samples(per_record)


def test_metrics_per_batch_cover_every_metric_counted_per_event() -> None:
    """One run that reaches each metric the processor counts per message, in one batch and record by record."""
    u = b"u1"
    stream: list[Record] = [
        (0, u, b"not json"),  # invalid, a dead letter
        (1, u, raw("u1", "s0", 0, T0)),  # applied: a transition and STATE
        (2, u, raw("u1", "s0", 0, T0)),  # a duplicate
        (3, None, gap(T0 + 1_000)),  # an intake gap
        (4, u, observation("u1", False, T0 + MIN)),  # R2: the session ends (a correction)
        (5, b"u2", raw("u2", "s0", 0, T0 + 20 * MIN)),
        (6, u, raw("u1", "s9", 1, T0 + 2 * MIN)),  # too late (R5): older than the ended-session horizon
        (7, b"u2", raw("u2", "s0", 1, T0 + 60 * MIN)),  # stream time far on: u1 is deleted (S6)
    ]
    steps: list[Step] = [("batch", stream), ("restart", []), ("batch", stream[6:])]  # 6, 7 delivered again
    config = WorkerSettings(kafka_bootstrap_servers="127.0.0.1:9", **_config_env()).presence_config()
    per_batch, per_record = WorkerMetrics(), WorkerMetrics()
    table_a: dict[str, Any] = {}
    table_b: dict[str, Any] = {}
    a = Processor(table_a, config, lambda p: list(table_a.items()), per_batch)
    b = Processor(table_b, config, lambda p: list(table_b.items()), per_record)
    for processor in (a, b):
        processor.enable_reconciliation(Checks(), AGE)
    for step, batch in steps:
        if step == "restart":
            a.forget_all()
            b.forget_all()
            continue
        a.on_batch(PARTITION, batch, T0 + 61 * MIN)
        for offset, key, value in batch:
            b.on_raw(PARTITION, offset, key, value, T0 + 61 * MIN)
    samples = _samples(per_batch)
    assert samples == _samples(per_record)
    reached = {(name, labels) for (name, labels), value in samples.items() if value}
    for wanted in [
        ("presence_worker_events_total", (("outcome", outcome),))
        for outcome in ("applied", "duplicate", "too_late", "invalid")
    ] + [
        ("presence_worker_dead_letters_total", (("reason", "undecodable_raw"),)),
        ("presence_worker_transitions_total", (("from_status", "online"), ("to_status", "offline"))),
        ("presence_worker_transitions_resent_total", ()),
        ("presence_worker_state_updates_total", ()),
        ("presence_worker_users_deleted_total", ()),
        ("presence_worker_reconcile_corrections_total", (("kind", "session_ended"),)),
        ("presence_worker_intake_gaps_total", (("reason", "error_answer"),)),
    ]:
        assert wanted in reached, (wanted, sorted(reached))


def test_s10_acknowledged_transitions_stop_counting() -> None:
    tally = TransitionTally()
    first = [
        Outgoing("transitions", b"u1", b"t"),
        Outgoing("transitions", b"u1", b"t"),
        Outgoing("state", b"u1", b"s"),
    ]
    tally.count(first)
    acked = [False]
    tally.seal(lambda: acked[0])
    tally.count([Outgoing("transitions", b"u1", b"t"), Outgoing("transitions", b"u2", b"t")])
    tally.seal(lambda: False)
    assert tally.top == 3 and tally.counts == {b"u1": 3, b"u2": 1}

    tally.retire()
    assert tally.top == 3, "nothing acknowledged yet"
    acked[0] = True
    tally.retire()
    assert tally.counts == {b"u1": 1, b"u2": 1} and tally.top == 1
    tally.clear()
    assert tally.counts == {} and tally.top == 0
