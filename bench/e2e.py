"""End-to-end latency: webhook sent -> transition on TRANSITIONS, at steady offered rates up to saturation.

One gateway and one worker process on their own broker. An open-loop generator sends signed requests of 10
events at a fixed rate over keep-alive connections; every event flips its user's status (a new session online,
or that session's offline), so each causes exactly one transition. Latency runs from the request's scheduled
send time (so a generator or server that falls behind is charged, not hidden) to the transition's arrival at a
consumer of TRANSITIONS in the same process and clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.common import (
    CpuMeter,
    Service,
    percentile,
    python_module,
    say,
    table,
    workspace,
    write_results,
)
from bench.gateway import _healthy
from bench.plot import line_chart
from bench.recovery import ready
from bench.traffic import APP_KEY, APP_SECRET, PLATFORMS, signed_path, webhook_event
from bench.worker import PARTITIONS, _settings, faust_worker
from core.topics import ensure_topics
from presence.children import wait_until
from presence.localkafka import free_port
from streams.config import WorkerSettings
from streams.main import worker_topics

EVENTS_PER_REQUEST = 10


class Traffic:
    """Events that each flip a user's status; remembers when each transition's cause was scheduled."""

    def __init__(self, users: int) -> None:
        self.users = users
        self.next_user = 0
        self.online: dict[int, str] = {}
        self.sessions = 0
        self.scheduled: dict[tuple[str, str], float] = {}

    def request(self, scheduled: float, nonce: str) -> bytes:
        now = time.time_ns() // 1_000_000
        events = []
        for _ in range(EVENTS_PER_REQUEST):
            u = self.next_user
            self.next_user = (u + 1) % self.users
            userid = f"e2e-{u:07d}"
            session = self.online.pop(u, None)
            if session is None:
                self.sessions += 1
                session = f"{userid}-{self.sessions}"
                self.online[u] = session
                events.append(webhook_event(userid, session, 0, now, PLATFORMS[u % 5]))
                self.scheduled[(session, "online")] = scheduled
            else:
                events.append(webhook_event(userid, session, 1, now + 1, PLATFORMS[u % 5]))
                self.scheduled[(session, "offline")] = scheduled
        body = orjson.dumps(events)
        head = (f"POST {signed_path(nonce, now)} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")  # fmt: skip
        return head.encode() + body


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return status


async def phase(port: int, traffic: Traffic, rate: float, seconds: float, connections: int) -> dict[str, Any]:
    """Send requests at ``rate`` events/s for ``seconds``; count answers by status."""
    interval = EVENTS_PER_REQUEST / rate
    count = int(seconds / interval)
    start = time.monotonic() + 0.05
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)
    statuses: dict[int, int] = {}
    late: list[float] = []

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                due = start + i * interval
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    late.append(-delay)
                wall_due = time.time() - (time.monotonic() - due)
                status = await _exchange(
                    reader, writer, traffic.request(wall_due, f"e2e-{time.time_ns()}-{i}")
                )
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return {"requests": count, "statuses": statuses, "generator_late_p99_ms": percentile(late, 99) * 1000}


async def measure(ws_bootstrap: str, transitions: str, port: int, rates: list[float], seconds: float,
                  pids: dict[str, int]) -> list[dict[str, Any]]:  # fmt: skip
    consumer = AIOKafkaConsumer(bootstrap_servers=ws_bootstrap, enable_auto_commit=False)
    await consumer.start()
    tps = [TopicPartition(transitions, p) for p in range(PARTITIONS)]
    consumer.assign(tps)
    await consumer.seek_to_end(*tps)
    for tp in tps:
        await consumer.position(tp)
    arrivals: list[tuple[float, bytes]] = []

    async def consume() -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=50)
            now = time.time()
            for records in batch.values():
                arrivals.extend((now, r.value) for r in records if r.value is not None)

    reader = asyncio.create_task(consume())
    traffic = Traffic(users=200_000)
    results: list[dict[str, Any]] = []
    try:
        # Warm-up, not measured: a freshly started worker may still be settling its group and fetch positions.
        # Send at the lowest rate until a transition arrives within a second of its request, or give up after
        # a minute (then the first phase shows it).
        warm_until = time.monotonic() + 60
        while time.monotonic() < warm_until:
            arrivals.clear()
            traffic.scheduled.clear()
            await phase(port, traffic, rates[0], 1.0, 4)
            await asyncio.sleep(0.5)
            fresh = [arrived - traffic.scheduled.get((p["cause"]["sessionId"], p["cause"]["event"]), 0.0)
                     for arrived, p in ((a, orjson.loads(v)) for a, v in arrivals)]  # fmt: skip
            if fresh and min(fresh) < 1.0:
                break
        for rate in rates:
            arrivals.clear()
            traffic.scheduled.clear()
            connections = max(4, min(64, int(rate / EVENTS_PER_REQUEST / 20)))
            meter = CpuMeter(pids)
            meter.start()
            sent = await phase(port, traffic, rate, seconds, connections)
            expected = dict(traffic.scheduled)
            latencies: list[float] = []
            to_emit: list[float] = []
            deadline = time.monotonic() + max(10.0, seconds)
            seen: set[tuple[str, str]] = set()
            read = 0
            while time.monotonic() < deadline and len(seen) < len(expected):
                await asyncio.sleep(0.1)
                # Only what arrived since the last look: re-reading everything would load this process (and the
                # clock it stamps arrivals with) more with every check.
                unread, read = arrivals[read:], len(arrivals)
                for arrived, value in unread:
                    payload = orjson.loads(value)
                    key = (payload["cause"]["sessionId"], payload["cause"]["event"])
                    if key in expected and key not in seen:
                        seen.add(key)
                        latencies.append(arrived - expected[key])
                        to_emit.append(payload["emitted_at"] / 1000 - expected[key])
            meter.stop()
            row = {
                "offered_events_per_second": rate,
                "requests": sent["requests"],
                "statuses": sent["statuses"],
                "transitions_expected": len(expected),
                "transitions_seen": len(seen),
                "latency_ms": {"p50": percentile(latencies, 50) * 1000, "p99": percentile(latencies, 99) * 1000,
                               "p999": percentile(latencies, 99.9) * 1000, "max": max(latencies, default=0) * 1000},
                # Sent -> the worker processed the event (its emitted_at): gateway, RAW and the worker's consumer.
                "to_worker_ms": {"p50": percentile(to_emit, 50) * 1000, "p99": percentile(to_emit, 99) * 1000},
                "generator_late_p99_ms": sent["generator_late_p99_ms"],
                "cpu_cores": meter.cores(),
            }  # fmt: skip
            results.append(row)
            say(f"{rate:,.0f} ev/s: p50 {row['latency_ms']['p50']:.1f} ms, p99 {row['latency_ms']['p99']:.1f} ms, "
                f"{len(seen):,}/{len(expected):,} transitions")  # fmt: skip
            if len(seen) < len(expected) or row["latency_ms"]["p99"] > 5000:
                say("saturated: stopping here")
                break
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await consumer.stop()
    return results


def run(smoke: bool = False, out_dir: Path | None = None) -> dict[str, Any]:
    rates = [100.0] if smoke else [250.0, 500.0, 1000.0, 2000.0, 3000.0, 4000.0, 6000.0]
    seconds = 2.0 if smoke else 15.0
    with workspace("e2e", heap="1g") as ws:
        settings = WorkerSettings(**_settings(ws, "e2e", worker_app_id="bench-e2e"))
        asyncio.run(ensure_topics(settings, extra=worker_topics(settings)))
        worker = faust_worker(ws, ws.path("state"), app_id="bench-e2e", system="e2e")
        port = free_port()
        env = {f"PRESENCE_{k.upper()}": str(v) for k, v in _settings(ws, "e2e").items()}
        env.update({"PRESENCE_APP_KEY": APP_KEY, "PRESENCE_APP_SECRET": APP_SECRET,
                    "PRESENCE_GATEWAY_HOST": "127.0.0.1", "PRESENCE_GATEWAY_PORT": str(port),
                    "PRESENCE_GATEWAY_SPOOL_DIR": str(ws.path("spool"))})  # fmt: skip
        gateway = Service("gateway", python_module("presence.cli", "gateway"), env, ws.root)
        worker.start()
        gateway.start()
        try:
            web_port: int = worker.web_port  # type: ignore[attr-defined]
            wait_until(lambda: worker.check() or ready(web_port), 120, "the worker to be ready")
            wait_until(lambda: gateway.check() or _healthy(f"http://127.0.0.1:{port}"), 60, "the gateway")
            pids = {"gateway": gateway.pid, "worker": worker.pid, "broker": ws.broker_pid}
            rows = asyncio.run(measure(ws.bootstrap, settings.topic_transitions, port, rates, seconds, pids))
        finally:
            gateway.stop()
            worker.stop()
    at_1k = next((r for r in rows if r["offered_events_per_second"] == 1000.0), None)
    targets = {}
    if at_1k is not None:
        p99 = at_1k["latency_ms"]["p99"]
        targets = {"p99_ms_at_1k_events_per_second": {"target": "<= 50", "value": p99, "met": p99 <= 50}}
    payload: dict[str, Any] = {"settings": {"events_per_request": EVENTS_PER_REQUEST, "seconds_per_rate": seconds},
               "rates": rows, "targets": targets}  # fmt: skip
    path = write_results("e2e", smoke, payload, out_dir)
    line_chart(
        path.with_suffix(".svg"),
        "End-to-end latency: webhook sent -> transition consumed",
        "offered events/s",
        "latency ms (log)",
        [(q, [(r["offered_events_per_second"], r["latency_ms"][q]) for r in rows]) for q in ("p50", "p99")],
    )
    print(render(payload))
    say(f"results in {path}")
    return payload


def render(payload: dict[str, Any]) -> str:
    rows = [[r["offered_events_per_second"], r["requests"], f"{r['transitions_seen']}/{r['transitions_expected']}",
             r["latency_ms"]["p50"], r["latency_ms"]["p99"], r["latency_ms"]["p999"], r["latency_ms"]["max"],
             r["to_worker_ms"]["p50"], r["to_worker_ms"]["p99"],
             r["cpu_cores"].get("gateway"), r["cpu_cores"].get("worker"), r["cpu_cores"].get("broker")]
            for r in payload["rates"]]  # fmt: skip
    parts = [table("End-to-end latency: webhook sent -> transition consumed (10 events/request)",
                   ["events/s", "requests", "transitions", "p50 ms", "p99 ms", "p99.9 ms", "max ms",
                    "to worker p50 ms", "to worker p99 ms",
                    "gateway cores", "worker cores", "broker cores"], rows)]  # fmt: skip
    if payload["targets"]:
        parts.append(
            table(
                "Targets",
                ["target", "wanted", "value", "met"],
                [[n, t["target"], t["value"], t["met"]] for n, t in payload["targets"].items()],
            )
        )
    return "\n".join(parts)
