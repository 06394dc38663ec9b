"""The RongCloud emulator: ground truth, callbacks delivered as upstream does, on a clock that never sleeps."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qsl, urlsplit

import orjson
import pytest

from core.contract import compute_signature
from presence.emulator import ApiEmulator, CallbackPolicy, CallbackSender, GroundTruth, ManualClock, PauseRule
from presence.simulate import Target
from presence.trace import Delivery, Trace, TraceSpec, generate

TARGET = Target("http://127.0.0.1:1/rongcloud/online-status", "app-key", "app-secret")


def trace_of(*deliveries: Delivery) -> Trace:
    return Trace(TraceSpec(), list(deliveries))


def event(userid: str, session: str, status: str, at: int) -> dict[str, object]:
    return {"userid": userid, "sessionId": session, "status": status, "time": at, "os": "iOS"}


def test_truth_is_online_while_any_session_is() -> None:
    truth = GroundTruth()
    truth.add("u", "phone", "0", 0)
    truth.add("u", "pc", "0", 10)
    truth.add("u", "phone", "1", 20)
    truth.add("u", "pc", "2", 30)
    truth.add("u", "tablet", "0", 50)
    assert truth.intervals("u") == [(0, 30), (50, None)]
    assert [truth.online_at("u", t) for t in (-1, 0, 25, 30, 40, 50, 10**9)] == [
        False, True, True, False, False, True, True,
    ]  # fmt: skip
    assert not truth.online_at("nobody", 5)
    # Two sessions starting in the same millisecond, one of them still online.
    truth.add("v", "phone", "0", 100)
    truth.add("v", "pc", "0", 100)
    truth.add("v", "phone", "1", 200)
    assert truth.intervals("v") == [(100, None)]


def test_truth_follows_event_times_not_delivery_order() -> None:
    """A late offline (delivered minutes after it happened) ends the session when it happened."""
    truth = GroundTruth()
    truth.add("u", "a", "1", 60)  # delivered first
    truth.add("u", "a", "0", 0)
    truth.add("u", "b", "0", 120)
    assert truth.intervals("u") == [(0, 60), (120, None)]


def test_truth_from_a_generated_trace_ignores_retries() -> None:
    trace = generate(TraceSpec(seed=3, users=50, events=2000, rate=1000))
    assert any(d.retry_of is not None for d in trace.deliveries)
    truth = GroundTruth.from_trace(trace)
    # Every user online at the end of the trace has a session whose online came and whose end never did.
    ends: dict[tuple[str, str], int] = {}
    starts: dict[tuple[str, str], int] = {}
    for delivery in trace.deliveries:
        for e in delivery.events:
            key = (e["userid"], e["sessionId"])
            (starts if e["status"] == "0" else ends)[key] = e["time"]
    late = trace.duration_ms + 10**7
    for userid in truth.users():
        open_sessions = [k for k in starts if k[0] == userid and k not in ends]
        assert truth.online_at(userid, late) == bool(open_sessions)


def test_pause_after_many_failures_in_a_short_time() -> None:
    rule = PauseRule(CallbackPolicy(failures_to_pause=3, failure_window=10, pause=60))
    assert not rule.failure(0)
    assert not rule.failure(20)  # the first one is out of the window by now
    assert not rule.failure(21)
    assert rule.failure(22)
    assert rule.wait(22) == 60 and rule.wait(82) == 0
    assert rule.pauses == 1


class Upstream:
    """A fake HTTP endpoint for the sender: answers by a script, records what it got and when."""

    def __init__(self, clock: ManualClock, answers: list[bool] | None = None, default: bool = True) -> None:
        self.clock = clock
        self.answers = list(answers or [])
        self.default = default
        self.requests: list[tuple[float, str, bytes]] = []

    async def post(self, url: str, body: bytes, timeout: float) -> bool:
        self.requests.append((self.clock.now(), url, body))
        ok = self.answers.pop(0) if self.answers else self.default
        if not ok:
            await self.clock.sleep(timeout)  # a timed-out attempt takes the whole timeout
        return ok


async def test_callbacks_are_signed_and_sent_at_their_times() -> None:
    clock = ManualClock()
    upstream = Upstream(clock)
    sender = CallbackSender(
        trace_of(Delivery(0, "n1", (event("u", "a", "0", 0),)), Delivery(2500, "n2", (event("u", "a", "1", 2400),))),
        TARGET, clock=clock, post=upstream.post,
    )  # fmt: skip
    start = clock.now()
    stats = await sender.run()
    assert stats.delivered == 2 and stats.attempts == 2
    assert [round(t - start, 3) for t, _, _ in upstream.requests] == [0.0, 2.5]
    url, body = upstream.requests[1][1:]
    query = dict(parse_qsl(urlsplit(url).query))
    assert query["appKey"] == "app-key" and query["nonce"] == "n2"
    assert query["signature"] == compute_signature("app-secret", "n2", query["timestamp"])
    assert orjson.loads(body)[0]["time"] == sender.base_ms + 2400


async def test_a_run_can_start_at_a_chosen_time() -> None:
    """The caller picks the clock time that the trace's time 0 stands for (the benchmark hands the same base to
    the API emulator before the first delivery): deliveries and event times count from it."""
    clock = ManualClock()
    upstream = Upstream(clock)
    sender = CallbackSender(
        trace_of(Delivery(1000, "n1", (event("u", "a", "0", 900),))), TARGET, clock=clock, post=upstream.post
    )
    start = clock.now() + 30
    stats = await sender.run(start)
    assert stats.delivered == 1
    assert sender.base_ms == int(start * 1000)
    assert [round(t - start, 3) for t, _, _ in upstream.requests] == [1.0]
    assert orjson.loads(upstream.requests[0][2])[0]["time"] == int(start * 1000) + 900


async def test_three_attempts_with_a_5s_timeout_then_dropped_for_good() -> None:
    clock = ManualClock()
    upstream = Upstream(clock, answers=[False, False, False])
    lost_event = event("u", "a", "1", 0)
    sender = CallbackSender(
        trace_of(Delivery(0, "n1", (lost_event,))), TARGET, clock=clock, post=upstream.post
    )
    stats = await sender.run()
    assert (stats.attempts, stats.failed_attempts, stats.dropped, stats.delivered) == (3, 3, 1, 0)
    times = [t - upstream.requests[0][0] for t, _, _ in upstream.requests]
    assert times == [0, 5, 10]  # each retry follows the 5 s timeout of the one before
    assert len({body for _, _, body in upstream.requests}) == 1  # the same request each time
    assert stats.missing_events == [lost_event]


async def test_a_retry_that_succeeds_delivers() -> None:
    clock = ManualClock()
    upstream = Upstream(clock, answers=[False, True])
    stats = await CallbackSender(
        trace_of(Delivery(0, "n1", (event("u", "a", "0", 0),))), TARGET, clock=clock, post=upstream.post
    ).run()
    assert (stats.attempts, stats.delivered, stats.dropped) == (2, 1, 0)


class Observed:
    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []

    def attempted(self, index: int, started: float, finished: float, ok: bool) -> None:
        self.events.append(("attempt", index, started, finished, ok))

    def gave_up(self, index: int, how: str) -> None:
        self.events.append(("gave_up", index, how))


async def test_an_observer_is_told_of_every_attempt_and_every_delivery_given_up() -> None:
    clock = ManualClock()
    upstream = Upstream(clock, answers=[False, True, False, False, False])
    observed = Observed()
    deliveries = [
        Delivery(0, "n0", (event("u", "a", "0", 0),)),
        Delivery(60_000, "n1", (event("u", "a", "1", 1),)),
    ]
    start = clock.now()
    await CallbackSender(
        trace_of(*deliveries), TARGET, clock=clock, post=upstream.post, observer=observed
    ).run()
    assert [e[:2] + e[-1:] for e in observed.events] == [
        ("attempt", 0, False), ("attempt", 0, True),  # the retry got through
        ("attempt", 1, False), ("attempt", 1, False), ("attempt", 1, False), ("gave_up", 1, "dropped"),
    ]  # fmt: skip
    # Each attempt's span on the clock: a failed one took upstream's 5 s timeout.
    assert observed.events[0][2:4] == (start, start + 5)
    lost = Observed()
    await CallbackSender(trace_of(deliveries[0]), TARGET, policy=CallbackPolicy(loss_rate=1.0), clock=clock,
                         post=upstream.post, observer=lost).run()  # fmt: skip
    assert lost.events == [("gave_up", 0, "lost")]


async def test_many_timeouts_pause_all_callbacks_for_a_minute() -> None:
    clock = ManualClock()
    upstream = Upstream(clock, default=False)
    policy = CallbackPolicy(failures_to_pause=3, failure_window=60, pause=60, concurrency=1)
    deliveries = [Delivery(n * 1000, f"n{n}", (event("u", f"s{n}", "0", n * 1000),)) for n in range(3)]
    sender = CallbackSender(trace_of(*deliveries), TARGET, policy=policy, clock=clock, post=upstream.post)
    start = clock.now()
    stats = await sender.run()
    assert stats.pauses >= 1
    gaps = [b[0] - a[0] for a, b in zip(upstream.requests, upstream.requests[1:], strict=False)]
    # After the third failure (t = 15 s) nothing is sent for the minute of the pause.
    assert max(gaps) >= 60
    assert stats.dropped == 3 and stats.delivered == 0
    assert clock.now() - start >= 60


@pytest.mark.parametrize("loss_rate", [0.0, 0.1, 1.0])
async def test_loss_rate(loss_rate: float) -> None:
    clock = ManualClock()
    upstream = Upstream(clock)
    deliveries = [Delivery(n, f"n{n}", (event(f"u{n}", "a", "0", n),)) for n in range(1000)]
    stats = await CallbackSender(
        trace_of(*deliveries), TARGET, policy=CallbackPolicy(loss_rate=loss_rate, seed=7), clock=clock,
        post=upstream.post,
    ).run()  # fmt: skip
    assert stats.lost + stats.delivered == 1000
    assert stats.lost == pytest.approx(1000 * loss_rate, abs=40)
    assert len(upstream.requests) == stats.delivered
    assert len(stats.missing_events) == stats.lost


async def test_upstream_retries_in_the_trace_resend_the_same_request() -> None:
    clock = ManualClock()
    upstream = Upstream(clock)
    original = Delivery(0, "n1", (event("u", "a", "0", 0),))
    retry = Delivery(5000, "n1", original.events, retry_of=0)
    await CallbackSender(trace_of(original, retry), TARGET, clock=clock, post=upstream.post).run()
    assert upstream.requests[0][1:] == upstream.requests[1][1:]


async def test_the_api_ignores_a_caller_that_goes_away_before_its_request_is_read(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker stopping with checks in flight closes its connections mid-request: no error, no call recorded."""
    api = ApiEmulator(GroundTruth(), app_key="app-key", secret="app-secret")
    url = await api.start()
    try:
        host, port = urlsplit(url).hostname, urlsplit(url).port
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /user/checkOnline.json HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nuserId=u")  # fmt: skip
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        # Wait for the server to be done with the connection (its handler has run by then).
        server = api._runner.server if api._runner else None
        deadline = asyncio.get_running_loop().time() + 5
        while server is not None and server.connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
    finally:
        await api.stop()
    assert api.calls == []
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
