"""A RongCloud emulator for tests, the demo and the ghost benchmark (tooling: never part of the product's runtime).

It holds the **ground truth** of simulated users (:class:`GroundTruth`, from a trace of :mod:`presence.trace`:
each session is online from its online event's time to its end's time, whenever upstream delivers them), and
plays RongCloud's two faces towards the product:

- **callbacks** (:class:`CallbackSender`): the trace's deliveries, signed as upstream signs them
  (:func:`presence.simulate.signed_request`), batched and retried as the trace says, with offlines up to 5
  minutes late; each request gets three attempts that time out after 5 s, then it is dropped for good; many
  failed attempts in a short time pause all callbacks for a minute (deliveries due meanwhile wait for the end
  of the pause); and a configurable share of requests is lost outright;
- the **server API** (:class:`ApiEmulator`): ``POST /user/checkOnline.json`` answered from the ground truth at
  the moment of the request, after checking the app key and the signature, within a rate limit per second
  (HTTP 429 and code 1008 beyond it), as RongCloud documents it.

Time comes from a :class:`Clock`, so unit tests drive callbacks with a :class:`ManualClock` and never sleep.
The pure parts (:class:`GroundTruth`, :class:`PauseRule`) take times as arguments.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import math
import random
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from core.contract import MAX_USERID_LENGTH, compute_signature
from presence.simulate import Target, signed_request
from presence.trace import Delivery, Trace

CHECK_ONLINE_PATH = "/user/checkOnline.json"

# --- time ----------------------------------------------------------------------------------------------------


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class RealClock:
    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class ManualClock:
    """Virtual time for tests: sleeping never waits. Sleepers wake in the order of their wake-up times, and
    time jumps to the earliest one once every other task has had its turn (after a few idle passes of the
    event loop), so concurrent sleepers see a consistent clock."""

    _IDLE_PASSES = 20

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.t = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = 0
        self._driver: asyncio.Task[None] | None = None

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._seq += 1
        heapq.heappush(self._sleepers, (self.t + max(0.0, seconds), self._seq, future))
        if self._driver is None or self._driver.done():
            self._driver = asyncio.create_task(self._drive())
        await future

    async def _drive(self) -> None:
        while self._sleepers:
            for _ in range(self._IDLE_PASSES):
                await asyncio.sleep(0)
            if not self._sleepers:
                return
            wake_at, _, future = heapq.heappop(self._sleepers)
            self.t = max(self.t, wake_at)
            if not future.done():
                future.set_result(None)


# --- ground truth --------------------------------------------------------------------------------------------


class GroundTruth:
    """When each simulated user was really online: while any of their sessions was.

    Times are milliseconds relative to the start of the run (as in a trace). A session is online from its
    online event to its first offline or logout after it; one with no end stays online. Upstream's delays,
    losses and retries change when the product *hears* of a change, never the truth.
    """

    def __init__(self) -> None:
        self._sessions: dict[str, dict[str, list[int | None]]] = {}
        self._intervals: dict[str, list[tuple[int, int | None]]] | None = None

    @classmethod
    def from_trace(cls, trace: Trace) -> GroundTruth:
        truth = cls()
        for delivery in trace.deliveries:
            if delivery.retry_of is not None:
                continue  # the same events again
            for event in delivery.events:
                truth.add(event["userid"], event["sessionId"], str(event["status"]), int(event["time"]))
        return truth

    def add(self, userid: str, session_id: str, status: str, at: int) -> None:
        """One upstream event: ``status`` is the webhook's code ("0" online, "1" offline, "2" logout)."""
        self._intervals = None
        sessions = self._sessions.setdefault(userid, {})
        if status == "0":
            span = sessions.get(session_id)
            if span is None:
                sessions[session_id] = [at, None]
            elif span[0] is None or at < span[0]:
                span[0] = at
        else:
            span = sessions.setdefault(session_id, [None, None])
            if span[1] is None or at < span[1]:
                span[1] = at

    def users(self) -> list[str]:
        return sorted(self._sessions)

    def intervals(self, userid: str) -> list[tuple[int, int | None]]:
        """The user's online intervals ``[start, end)``, merged across sessions and sorted (end None: still on)."""
        if self._intervals is None:
            self._intervals = {user: self._merge(sessions) for user, sessions in self._sessions.items()}
        return self._intervals.get(userid, [])

    @staticmethod
    def _merge(sessions: dict[str, list[int | None]]) -> list[tuple[int, int | None]]:
        spans = sorted(
            (
                (start, end)
                for start, end in sessions.values()
                if start is not None and (end is None or end > start)
            ),
            # Two sessions may start in the same millisecond, one still online (end None).
            key=lambda span: (span[0], math.inf if span[1] is None else span[1]),
        )
        merged: list[tuple[int, int | None]] = []
        for start, end in spans:
            previous_end = merged[-1][1] if merged else 0
            if merged and (previous_end is None or start <= previous_end):
                last_start, last_end = merged[-1]
                merged[-1] = (last_start, None if end is None or last_end is None else max(last_end, end))
            else:
                merged.append((start, end))
        return merged

    def online_at(self, userid: str, at: int) -> bool:
        spans = self.intervals(userid)
        index = bisect.bisect_right(spans, at, key=lambda span: span[0]) - 1
        if index < 0:
            return False
        start, end = spans[index]
        return start <= at and (end is None or at < end)


# --- callbacks -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallbackPolicy:
    """How upstream delivers callbacks (the seed document), with knobs for tests and the benchmark."""

    attempts: int = 3
    attempt_timeout: float = 5.0
    # "If many requests time out in a short time, the service pauses calling you for 1 minute": how many
    # failed attempts within the window count as many is not published; these are the emulator's choice.
    failures_to_pause: int = 20
    failure_window: float = 10.0
    pause: float = 60.0
    # Share of requests upstream loses without our ever seeing an attempt.
    loss_rate: float = 0.0
    seed: int = 1
    concurrency: int = 64


class PauseRule:
    """Upstream's pause: ``failures_to_pause`` failed attempts within ``failure_window`` pause all callbacks
    for ``pause`` seconds. Pure: times are passed in (seconds)."""

    def __init__(self, policy: CallbackPolicy) -> None:
        self._policy = policy
        self._failures: list[float] = []
        self.paused_until = 0.0
        self.pauses = 0

    def failure(self, now: float) -> bool:
        """Record a failed attempt at ``now``; True if it starts a pause."""
        window_start = now - self._policy.failure_window
        self._failures = [t for t in self._failures if t > window_start]
        self._failures.append(now)
        if now >= self.paused_until and len(self._failures) >= self._policy.failures_to_pause:
            self.paused_until = now + self._policy.pause
            self.pauses += 1
            self._failures.clear()
            return True
        return False

    def wait(self, now: float) -> float:
        """Seconds until callbacks may be sent again (0 when not paused)."""
        return max(0.0, self.paused_until - now)


# An attempt: POST url with body, give up after timeout seconds; True when answered 200.
Poster = Callable[[str, bytes, float], Awaitable[bool]]


@dataclass
class CallbackStats:
    deliveries: int = 0
    delivered: int = 0
    lost: int = 0  # by the loss rate: never attempted
    dropped: int = 0  # all attempts failed
    attempts: int = 0
    failed_attempts: int = 0
    pauses: int = 0
    # The events that never reached the product (lost or dropped), with their times relative to the run.
    missing_events: list[dict[str, Any]] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)


class DeliveryObserver(Protocol):
    """Told what becomes of each delivery (by its index in the trace), for a benchmark's attribution."""

    def attempted(self, index: int, started: float, finished: float, ok: bool) -> None:
        """One attempt, from ``started`` to ``finished`` (clock seconds): answered 200 (``ok``) or not."""

    def gave_up(self, index: int, how: str) -> None:
        """The delivery was ``"lost"`` (never attempted) or ``"dropped"`` (every attempt failed)."""


class CallbackSender:
    """Delivers a trace's callbacks to ``target`` the way RongCloud does (see the module's description);
    ``observer`` is told of every attempt and every delivery given up."""

    def __init__(
        self,
        trace: Trace,
        target: Target,
        *,
        policy: CallbackPolicy | None = None,
        clock: Clock | None = None,
        post: Poster | None = None,
        observer: DeliveryObserver | None = None,
    ) -> None:
        self.trace = trace
        self.target = target
        self.observer = observer
        self.policy = policy or CallbackPolicy()
        self.clock: Clock = clock or RealClock()
        self._post = post
        self.pause_rule = PauseRule(self.policy)
        self.stats = CallbackStats()
        self.base_ms = 0
        self._rng = random.Random(self.policy.seed)  # noqa: S311 - reproducible losses, not secrets

    async def run(self, start: float | None = None) -> CallbackStats:
        """Send every delivery at its time relative to ``start`` (the clock's seconds that the trace's time 0
        stands for; default now); return once each is delivered or given up. A caller that needs the run's
        base time before the first delivery (an :class:`ApiEmulator` answering from the same truth) picks
        ``start`` itself."""
        if self._post is not None:
            return await self._run(self._post, start)
        connector = aiohttp.TCPConnector(limit=self.policy.concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def post(url: str, body: bytes, timeout: float) -> bool:
                try:
                    async with session.post(
                        url, data=body, headers={"Content-Type": "application/json"},
                        timeout=aiohttp.ClientTimeout(total=timeout),
                    ) as response:  # fmt: skip
                        await response.read()
                        return response.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    return False

            return await self._run(post, start)

    async def _run(self, post: Poster, start: float | None) -> CallbackStats:
        if start is None:
            start = self.clock.now()
        self.base_ms = int(start * 1000)
        slots = asyncio.Semaphore(self.policy.concurrency)
        tasks: set[asyncio.Task[None]] = set()
        sent_as: dict[int, tuple[str, bytes]] = {}
        for index, delivery in enumerate(self.trace.deliveries):
            due = start + delivery.at_ms / 1000
            while (wait := max(due - self.clock.now(), self.pause_rule.wait(self.clock.now()))) > 0:
                await self.clock.sleep(wait)
            self.stats.deliveries += 1
            if self._rng.random() < self.policy.loss_rate:
                self._give_up(index, delivery, "lost")
                continue
            if delivery.retry_of is not None and delivery.retry_of in sent_as:
                url, body = sent_as[delivery.retry_of]  # upstream's re-send: the same request
            else:
                url, body = signed_request(self.target, delivery, self.base_ms, int(self.clock.now() * 1000))
                sent_as[index] = (url, body)
            await slots.acquire()
            task = asyncio.create_task(self._deliver(post, index, delivery, url, body, slots))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        self.stats.pauses = self.pause_rule.pauses
        return self.stats

    async def _deliver(
        self, post: Poster, index: int, delivery: Delivery, url: str, body: bytes, slots: asyncio.Semaphore
    ) -> None:
        try:
            for _ in range(self.policy.attempts):
                while (wait := self.pause_rule.wait(self.clock.now())) > 0:
                    await self.clock.sleep(wait)
                self.stats.attempts += 1
                started = self.clock.now()
                ok = await post(url, body, self.policy.attempt_timeout)
                if self.observer is not None:
                    self.observer.attempted(index, started, self.clock.now(), ok)
                if ok:
                    self.stats.delivered += 1
                    self.stats.outcomes["delivered"] += 1
                    return
                self.stats.failed_attempts += 1
                self.pause_rule.failure(self.clock.now())
            self._give_up(index, delivery, "dropped")
        finally:
            slots.release()

    def _give_up(self, index: int, delivery: Delivery, how: str) -> None:
        if self.observer is not None:
            self.observer.gave_up(index, how)
        if how == "lost":
            self.stats.lost += 1
        else:
            self.stats.dropped += 1
        self.stats.outcomes[how] += 1
        self.stats.missing_events.extend(delivery.events)


# --- the server API ------------------------------------------------------------------------------------------


def _answer(http_status: int, code: int, **extra: Any) -> web.Response:
    return web.json_response({"code": code, **extra}, status=http_status)


class ApiEmulator:
    """``POST /user/checkOnline.json`` answered from a :class:`GroundTruth`, as RongCloud answers it.

    ``base_ms`` is the epoch time that the truth's relative times count from (a :class:`CallbackSender`'s).
    Requests are refused with 401 (code 1001 unknown app key, 1004 bad signature), 400 (code 1002, no or bad
    ``userId``), 429 (code 1008) beyond ``rate_limit`` calls in one second of the clock. ``fail_with`` makes
    every request fail with that HTTP status (an outage of this host); ``delay`` holds each answer that many
    seconds of real time (a slow host). Every request is recorded in :attr:`calls`.
    """

    def __init__(
        self,
        truth: GroundTruth,
        *,
        app_key: str,
        secret: str,
        clock: Clock | None = None,
        rate_limit: int = 100,
        base_ms: int = 0,
    ) -> None:
        self.truth = truth
        self.app_key = app_key
        self.secret = secret
        self.clock: Clock = clock or RealClock()
        self.rate_limit = rate_limit
        self.base_ms = base_ms
        self.fail_with: int | None = None
        self.delay = 0.0
        # (clock seconds, userid or "", HTTP status) of every request.
        self.calls: list[tuple[float, str, int]] = []
        self._window = (0, 0)  # (second, calls counted in it)
        self._runner: web.AppRunner | None = None
        self.url = ""

    def app(self) -> web.Application:
        application = web.Application()
        application.router.add_post(CHECK_ONLINE_PATH, self._check_online)
        return application

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (0: a free port); returns the base URL."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        # Bind first, so port 0 gives a free port we can name.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        await web.SockSite(self._runner, sock).start()
        self.url = f"http://{host}:{sock.getsockname()[1]}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> ApiEmulator:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    def _record(self, now: float, userid: str, response: web.Response) -> web.Response:
        self.calls.append((now, userid, response.status))
        return response

    async def _check_online(self, request: web.Request) -> web.Response:
        now = self.clock.now()
        if self.delay:
            await asyncio.sleep(self.delay)
        try:
            form = await request.post()
        except ConnectionResetError:
            # The caller went away before its request was read (a worker stopping with checks in flight):
            # nothing was asked, nothing is answered or recorded.
            return web.Response(status=400)
        userid = form.get("userId")
        userid = userid if isinstance(userid, str) else ""
        if self.fail_with is not None:
            return self._record(now, userid, _answer(self.fail_with, 1000, errorMessage="emulated outage"))
        headers = request.headers
        app_key = headers.get("App-Key") or headers.get("RC-App-Key")
        nonce = headers.get("Nonce") or headers.get("RC-Nonce") or ""
        timestamp = headers.get("Timestamp") or headers.get("RC-Timestamp") or ""
        signature = headers.get("Signature") or headers.get("RC-Signature") or ""
        if app_key != self.app_key:
            return self._record(now, userid, _answer(401, 1001, errorMessage="unknown App-Key"))
        if (
            not nonce
            or not timestamp.isdigit()
            or signature.lower() != compute_signature(self.secret, nonce, timestamp)
        ):
            return self._record(now, userid, _answer(401, 1004, errorMessage="signature error"))
        second = int(now)
        window_second, count = self._window
        count = count + 1 if window_second == second else 1
        self._window = (second, count)
        if count > self.rate_limit:
            return self._record(
                now, userid, _answer(429, 1008, errorMessage=f"limited to {self.rate_limit} per second")
            )
        if not userid or len(userid) > MAX_USERID_LENGTH:
            return self._record(
                now, userid, _answer(400, 1002, errorMessage="userId is required (1-64 chars)")
            )
        online = self.truth.online_at(userid, int(now * 1000) - self.base_ms)
        return self._record(now, userid, _answer(200, 200, status="1" if online else "0"))

    def max_calls_in_a_second(self, *, answered_only: bool = False) -> int:
        """The most requests that arrived within any one-second window (sliding), for budget checks."""
        times = sorted(t for t, _, status in self.calls if not answered_only or status == 200)
        most, first = 0, 0
        for last, moment in enumerate(times):
            while moment - times[first] >= 1.0:
                first += 1
            most = max(most, last - first + 1)
        return most
