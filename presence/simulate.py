"""Send a trace (:mod:`presence.trace`) to a gateway the way RongCloud would: signed POSTs of JSON arrays.

Requests are scheduled at the trace's times (or as fast as possible), sent over one pooled HTTP/1.1 client with
many in flight, signed with :func:`core.contract.compute_signature` at send time, and counted from the
gateway's answers (``{"accepted": n, "rejected": m}``).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
import orjson

from core.contract import compute_signature
from presence.trace import Delivery, Trace

# What a status the gateway answers means, for the summary.
STATUS_HINTS = {
    401: "signature refused: the secret (--secret / PRESENCE_APP_SECRET) or app key (--app-key / PRESENCE_APP_KEY) "
    "differs from the gateway's, or the clocks differ by more than the gateway's window",
    403: "source address refused by PRESENCE_GATEWAY_ALLOW_CIDRS",
    404: "no webhook at this path: check --url against PRESENCE_GATEWAY_PATH",
    413: "body too large for the gateway: lower --batch-max",
    503: "gateway not ready (Kafka down and spool full or disabled): see its /readyz",
}


class GatewayUnreachable(RuntimeError):
    """Nothing answers at the gateway's address; the message says what to do."""


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class SendStats:
    """Counts and latencies of one run, updated as answers arrive."""

    deliveries: int = 0
    requests: int = 0
    ok: int = 0
    events_sent: int = 0
    accepted: int = 0
    rejected: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    transport_errors: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    behind_ms: float = 0.0

    @property
    def failed(self) -> int:
        return self.requests - self.ok

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def events_per_second(self) -> float:
        return self.events_sent / self.elapsed if self.elapsed > 0 else 0.0

    def percentile(self, q: float, last: int = 0) -> float:
        sample = self.latencies_ms[-last:] if last else self.latencies_ms
        if not sample:
            return 0.0
        ordered = sorted(sample)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "ok": self.ok,
            "failed": self.failed,
            "events_sent": self.events_sent,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "seconds": round(self.elapsed, 2),
            "events_per_second": round(self.events_per_second(), 1),
            "requests_per_second": round(self.requests / self.elapsed, 1) if self.elapsed else 0.0,
            "latency_ms": {
                "p50": round(self.percentile(0.5), 2),
                "p99": round(self.percentile(0.99), 2),
                "max": round(max(self.latencies_ms, default=0.0), 2),
            },
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "transport_errors": dict(self.transport_errors),
        }


@dataclass(frozen=True)
class Target:
    """Where and as whom to send: the webhook URL and the app's credentials."""

    url: str
    app_key: str
    secret: str

    @property
    def origin(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"


def signed_request(target: Target, delivery: Delivery, base_ms: int, now_ms: int) -> tuple[str, bytes]:
    """The URL (signed now, as upstream signs each request) and JSON body of ``delivery``, whose event times are
    relative to ``base_ms``."""
    timestamp = str(now_ms)
    query = urlencode({"appKey": target.app_key, "timestamp": timestamp, "nonce": delivery.nonce,
                       "signature": compute_signature(target.secret, delivery.nonce, timestamp)})  # fmt: skip
    body = orjson.dumps([{**e, "time": base_ms + e["time"]} for e in delivery.events])
    return f"{target.url}?{query}", body


async def check_reachable(client: aiohttp.ClientSession, target: Target) -> None:
    """Fail early, with what to do, when nothing listens at the gateway's address."""
    try:
        async with client.get(f"{target.origin}/healthz", timeout=aiohttp.ClientTimeout(total=5)) as response:
            await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise GatewayUnreachable(
            f"cannot reach the gateway at {target.origin} ({type(exc).__name__}); start one with "
            "`presence gateway` (or `presence up`), or point --url at it"
        ) from exc


async def send(
    trace: Trace,
    target: Target,
    *,
    concurrency: int = 64,
    flat_out: bool = False,
    stats: SendStats | None = None,
    on_answer: Callable[[SendStats], None] = lambda _s: None,
    timeout: float = 10.0,
) -> SendStats:
    """Send every delivery of ``trace``; return the counts once all are answered (or failed)."""
    stats = stats or SendStats()
    # aiohttp rather than httpx here: per request it costs a fraction of the CPU, and the simulator must
    # outrun the gateway it tests.
    connector = aiohttp.TCPConnector(limit=concurrency)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as client:
        await check_reachable(client, target)
        stats.started = time.monotonic()
        base_ms = _wall_ms()
        slots = asyncio.Semaphore(concurrency)
        # What each delivery was sent as, for retries: the same URL and the same body, byte for byte.
        retried = {d.retry_of for d in trace.deliveries if d.retry_of is not None}
        sent_as: dict[int, tuple[str, bytes]] = {}

        async def post(index: int, delivery: Delivery) -> None:
            try:
                if delivery.retry_of is not None and delivery.retry_of in sent_as:
                    url, body = sent_as[delivery.retry_of]
                else:
                    url, body = signed_request(target, delivery, base_ms, _wall_ms())
                    if index in retried:
                        sent_as[index] = (url, body)
                started = time.perf_counter()
                try:
                    async with client.post(url, data=body, headers=headers) as response:
                        status, answer_bytes = response.status, await response.read()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    stats.transport_errors[type(exc).__name__] += 1
                    stats.requests += 1
                    return
                stats.latencies_ms.append((time.perf_counter() - started) * 1000)
                stats.requests += 1
                stats.events_sent += len(delivery.events)
                stats.statuses[status] += 1
                if status == 200:
                    stats.ok += 1
                    try:
                        answer = orjson.loads(answer_bytes)
                        stats.accepted += int(answer.get("accepted", 0))
                        stats.rejected += int(answer.get("rejected", 0))
                    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
                        stats.transport_errors["unreadable_answer"] += 1
                on_answer(stats)
            finally:
                slots.release()

        tasks: set[asyncio.Task[None]] = set()
        for index, delivery in enumerate(trace.deliveries):
            if not flat_out:
                due = stats.started + delivery.at_ms / 1000
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                else:
                    stats.behind_ms = -wait * 1000
            await slots.acquire()
            stats.deliveries += 1
            task = asyncio.create_task(post(index, delivery))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    stats.finished = time.monotonic()
    return stats
