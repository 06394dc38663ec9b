"""RongCloud's server API ``POST /user/checkOnline.json``: ask whether a user is online now (reconciliation).

The checker runs in each worker for the users of the partitions it owns: it takes users from the
:class:`~streams.reconcile.CheckQueue`, asks RongCloud within the deployment's call budget, and publishes each
answer as an observation (R1) on RAW, keyed by the userid, for the worker to apply in order with the user's
events. ``presence reconcile`` uses the same client.

Upstream facts (docs/reconciliation.md cites the sources):

- hosts: ``https://api.rong-api.com`` with ``https://api-b.rong-api.com`` as its backup (China data centre;
  other data centres have their own pair); callers are asked to switch to the other host on failure;
- request: form body ``userId``; headers ``App-Key``, ``Nonce`` (at most 18 characters), ``Timestamp`` (seconds)
  and ``Signature`` = hex SHA1(app secret + nonce + timestamp), the callbacks' signing rule;
- answer: ``{"code": 200, "status": "1"}``, ``"1"`` online and ``"0"`` offline; a ``code`` other than 200 is an
  error; HTTP 429 or code 1008 means the rate limit (100 calls per second for this API) was exceeded.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import httpx
import orjson
from aiolimiter import AsyncLimiter
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from core.contract import (
    MAX_USERID_LENGTH,
    OBSERVATION_SOURCES,
    ONLINE_BY_STATE_CODE,
    Observation,
    ObservationSource,
    compute_signature,
    encode_observation,
)
from streams.reconcile import OFFER_RESULTS, Check, CheckQueue, Offer

if TYPE_CHECKING:
    from streams.config import WorkerSettings

log = logging.getLogger(__name__)

DEFAULT_API_URLS: Final = ("https://api.rong-api.com", "https://api-b.rong-api.com")
CHECK_ONLINE_PATH: Final = "/user/checkOnline.json"
# RongCloud's business codes: 1008 the call rate was exceeded (answered with HTTP 429); 1000 an internal error
# and 1050 an internal timeout, both worth another try.
RATE_LIMITED_CODE: Final = 1008
SERVER_ERROR_CODES: Final = frozenset({1000, 1050})

# Outcomes of one HTTP request (closed set: a metric label).
REQUEST_OUTCOMES: Final = ("ok", "throttled", "server_error", "network", "timeout", "rejected", "bad_answer")
CHECK_OUTCOMES: Final = ("online", "offline", "error")


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class CheckOnlineError(Exception):
    """A check that got no usable answer. ``reason`` is one of :data:`REQUEST_OUTCOMES`; ``code`` is
    RongCloud's business code when it sent one, ``http_status`` the HTTP status when there was a response."""

    def __init__(self, reason: str, detail: str, *, code: int | None = None, http_status: int | None = None):
        super().__init__(detail)
        self.reason = reason
        self.code = code
        self.http_status = http_status


class _Retryable(CheckOnlineError):
    """Worth another attempt: a network error, a timeout, a server error, the rate limit."""


@dataclass(frozen=True, slots=True)
class Answer:
    """RongCloud's answer about one user: ``online`` as of a request sent at ``sent_at`` (epoch ms)."""

    userid: str
    online: bool
    sent_at: int
    answered_at: int
    base_url: str
    attempts: int

    def observation(self, source: ObservationSource) -> Observation:
        return Observation(self.userid, self.online, self.sent_at, source, self.answered_at)


class ReconcileMetrics:
    """The checker's metrics, in the worker's registry (``presence_worker_reconcile_*``; closed label sets)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.checks = Counter(
            "presence_worker_reconcile_checks_total",
            "Users checked with RongCloud's checkOnline, by trigger and outcome (online, offline, error).",
            ["trigger", "outcome"],
            registry=r,
        )
        for trigger in OBSERVATION_SOURCES:
            for outcome in CHECK_OUTCOMES:
                self.checks.labels(trigger, outcome)
        self.api_requests = Counter(
            "presence_worker_reconcile_api_requests_total",
            "HTTP requests to the server API, by outcome (ok, throttled, server_error, network, timeout, "
            "rejected, bad_answer); retries included.",
            ["outcome"],
            registry=r,
        )
        for outcome in REQUEST_OUTCOMES:
            self.api_requests.labels(outcome)
        self.api_latency = Histogram(
            "presence_worker_reconcile_api_latency_seconds",
            "Time from sending a checkOnline request to its answer (or failure).",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.failovers = Counter(
            "presence_worker_reconcile_api_failovers_total",
            "Switches to the next server-API base URL after a failed request.",
            registry=r,
        )
        self.budget_used = Counter(
            "presence_worker_reconcile_budget_used_total",
            "Server-API calls taken from this worker's budget (one per request, retries included).",
            registry=r,
        )
        self.budget_per_second = Gauge(
            "presence_worker_reconcile_budget_per_second",
            "This worker's share of the deployment's call budget (budget × owned partitions / partitions).",
            registry=r,
        )
        self.throttled_seconds = Counter(
            "presence_worker_reconcile_throttled_seconds_total",
            "Time all checks were paused after RongCloud's rate limit (HTTP 429 or code 1008).",
            registry=r,
        )
        self.queue_depth = Gauge(
            "presence_worker_reconcile_queue_depth",
            "Users waiting to be checked, by trigger.",
            ["trigger"],
            registry=r,
        )
        for trigger in OBSERVATION_SOURCES:
            self.queue_depth.labels(trigger)
        self.queue_offers = Counter(
            "presence_worker_reconcile_queue_offers_total",
            "Users offered to the check queue, by trigger and what the queue did (queued, raised, duplicate, "
            "fresh, gap_cap, full).",
            ["trigger", "result"],
            registry=r,
        )
        for trigger in OBSERVATION_SOURCES:
            for result in OFFER_RESULTS:
                self.queue_offers.labels(trigger, result)
        self.observations = Counter(
            "presence_worker_reconcile_observations_published_total",
            "Observations published to RAW.",
            registry=r,
        )


class Budget:
    """The deployment's server-API budget, of which this process takes its share: a token bucket per process
    (``aiolimiter``), sized ``per_second × share``. Each worker's share is the fraction of partitions it owns,
    so the workers together never exceed the budget.

    The bucket holds ``burst_seconds`` worth of calls (at least one) and refills at what the budget leaves after
    it, so any one-second window sees at most ``rate`` calls (rates of 2 calls/s and more; below that a call or
    so more) and the sustained rate is ``rate − burst + 1``. Of that, ``headroom`` (a share) is left unused:
    RongCloud counts requests as they arrive, and a request leaves a little after its token (the event loop,
    the connection pool), so requests bunch up; measured, the busiest second held up to 1.1 × the tokens' rate.
    When RongCloud answers with its rate limit, every call waits: the pause doubles from ``throttle_initial`` up
    to ``throttle_max`` while the limit keeps answering (or follows ``Retry-After``), and resets after a call goes
    through.
    """

    def __init__(
        self,
        per_second: float,
        share: float = 1.0,
        *,
        burst_seconds: float = 0.1,
        headroom: float = 0.1,
        throttle_initial: float = 1.0,
        throttle_max: float = 30.0,
        metrics: ReconcileMetrics | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if per_second <= 0:
            raise ValueError("the budget must be above 0 calls per second")
        if not 0 <= headroom < 1:
            raise ValueError("the headroom is a share of the budget, from 0 up to (not including) 1")
        self.per_second = per_second
        self._burst_seconds = burst_seconds
        self._headroom = headroom
        self._throttle_initial = throttle_initial
        self._throttle_max = throttle_max
        self._metrics = metrics
        self._monotonic = monotonic
        self._sleep = sleep
        self._paused_until = 0.0
        self._next_pause = throttle_initial
        self.used = 0
        self.resize_share(share)

    @property
    def rate(self) -> float:
        """Calls per second this process may make."""
        return self.per_second * self.share

    def resize(self, owned: int, total: int) -> None:
        """Take the share of ``owned`` partitions out of ``total`` (after a rebalance)."""
        self.resize_share(owned / total if total > 0 else 0.0)

    def resize_share(self, share: float) -> None:
        self.share = max(0.0, min(1.0, share))
        if self.share == 0:
            # No partitions, no checks: a bucket that never refills stands for "wait for a share".
            self._limiter: AsyncLimiter | None = None
        else:
            # aiolimiter takes whole calls: at least one in the bucket. A window of one second sees the bucket's
            # calls but one plus a second's refill, so the refill leaves room for the burst: the budget is a
            # ceiling on every one-second window (what RongCloud counts), not only an average.
            rate = self.rate * (1 - self._headroom)
            capacity = max(1.0, rate * self._burst_seconds)
            refill = max(rate - capacity + 1.0, rate / 2)
            self._limiter = AsyncLimiter(capacity, capacity / refill)
        if self._metrics:
            self._metrics.budget_per_second.set(self.rate)

    async def acquire(self) -> None:
        """Wait for a call's token: past any rate-limit pause, then from the bucket."""
        while True:
            wait = self._paused_until - self._monotonic()
            if wait > 0:
                await self._sleep(wait)
                continue
            limiter = self._limiter
            if limiter is None:
                await self._sleep(1.0)
                continue
            await limiter.acquire()
            if self._paused_until <= self._monotonic():
                break
            # A pause began while waiting in the bucket: the token is spent, but honour the pause.
        self.used += 1
        if self._metrics:
            self._metrics.budget_used.inc()

    def throttled(self, retry_after: float | None = None) -> float:
        """RongCloud said too many calls: pause every call. Returns the pause in seconds."""
        pause = retry_after if retry_after is not None and retry_after > 0 else self._next_pause
        pause = min(pause, self._throttle_max)
        now = self._monotonic()
        until = now + pause
        if until > self._paused_until:
            if self._metrics:
                self._metrics.throttled_seconds.inc(until - max(now, self._paused_until))
            self._paused_until = until
        self._next_pause = min(self._next_pause * 2, self._throttle_max)
        return pause

    def relieved(self) -> None:
        """A call went through: the next rate-limit pause starts small again."""
        self._next_pause = self._throttle_initial


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    try:
        return float(value) if value else None
    except ValueError:
        return None


class CheckOnlineClient:
    """Asks ``/user/checkOnline.json`` about one user at a time, within a :class:`Budget`.

    Each attempt takes a token from the budget. Network errors, timeouts and server errors (5xx, codes 1000
    and 1050) are tried again up to ``attempts`` times in all, after an exponential back-off, each time on the
    next base URL (the one that worked stays in use). The rate limit (HTTP 429, code 1008) pauses the whole
    budget and is tried again without switching hosts (the limit is the app's, not the host's). Any other
    answer without ``code`` 200 is an error with its code, not tried again.

    Following RongCloud's advice for its API, connections are not kept alive (``Connection: close``): a
    long-lived connection would pin its load balancing and fail-over.
    """

    def __init__(
        self,
        *,
        app_key: str,
        secret: str,
        budget: Budget,
        base_urls: Sequence[str] = DEFAULT_API_URLS,
        timeout: float = 5.0,
        attempts: int = 3,
        backoff: float = 0.5,
        backoff_max: float = 10.0,
        metrics: ReconcileMetrics | None = None,
        wall_ms: Callable[[], int] = _wall_ms,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not base_urls:
            raise ValueError("at least one server-API base URL is needed")
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self._app_key = app_key
        self._secret = secret
        self.budget = budget
        self.base_urls = tuple(url.rstrip("/") for url in base_urls)
        self._current = 0
        self._attempts = attempts
        self._backoff = backoff
        self._backoff_max = backoff_max
        self._metrics = metrics
        self._wall_ms = wall_ms
        self._sleep = sleep
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            transport=transport,
            headers={"Connection": "close", "User-Agent": "rongcloud-presence"},
        )

    @property
    def base_url(self) -> str:
        """The base URL the next request goes to."""
        return self.base_urls[self._current]

    async def __aenter__(self) -> CheckOnlineClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def _wait(self, state: RetryCallState) -> float:
        outcome = state.outcome
        error = outcome.exception() if outcome is not None else None
        if isinstance(error, CheckOnlineError) and error.reason == "throttled":
            return 0.0  # the budget's pause does the waiting, for every caller at once
        # Exponential with full jitter: retries of many checks do not land together.
        ceiling = min(self._backoff_max, self._backoff * 2 ** (state.attempt_number - 1))
        return secrets.SystemRandom().uniform(0, ceiling)

    async def check(self, userid: str) -> Answer:
        """Whether ``userid`` is online now; raises :class:`CheckOnlineError` when no usable answer came."""
        if not userid or len(userid) > MAX_USERID_LENGTH:
            raise CheckOnlineError("rejected", f"userid must be 1-{MAX_USERID_LENGTH} characters")
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._attempts),
            wait=self._wait,
            retry=retry_if_exception_type(_Retryable),
            sleep=self._sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._attempt(userid, attempt.retry_state.attempt_number)
        raise AssertionError("unreachable: tenacity returns or re-raises")  # pragma: no cover

    async def _attempt(self, userid: str, number: int) -> Answer:
        await self.budget.acquire()
        base_url = self.base_url
        nonce = secrets.token_hex(8)  # RongCloud takes nonces of at most 18 characters
        sent_at = self._wall_ms()
        timestamp = str(sent_at // 1000)
        headers = {
            "App-Key": self._app_key,
            "Nonce": nonce,
            "Timestamp": timestamp,
            "Signature": compute_signature(self._secret, nonce, timestamp),
        }
        started = time.perf_counter()
        try:
            response = await self._http.post(
                base_url + CHECK_ONLINE_PATH, data={"userId": userid}, headers=headers
            )
            answer = self._read(response, userid, sent_at, base_url, number)
        except httpx.TimeoutException as exc:
            self._failed_over("timeout")
            raise _Retryable("timeout", f"{base_url}: no answer in time ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            self._failed_over("network")
            raise _Retryable("network", f"{base_url}: {type(exc).__name__}: {exc}") from exc
        except CheckOnlineError as exc:
            self._count(exc.reason)
            if exc.reason in ("server_error", "bad_answer"):
                self._switch()
            raise
        finally:
            if self._metrics:
                self._metrics.api_latency.observe(time.perf_counter() - started)
        self._count("ok")
        self.budget.relieved()
        return answer

    def _read(
        self, response: httpx.Response, userid: str, sent_at: int, base_url: str, number: int
    ) -> Answer:
        status = response.status_code
        try:
            body: Any = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            body = None
        code = body.get("code") if isinstance(body, dict) else None
        code = code if isinstance(code, int) and not isinstance(code, bool) else None
        if status == 429 or code == RATE_LIMITED_CODE:
            pause = self.budget.throttled(_retry_after(response))
            raise _Retryable(
                "throttled", f"rate limit (HTTP {status}, code {code}); paused {pause:.1f} s",
                code=code, http_status=status,
            )  # fmt: skip
        if status >= 500 or code in SERVER_ERROR_CODES:
            raise _Retryable(
                "server_error", f"{base_url}: HTTP {status}, code {code}", code=code, http_status=status
            )
        if code is None:
            # A 2xx/4xx without RongCloud's JSON: a proxy or captive page in the way; the other host may do.
            raise _Retryable("bad_answer", f"{base_url}: HTTP {status} without a code", http_status=status)
        if code != 200:
            message = body.get("errorMessage") if isinstance(body, dict) else None
            raise CheckOnlineError(
                "rejected", f"code {code}: {message or 'no errorMessage'} (HTTP {status})",
                code=code, http_status=status,
            )  # fmt: skip
        state = body.get("status") if isinstance(body, dict) else None
        online = ONLINE_BY_STATE_CODE.get(str(state)) if isinstance(state, str | int) else None
        if online is None or isinstance(state, bool):
            raise _Retryable("bad_answer", f"{base_url}: status {state!r} is neither '1' nor '0'", code=code)
        return Answer(userid, online, sent_at, self._wall_ms(), base_url, number)

    def _switch(self) -> None:
        if len(self.base_urls) > 1:
            self._current = (self._current + 1) % len(self.base_urls)
            if self._metrics:
                self._metrics.failovers.inc()

    def _failed_over(self, reason: str) -> None:
        self._count(reason)
        self._switch()

    def _count(self, outcome: str) -> None:
        if self._metrics:
            self._metrics.api_requests.labels(outcome).inc()


def client_from_settings(
    settings: WorkerSettings, *, share: float = 1.0, metrics: ReconcileMetrics | None = None
) -> CheckOnlineClient:
    """A client with its budget (``share`` of the deployment's) as the ``PRESENCE_RECONCILE_*`` settings say."""
    budget = Budget(settings.reconcile_budget_per_second, share, metrics=metrics)
    return CheckOnlineClient(
        app_key=settings.app_key,
        secret=settings.app_secret.get_secret_value(),
        budget=budget,
        base_urls=settings.reconcile_api_urls,
        timeout=settings.reconcile_timeout_seconds,
        attempts=settings.reconcile_attempts,
        backoff=settings.reconcile_backoff_seconds,
        metrics=metrics,
    )


def shared_gap_cap(gap_cap: int, share: float) -> int:
    """This worker's part of the deployment's per-gap cap (at least one check while the cap is not 0)."""
    return max(1, round(gap_cap * share)) if gap_cap else 0


def queue_from_settings(settings: WorkerSettings, *, share: float = 1.0) -> CheckQueue:
    """The check queue; an intake gap's cap is shared among the workers like the budget. An age check waiting half
    the recheck interval goes before intake-gap checks: checked within ``max_silence`` and one interval even
    behind a gap's backlog."""
    recheck_interval_ms = int(settings.reconcile_recheck_interval_seconds * 1000)
    return CheckQueue(
        recheck_interval_ms=recheck_interval_ms,
        capacity=settings.reconcile_queue_capacity,
        gap_cap=shared_gap_cap(settings.reconcile_gap_cap, share),
        max_attempts=settings.reconcile_attempts,
        age_patience_ms=recheck_interval_ms // 2,
    )


# --- publishing observations --------------------------------------------------------------------------------


async def publish_observation(producer: Any, topic: str, observation: Observation) -> None:
    """Publish ``observation`` to RAW (``topic``) keyed by its userid, and wait for Kafka's acknowledgement.

    ``producer`` is a started ``aiokafka.AIOKafkaProducer``; the key puts the observation in the user's
    partition (the same partitioner as the gateway's), behind the events already there.
    """
    await producer.send_and_wait(
        topic, value=encode_observation(observation), key=observation.userid.encode("utf-8")
    )


# --- the checker: queue -> budget -> API -> RAW ------------------------------------------------------------


class Reconciler:
    """Works through a :class:`CheckQueue`: at most ``concurrency`` checks in flight, each answer published
    as an observation. The worker offers users (:meth:`offer`) and runs :meth:`run` as a background task."""

    def __init__(
        self,
        queue: CheckQueue,
        client: CheckOnlineClient,
        publish: Callable[[Observation], Awaitable[None]],
        *,
        concurrency: int = 8,
        metrics: ReconcileMetrics | None = None,
        wall_ms: Callable[[], int] = _wall_ms,
    ) -> None:
        self.queue = queue
        self.client = client
        self._publish = publish
        self._slots = asyncio.Semaphore(concurrency)
        self._metrics = metrics
        self._wall_ms = wall_ms
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        if metrics:
            # Counted when scraped: counting the queue on every offer made a burst of offers quadratic (10,000
            # users falling due at once took seconds of the agent's loop).
            for trigger in OBSERVATION_SOURCES:
                metrics.queue_depth.labels(trigger).set_function(self._depth_of(trigger))

    def offer(
        self,
        userid: str,
        source: ObservationSource,
        *,
        rank: int = 0,
        fresh_after: int | None = None,
        gap: str | None = None,
    ) -> Offer:
        result = self.queue.offer(
            userid, source, self._wall_ms(), rank=rank, fresh_after=fresh_after, gap=gap
        )
        if self._metrics:
            self._metrics.queue_offers.labels(source, result.value).inc()
        if result in (Offer.QUEUED, Offer.RAISED):
            self._wake.set()
        return result

    def _depth_of(self, trigger: ObservationSource) -> Callable[[], float]:
        return lambda: self.queue.depth().get(trigger, 0)

    def room_for_age(self, seconds: float) -> int:
        """How many ``age`` offers are worth making now: what the budget can check in ``seconds`` beyond the checks
        already queued. Users not offered stay due in the worker's index for the next tick, so a population
        falling due at once costs each tick a bounded share of the loop, not one long pause."""
        return max(0, math.ceil(self.client.budget.rate * seconds) - len(self.queue))

    def resize(self, owned: int, total: int, *, gap_cap: int) -> None:
        """After a rebalance: take the share of ``owned`` out of ``total`` partitions of the deployment's budget
        and of each intake gap's cap (``gap_cap`` for the whole deployment)."""
        self.client.budget.resize(owned, total)
        self.queue.gap_cap = shared_gap_cap(gap_cap, self.client.budget.share)

    async def run(self) -> None:
        """Check users until cancelled."""
        try:
            while True:
                await self._slots.acquire()
                check = self.queue.pop(self._wall_ms())
                if check is None:
                    self._slots.release()
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                task = asyncio.create_task(self._one(check))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _one(self, check: Check) -> None:
        try:
            try:
                answer = await self.client.check(check.userid)
            except Exception as exc:
                if not isinstance(exc, CheckOnlineError):
                    log.exception("checking a user failed unexpectedly")
                if self._metrics:
                    self._metrics.checks.labels(check.source, "error").inc()
                if self.queue.failed(check, self._wall_ms()):
                    self._wake.set()
                return
            if self._metrics:
                self._metrics.checks.labels(check.source, "online" if answer.online else "offline").inc()
            try:
                await self._publish(answer.observation(check.source))
            except Exception:
                # Kafka did not take it: the answer is lost, the check goes back in the queue.
                log.exception("could not publish the observation of a checked user")
                if self.queue.failed(check, self._wall_ms()):
                    self._wake.set()
                return
            if self._metrics:
                self._metrics.observations.inc()
            self.queue.done(check, answer.sent_at)
            self._wake.set()  # a deferred check of this user may be back in the queue
        finally:
            self._slots.release()
