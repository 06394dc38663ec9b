"""Real processes and real load for the reliability suite: the gateway as ``python -m gateway``, a paced load
generator that keeps a ledger of every acknowledged event, and the checks over what reached Kafka."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from core.contract import compute_signature
from presence.children import wait_until
from presence.localkafka import free_port
from tests.integration.streams.harness import read_topic

APP_KEY = "chaos-app"
SECRET = "chaos-secret-0001"

EventKey = tuple[str, str, int, int]  # (userid, sessionId, status, time): unique per generated event


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def signed_query(nonce: str, timestamp: int | None = None, secret: str = SECRET) -> str:
    ts = str(timestamp if timestamp is not None else now_ms())
    return f"appKey={APP_KEY}&timestamp={ts}&nonce={nonce}&signature={compute_signature(secret, nonce, ts)}"


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class GatewayProcess:
    """``python -m gateway`` on a fixed port with a fixed spool directory, so a restart finds the old spool."""

    settings: dict[str, Any]
    spool_dir: Path
    log_path: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def webhook(self) -> str:
        return f"{self.url}/rongcloud/online-status"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_")}
        env.update({f"PRESENCE_{key.upper()}": str(value) for key, value in self.settings.items()})
        env.update(
            {
                "PRESENCE_APP_KEY": APP_KEY,
                "PRESENCE_APP_SECRET": SECRET,
                "PRESENCE_GATEWAY_HOST": "127.0.0.1",
                "PRESENCE_GATEWAY_PORT": str(self.port),
                "PRESENCE_GATEWAY_SPOOL_DIR": str(self.spool_dir),
                "PRESENCE_GATEWAY_PUBLISH_BUDGET_SECONDS": "2",
                "PRESENCE_GATEWAY_BREAKER_COOLDOWN_SECONDS": "0.5",
                "PRESENCE_GATEWAY_BREAKER_MAX_COOLDOWN_SECONDS": "2",
                "PRESENCE_GATEWAY_KAFKA_REQUEST_TIMEOUT_SECONDS": "5",
                "PRESENCE_GATEWAY_SHUTDOWN_GRACE_SECONDS": "5",
                "PRESENCE_GATEWAY_SHUTDOWN_DRAIN_SECONDS": "5",
                "PRESENCE_LOG_LEVEL": "WARNING",
                **self.extra_env,
            }
        )
        return env

    def start(self, timeout: float = 60) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway"], env=self.env(), stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        wait_until(self._healthy, timeout, f"gateway on port {self.port} to serve /healthz")

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"gateway exited with {self.process.returncode}; log:\n{self.log_tail()}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def readiness(self) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(f"{self.url}/readyz", timeout=5).json()
        return body

    def wait_drained(self, timeout: float = 120) -> None:
        """Wait until the spool is empty and the breaker closed: everything acknowledged is in Kafka."""

        def drained() -> bool:
            try:
                ready = self.readiness()
            except httpx.HTTPError:
                return False
            return ready["spool_records"] == 0 and ready["kafka"] == "closed"

        wait_until(drained, timeout, "the gateway's spool to drain into Kafka", interval=0.5)

    def spool_records(self) -> int:
        return int(self.readiness()["spool_records"])

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, the spool is left as the last fsync left it."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None

    def stop(self, timeout: float = 60) -> int | None:
        if self.process is None:
            return None
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.process = None
        return code

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def post_events(gateway: GatewayProcess, nonce: str, events: list[dict[str, Any]]) -> None:
    """One webhook request, signed now (upstream signs every attempt, a re-delivery included); must answer 200."""
    response = httpx.post(f"{gateway.webhook}?{signed_query(nonce)}", content=orjson.dumps(events),
                          headers={"content-type": "application/json"}, timeout=30)  # fmt: skip
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": len(events), "rejected": 0}, response.text


@dataclass
class Ledger:
    """What the load generator sent and what the gateway acknowledged (HTTP 200)."""

    acked_requests: int = 0
    acked_events: set[EventKey] = field(default_factory=set)
    sent_events: set[EventKey] = field(default_factory=set)
    statuses: Counter[int] = field(default_factory=Counter)
    transport_errors: int = 0
    latencies: list[float] = field(default_factory=list)

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)


class Load(threading.Thread):
    """Paced, signed webhook traffic from ``clients`` concurrent connections until stopped.

    Each event is unique by (userid, sessionId, status, time), so every acknowledged event can be looked up on
    RAW. Requests that fail in transport (the gateway was killed) are not acknowledged and not counted as sent
    to be delivered; upstream would retry them.
    """

    def __init__(
        self,
        url: str,
        *,
        clients: int = 3,
        batch: int = 20,
        interval: float = 0.05,
        users: int = 300,
        tag: str = "load",
        seed: int = 0,
        timeout: float = 10.0,
    ) -> None:
        super().__init__(daemon=True, name=f"load-{tag}")
        self.url = url
        self.clients = clients
        self.batch = batch
        self.interval = interval
        self.users = users
        self.tag = tag
        self.timeout = timeout
        self.ledger = Ledger()
        self._rng = random.Random(seed)
        self._counter = itertools.count()
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self.error: BaseException | None = None

    def stop(self) -> Ledger:
        self._halt.set()
        self.join(self.timeout + 30)
        if self.error is not None:
            raise self.error
        return self.ledger

    def requests_acked(self) -> int:
        with self._lock:
            return self.ledger.acked_requests

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    async def _main(self) -> None:
        await asyncio.gather(*(self._client(n) for n in range(self.clients)))

    def _events(self, request_no: int) -> list[dict[str, Any]]:
        at = now_ms() - 200
        events = []
        for i in range(self.batch):
            user = self._rng.randrange(self.users)
            events.append(
                {
                    "userid": f"{self.tag}-u{user}",
                    "status": str(self._rng.choice((0, 0, 1, 2))),
                    "os": self._rng.choice(("iOS", "Android", "PC")),
                    "time": at + i,
                    "clientIp": "10.9.8.7:4000",
                    "sessionId": f"{self.tag}-r{request_no}-e{i}",
                }
            )
        return events

    async def _client(self, n: int) -> None:
        async with httpx.AsyncClient(timeout=self.timeout) as client:
            while not self._halt.is_set():
                request_no = next(self._counter)
                events = self._events(request_no)
                keys = {(e["userid"], e["sessionId"], int(e["status"]), e["time"]) for e in events}
                query = signed_query(nonce=f"{self.tag}-{request_no}")
                started = time.monotonic()
                try:
                    response = await client.post(
                        f"{self.url}?{query}", content=orjson.dumps(events),
                        headers={"content-type": "application/json"},
                    )  # fmt: skip
                except httpx.TransportError:
                    with self._lock:
                        self.ledger.transport_errors += 1
                        self.ledger.sent_events |= keys
                    await asyncio.sleep(self.interval)  # pacing: the gateway may be down
                    continue
                elapsed = time.monotonic() - started
                with self._lock:
                    self.ledger.sent_events |= keys
                    self.ledger.statuses[response.status_code] += 1
                    self.ledger.latencies.append(elapsed)
                    if response.status_code == 200:
                        body = response.json()
                        assert body == {"accepted": len(events), "rejected": 0}, body
                        self.ledger.acked_requests += 1
                        self.ledger.acked_events |= keys
                await asyncio.sleep(self.interval)


@dataclass
class Delivery:
    """How the acknowledged events look on RAW after the fault."""

    acked: int
    lost: int
    duplicates: int
    unacked_delivered: int
    phantoms: int
    lost_sample: list[EventKey]


def raw_events(bootstrap: str, topic: str) -> Counter[EventKey]:
    records = asyncio.run(read_topic(bootstrap, topic, timeout=30))
    seen: Counter[EventKey] = Counter()
    for _, _, _, value in records:
        if value is None:
            continue
        event = orjson.loads(value)
        if "kind" in event:  # an intake-gap marker (a restart after SIGKILL) or an observation: not an event
            continue
        seen[(event["userid"], event["sessionId"], int(event["status"]), event["time"])] += 1
    return seen


def check_delivery(ledger: Ledger, seen: Counter[EventKey]) -> Delivery:
    lost = ledger.acked_events - seen.keys()
    return Delivery(
        acked=len(ledger.acked_events),
        lost=len(lost),
        duplicates=sum(n - 1 for n in seen.values() if n > 1),
        unacked_delivered=len((seen.keys() - ledger.acked_events) & ledger.sent_events),
        phantoms=len(seen.keys() - ledger.sent_events),
        lost_sample=sorted(lost)[:5],
    )
