"""The checkOnline client, its budget and the checker loop, against scripted HTTP answers (httpx's MockTransport).

The same client against the emulator over real HTTP: tests/integration/test_reconcile.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from urllib.parse import parse_qsl

import httpx
import pytest
from prometheus_client import CollectorRegistry

from core.contract import Observation, compute_signature
from streams.checkonline import Budget, CheckOnlineClient, CheckOnlineError, ReconcileMetrics, Reconciler
from streams.reconcile import CheckQueue

NOW_MS = 1_700_000_000_123
PRIMARY, BACKUP = "https://api.example", "https://api-b.example"

Handler = Callable[[httpx.Request], httpx.Response]


class Sleeps:
    """Records sleeps instead of waiting, and moves a fake monotonic clock by them."""

    def __init__(self) -> None:
        self.t = 0.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds
        await asyncio.sleep(0)


def client(handler: Handler, sleeps: Sleeps | None = None, **kwargs: object) -> CheckOnlineClient:
    sleeps = sleeps or Sleeps()
    metrics = kwargs.pop("metrics", None)
    budget = Budget(1000, monotonic=sleeps.monotonic, sleep=sleeps.sleep, metrics=metrics)  # type: ignore[arg-type]
    return CheckOnlineClient(
        app_key="key", secret="secret", budget=budget, base_urls=(PRIMARY, BACKUP), wall_ms=lambda: NOW_MS,
        sleep=sleeps.sleep, transport=httpx.MockTransport(handler), metrics=metrics, **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip


def answer(http: int = 200, **body: object) -> httpx.Response:
    return httpx.Response(http, json=body or {"code": 200, "status": "1"})


async def test_request_is_signed_on_headers_with_a_form_body() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer(code=200, status="0")

    async with client(handler) as c:
        result = await c.check("user 1")
    request = seen[0]
    assert request.method == "POST" and str(request.url) == f"{PRIMARY}/user/checkOnline.json"
    assert dict(parse_qsl(request.content.decode())) == {"userId": "user 1"}
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    headers = request.headers
    assert headers["App-Key"] == "key" and headers["Timestamp"] == str(NOW_MS // 1000)  # seconds
    assert 1 <= len(headers["Nonce"]) <= 18
    assert headers["Signature"] == compute_signature("secret", headers["Nonce"], headers["Timestamp"])
    assert headers["Connection"] == "close"
    assert (result.userid, result.online, result.sent_at, result.attempts) == ("user 1", False, NOW_MS, 1)
    assert result.observation("suspect") == Observation("user 1", False, NOW_MS, "suspect", NOW_MS)


@pytest.mark.parametrize(("state", "online"), [("1", True), ("0", False), (1, True), (0, False)])
async def test_state_codes(state: object, online: bool) -> None:
    async with client(lambda _r: answer(code=200, status=state)) as c:
        assert (await c.check("u")).online is online


async def test_a_code_other_than_200_is_an_error_with_its_code_and_is_not_retried() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return answer(400, code=1002, errorMessage="userId is required")

    async with client(handler) as c:
        with pytest.raises(CheckOnlineError) as caught:
            await c.check("u")
    assert (caught.value.reason, caught.value.code, caught.value.http_status) == ("rejected", 1002, 400)
    assert "userId is required" in str(caught.value)
    assert len(calls) == 1


async def test_a_bad_signature_is_reported_not_retried() -> None:
    async with client(lambda _r: answer(401, code=1004, errorMessage="signature error")) as c:
        with pytest.raises(CheckOnlineError) as caught:
            await c.check("u")
    assert caught.value.code == 1004


async def test_server_errors_are_retried_on_the_backup_host_which_then_stays() -> None:
    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        return answer(503, code=1000) if request.url.host == "api.example" else answer()

    sleeps = Sleeps()
    registry = CollectorRegistry()
    metrics = ReconcileMetrics(registry)
    async with client(handler, sleeps, metrics=metrics) as c:
        first = await c.check("u")
        second = await c.check("v")
    assert hosts == ["api.example", "api-b.example", "api-b.example"]
    assert (first.attempts, first.base_url, second.base_url) == (2, BACKUP, BACKUP)
    assert len(sleeps.slept) == 1 and 0 <= sleeps.slept[0] <= 0.5  # one back-off before the retry
    assert registry.get_sample_value("presence_worker_reconcile_api_failovers_total") == 1
    assert (
        registry.get_sample_value("presence_worker_reconcile_api_requests_total", {"outcome": "server_error"})
        == 1
    )
    assert registry.get_sample_value("presence_worker_reconcile_budget_used_total") == 3


async def test_network_errors_fail_over_and_give_up_after_the_attempts() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    sleeps = Sleeps()
    async with client(handler, sleeps, attempts=3, backoff=1.0) as c:
        with pytest.raises(CheckOnlineError) as caught:
            await c.check("u")
    assert caught.value.reason == "network"
    assert len(sleeps.slept) == 2
    # Exponential ceilings 1 s then 2 s, with jitter below them.
    assert sleeps.slept[0] <= 1.0 and sleeps.slept[1] <= 2.0


async def test_timeouts_are_retried() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise httpx.ReadTimeout("slow", request=request)
        return answer()

    async with client(handler) as c:
        assert (await c.check("u")).attempts == 2


@pytest.mark.parametrize("throttled", [answer(429, code=1008), answer(200, code=1008)])
async def test_the_rate_limit_pauses_the_budget_and_backs_off(throttled: httpx.Response) -> None:
    responses = [throttled, throttled, answer()]
    hosts = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        return responses.pop(0)

    sleeps = Sleeps()
    async with client(handler, sleeps) as c:
        result = await c.check("u")
    assert result.attempts == 3
    assert hosts == ["api.example"] * 3  # the limit is the app's: no fail-over
    # The budget waits 1 s, then 2 s (doubling); tenacity itself waits nothing for a throttle.
    assert [s for s in sleeps.slept if s > 0] == [1.0, 2.0]


async def test_retry_after_is_honoured() -> None:
    responses = [httpx.Response(429, json={"code": 1008}, headers={"Retry-After": "7"}), answer()]
    sleeps = Sleeps()
    async with client(lambda _r: responses.pop(0), sleeps) as c:
        await c.check("u")
    assert 7.0 in sleeps.slept


async def test_a_page_that_is_not_rongclouds_answer_fails_over() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "api.example":
            return httpx.Response(200, text="<html>captive portal</html>")
        return answer()

    async with client(handler) as c:
        assert (await c.check("u")).base_url == BACKUP


async def test_bad_userids_are_refused_without_a_call() -> None:
    async with client(lambda _r: pytest.fail("no request expected")) as c:
        with pytest.raises(CheckOnlineError):
            await c.check("x" * 65)


def test_budget_share_follows_owned_partitions() -> None:
    registry = CollectorRegistry()
    budget = Budget(50, metrics=ReconcileMetrics(registry))
    budget.resize(3, 12)
    assert budget.rate == 12.5
    assert registry.get_sample_value("presence_worker_reconcile_budget_per_second") == 12.5
    budget.resize(0, 12)
    assert budget.rate == 0


async def test_budget_never_allows_more_than_its_rate_in_any_second() -> None:
    """Real time, short: the budget is a ceiling on every one-second window, the initial burst included (what
    RongCloud's per-second limit counts), and the calls still come at nearly the full rate."""
    budget = Budget(20)
    loop = asyncio.get_running_loop()
    started = loop.time()
    times = []
    for _ in range(50):
        await budget.acquire()
        times.append(loop.time() - started)
    for t in times:
        assert sum(1 for u in times if t <= u < t + 1.0) <= 20
    # 50 calls: 1.8 from the bucket, then a refill of 17.2 calls/s (the 10 % headroom left for requests that
    # bunch up on their way: RongCloud counts arrivals).
    assert 2.5 <= times[-1] < 3.8
    assert budget.used == 50


async def test_without_headroom_the_bucket_gives_the_whole_rate_and_a_headroom_of_one_is_refused() -> None:
    budget = Budget(20, headroom=0.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(40):
        await budget.acquire()
    # 2 from the bucket, then a refill of 19 calls/s.
    assert 1.9 <= loop.time() - started < 2.9
    with pytest.raises(ValueError, match="headroom"):
        Budget(20, headroom=1.0)


async def test_reconciler_checks_in_order_and_publishes_observations() -> None:
    answers = {"ghost": "0", "here": "1"}

    def handler(request: httpx.Request) -> httpx.Response:
        userid = dict(parse_qsl(request.content.decode()))["userId"]
        if userid == "broken":
            return answer(400, code=1002)
        return answer(code=200, status=answers[userid])

    published: list[Observation] = []

    async def publish(observation: Observation) -> None:
        published.append(observation)

    registry = CollectorRegistry()
    metrics = ReconcileMetrics(registry)
    queue = CheckQueue(recheck_interval_ms=60_000)
    reconciler = Reconciler(
        queue, client(handler), publish, concurrency=1, metrics=metrics, wall_ms=lambda: NOW_MS
    )
    reconciler.offer("here", "age")
    reconciler.offer("ghost", "suspect")
    reconciler.offer("broken", "on_demand")
    task = asyncio.create_task(reconciler.run())
    try:
        async with asyncio.timeout(5):
            while len(published) < 2 or queue.in_flight():
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert [(o.userid, o.online, o.source) for o in published] == [
        ("ghost", False, "suspect"),
        ("here", True, "age"),
    ]
    sample = registry.get_sample_value
    assert sample("presence_worker_reconcile_checks_total", {"trigger": "on_demand", "outcome": "error"}) == 1
    assert sample("presence_worker_reconcile_checks_total", {"trigger": "suspect", "outcome": "offline"}) == 1
    assert sample("presence_worker_reconcile_queue_offers_total", {"trigger": "age", "result": "queued"}) == 1
    assert sample("presence_worker_reconcile_queue_depth", {"trigger": "age"}) == 0
    assert sample("presence_worker_reconcile_observations_published_total") == 2
    # Answered just now: another age check is not due.
    assert reconciler.offer("here", "age").value == "fresh"


def test_age_offers_are_bounded_by_what_the_budget_checks_and_the_depth_is_counted_when_scraped() -> None:
    """A population falling due at once is offered a few ticks' worth of budget at a time, not all at once."""
    registry = CollectorRegistry()
    queue = CheckQueue(recheck_interval_ms=60_000)

    async def publish(observation: Observation) -> None:
        raise AssertionError("nothing is checked here")

    reconciler = Reconciler(
        queue,
        CheckOnlineClient(
            app_key="key",
            secret="secret",
            budget=Budget(50),
            base_urls=(PRIMARY,),
            transport=httpx.MockTransport(lambda request: answer(code=200, status="1")),
        ),  # fmt: skip
        publish,
        metrics=ReconcileMetrics(registry),
        wall_ms=lambda: NOW_MS,
    )
    assert reconciler.room_for_age(4.0) == 200
    for n in range(150):
        reconciler.offer(f"u{n}", "age")
    reconciler.offer("late", "suspect")
    assert reconciler.room_for_age(4.0) == 49
    depth = registry.get_sample_value
    assert depth("presence_worker_reconcile_queue_depth", {"trigger": "age"}) == 150
    assert depth("presence_worker_reconcile_queue_depth", {"trigger": "suspect"}) == 1
    reconciler.resize(0, 12, gap_cap=100)
    assert reconciler.room_for_age(4.0) == 0  # no partitions, no share of the budget, no offers
