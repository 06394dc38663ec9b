"""Simulated traffic: deterministic, realistic in the ways upstream is noisy, and faithful through a file."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

import orjson
import pytest

from presence import trace
from presence.trace import PLATFORMS, TraceError, TraceSpec, generate

SPEC = TraceSpec(seed=7, users=200, events=5000, rate=500)


def test_the_same_seed_gives_the_same_trace_and_another_seed_another() -> None:
    first, again, other = generate(SPEC), generate(SPEC), generate(dataclasses.replace(SPEC, seed=8))
    assert first.deliveries == again.deliveries
    assert first.deliveries != other.deliveries


def test_events_are_valid_webhook_elements_and_the_upstream_noise_is_there() -> None:
    generated = generate(SPEC)
    events = [e for d in generated.deliveries for e in d.events]
    assert len(events) == generated.event_count >= SPEC.events
    assert {e["status"] for e in events} == {"0", "1", "2"}
    assert {e["os"] for e in events} == set(PLATFORMS)
    assert all(set(e) == {"userid", "status", "os", "time", "clientIp", "sessionId"} for e in events)
    for kind in ("reconnect", "kick", "logout", "late_offline", "retried_delivery", "overtaken_batch",
                 "unsorted_batch", "second_device"):  # fmt: skip
        assert generated.scenarios[kind] > 0, kind
    # Batched like upstream: many users per request, never more than batch_max events.
    assert max(len(d.events) for d in generated.deliveries) <= SPEC.batch_max
    assert (
        sum(len({e["userid"] for e in d.events}) > 1 for d in generated.deliveries)
        > len(generated.deliveries) / 2
    )
    # Deliveries are in send order; a late offline arrives after later events of its user.
    assert [d.at_ms for d in generated.deliveries] == sorted(d.at_ms for d in generated.deliveries)
    newest: dict[str, int] = defaultdict(int)
    arrived_late = 0
    for delivery in generated.deliveries:
        for e in delivery.events:
            arrived_late += e["status"] == "1" and e["time"] < newest[e["userid"]] - 1000
            newest[e["userid"]] = max(newest[e["userid"]], e["time"])
    assert arrived_late > 0


def test_users_hold_several_sessions_and_reconnects_open_new_session_ids() -> None:
    generated = generate(SPEC)
    sessions: dict[str, set[str]] = defaultdict(set)
    for delivery in generated.deliveries:
        for e in delivery.events:
            sessions[e["userid"]].add(e["sessionId"])
    assert max(len(s) for s in sessions.values()) >= 5
    # A sessionId belongs to one user and one platform.
    owner: dict[str, tuple[str, str]] = {}
    for delivery in generated.deliveries:
        for e in delivery.events:
            assert owner.setdefault(e["sessionId"], (e["userid"], e["os"])) == (e["userid"], e["os"])


def test_a_retry_repeats_an_earlier_delivery_exactly() -> None:
    generated = generate(SPEC)
    retries = [(i, d) for i, d in enumerate(generated.deliveries) if d.retry_of is not None]
    assert retries
    for index, retry in retries:
        assert retry.retry_of is not None and retry.retry_of < index
        original = generated.deliveries[retry.retry_of]
        assert (original.nonce, original.events, original.retry_of) == (retry.nonce, retry.events, None)
        assert retry.at_ms - original.at_ms >= 5000
    originals = [d.nonce for d in generated.deliveries if d.retry_of is None]
    assert len(originals) == len(set(originals)), "nonces of distinct requests must differ"


def test_a_trace_survives_a_file_round_trip(tmp_path: Path) -> None:
    generated = generate(SPEC)
    path = tmp_path / "t.jsonl"
    trace.write(generated, path)
    back = trace.read(path)
    assert back.deliveries == generated.deliveries
    assert back.spec == generated.spec
    assert back.scenarios == generated.scenarios


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"not json\n", "is not JSON"),
        (b'{"hello": 1}\n', "is not a trace file"),
        (b'{"trace": 1}\n{"at": 1}\n', ":2 is not a delivery"),
        (b'{"trace": 1}\n{"at": 1, "nonce": "n", "events": [], "retry_of": 5}\n', ":2 is not a delivery"),
    ],
)
def test_a_bad_trace_file_is_refused_with_its_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(TraceError, match=message):
        trace.read(path)


def test_the_header_records_how_the_trace_was_made(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    trace.write(generate(TraceSpec(seed=3, users=5, events=20)), path)
    header = orjson.loads(path.read_bytes().splitlines()[0])
    assert header["seed"] == 3 and header["users"] == 5 and header["trace"] == 1


def test_no_session_ends_before_its_own_online() -> None:
    """A session booked to connect soon (a second device, a reconnect) is not connected before its online's time:
    nothing ends it earlier (the ghost benchmark's truth and the product would disagree on such a session)."""
    generated = generate(dataclasses.replace(SPEC, events=20_000))
    onlines: dict[str, int] = {}
    ends: dict[str, int] = {}
    for delivery in generated.deliveries:
        for e in delivery.events:
            times = onlines if e["status"] == "0" else ends
            times[e["sessionId"]] = min(e["time"], times.get(e["sessionId"], e["time"]))
    assert ends and all(sid in onlines and onlines[sid] <= at for sid, at in ends.items())
