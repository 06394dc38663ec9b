"""The live demo of ``presence up``: simulated traffic into the gateway, and a compact view of presence
changing (online users, transitions/s, lag, latency, the newest transitions) from the worker's metrics and the
TRANSITIONS topic. It also serves the emulated RongCloud server API the worker reconciles against, answering from
the demo traffic's ground truth, and loses a share of the demo's callbacks on purpose so that reconciliation has
ghosts to correct (shown with the checks and corrections the worker counts).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from core.settings import CommonSettings
from presence import observe, simulate, trace
from presence.children import Child
from presence.emulator import ApiEmulator, GroundTruth


@dataclass
class Endpoints:
    gateway: str  # http://127.0.0.1:8080
    webhook: str  # gateway + path
    worker: str


@dataclass
class Snapshot:
    """What the worker's and gateway's /metrics say now."""

    at: float = 0.0
    online_users: float = 0.0
    users: float = 0.0
    sessions: float = 0.0
    processed: float = 0.0
    outcomes: dict[str, float] = field(default_factory=dict)
    transitions: float = 0.0
    lag: float = 0.0
    latency_buckets: dict[float, float] = field(default_factory=dict)
    gateway_requests: dict[str, float] = field(default_factory=dict)
    checks: float = 0.0
    corrections: dict[str, float] = field(default_factory=dict)
    ok: bool = False


def parse_metrics(worker_text: str, gateway_text: str) -> Snapshot:
    snap = Snapshot(at=time.monotonic(), ok=True)
    for family in text_string_to_metric_families(worker_text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "presence_worker_online_users":
                snap.online_users = value
            elif name == "presence_worker_users":
                snap.users = value
            elif name == "presence_worker_sessions":
                snap.sessions = value
            elif name == "presence_worker_events_total":
                snap.outcomes[labels["outcome"]] = value
                snap.processed += value
            elif name == "presence_worker_transitions_total":
                snap.transitions += value
            elif name == "presence_worker_consumer_lag_messages":
                snap.lag += value
            elif name == "presence_worker_pipeline_latency_seconds_bucket":
                snap.latency_buckets[float(labels["le"])] = value
            elif name == "presence_worker_reconcile_checks_total":
                snap.checks += value
            elif name == "presence_worker_reconcile_corrections_total":
                snap.corrections[labels["kind"]] = value
    for family in text_string_to_metric_families(gateway_text):
        for sample in family.samples:
            if sample.name == "presence_gateway_requests_total":
                snap.gateway_requests[sample.labels["outcome"]] = sample.value
    return snap


def histogram_quantile(q: float, now: dict[float, float], before: dict[float, float]) -> float | None:
    """Upper bound of the bucket holding quantile ``q`` of the observations between two scrapes."""
    bounds = sorted(now)
    counts = [now[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return None
    for bound, count in zip(bounds, counts, strict=True):
        if count >= q * total:
            return bound
    return bounds[-1]


@dataclass
class Demo:
    settings: CommonSettings
    endpoints: Endpoints
    target: simulate.Target
    spec: trace.TraceSpec | None
    children: list[Child]
    console: Console
    live: bool
    exit_after_demo: bool
    logs: Path
    stats: simulate.SendStats = field(default_factory=simulate.SendStats)
    sim_done: bool = False
    sim_error: str | None = None
    recent: deque[observe.Message] = field(default_factory=lambda: deque(maxlen=8))
    transitions_seen: int = 0
    tail_ready: asyncio.Event = field(default_factory=asyncio.Event)
    history: deque[Snapshot] = field(default_factory=lambda: deque(maxlen=12))
    started: float = field(default_factory=time.monotonic)
    # The emulated server API (None: no reconciliation in this demo) and the share of callbacks lost.
    api: ApiEmulator | None = None
    api_port: int = 0
    lose_callbacks: float = 0.0
    lost: int = 0

    # --- tasks ---------------------------------------------------------------------------------------------

    async def tail(self) -> None:
        def emit(message: observe.Message) -> None:
            self.recent.append(message)
            self.transitions_seen += 1

        await observe.tail(
            self.settings, self.settings.topic_transitions, user=None, last=0, from_beginning=False,
            follow=True, emit=emit, ready=self.tail_ready.set,
        )  # fmt: skip

    async def simulate(self) -> None:
        if self.spec is None:
            self.sim_done = True
            return
        generated = await asyncio.to_thread(trace.generate, self.spec)
        sent = generated
        if self.api is not None:
            # The truth is what upstream saw; the gateway hears it minus the lost callbacks.
            self.api.truth = GroundTruth.from_trace(generated)
            self.api.base_ms = time.time_ns() // 1_000_000
            sent = lose(generated, self.lose_callbacks, self.spec.seed)
            self.lost = len(generated.deliveries) - len(sent.deliveries)
        try:
            await simulate.send(sent, self.target, concurrency=32, stats=self.stats)
        except simulate.GatewayUnreachable as exc:
            self.sim_error = str(exc)
        finally:
            self.sim_done = True

    async def poll(self) -> None:
        async with httpx.AsyncClient(timeout=3) as client:
            while True:
                try:
                    worker = await client.get(f"{self.endpoints.worker}/metrics")
                    gateway = await client.get(f"{self.endpoints.gateway}/metrics")
                    self.history.append(parse_metrics(worker.text, gateway.text))
                except (httpx.HTTPError, ValueError, KeyError):
                    self.history.append(Snapshot(at=time.monotonic()))
                await asyncio.sleep(1.0)

    # --- derived numbers -----------------------------------------------------------------------------------

    def current(self) -> Snapshot:
        return self.history[-1] if self.history else Snapshot()

    def rates(self) -> tuple[float, float, float | None, float | None]:
        """Transitions/s, events processed/s, latency p50 and p99 (seconds) over the last few seconds."""
        good = [s for s in self.history if s.ok]
        if len(good) < 2:
            return 0.0, 0.0, None, None
        first, last = good[max(0, len(good) - 6)], good[-1]
        span = max(1e-3, last.at - first.at)
        return (
            (last.transitions - first.transitions) / span,
            (last.processed - first.processed) / span,
            histogram_quantile(0.5, last.latency_buckets, first.latency_buckets),
            histogram_quantile(0.99, last.latency_buckets, first.latency_buckets),
        )

    def caught_up(self) -> bool:
        snap = self.current()
        return self.sim_done and snap.ok and snap.processed >= self.stats.accepted and snap.lag == 0

    def dead_child(self) -> Child | None:
        return next((c for c in self.children if not c.alive()), None)

    # --- rendering -----------------------------------------------------------------------------------------

    def status_line(self) -> str:
        snap = self.current()
        tps, eps, p50, p99 = self.rates()
        s = self.stats
        sim = "done" if self.sim_done else "sending"
        latency = f"{p50 * 1000:.0f}/{p99 * 1000:.0f} ms" if p50 is not None and p99 is not None else "-"
        return (
            f"[{time.monotonic() - self.started:5.1f} s] simulator {sim}: {s.events_sent} events in "
            f"{s.requests} requests ({s.accepted} accepted, {s.rejected} rejected, {s.failed} failed) | worker: "
            f"{snap.online_users:.0f} users online of {snap.users:.0f}, {tps:.1f} transitions/s, "
            f"{eps:.0f} events/s, lag {snap.lag:.0f}, latency p50/p99 {latency} | "
            f"{self.transitions_seen} transitions on {self.settings.topic_transitions} | "
            + self.reconcile_line()
        )

    def render(self) -> Group:
        snap = self.current()
        tps, eps, p50, p99 = self.rates()
        s = self.stats
        numbers = Table.grid(padding=(0, 3))
        for _ in range(4):
            numbers.add_column(justify="right")
            numbers.add_column(justify="left")
        latency = f"{p50 * 1000:.0f} / {p99 * 1000:.0f} ms" if p50 is not None and p99 is not None else "-"
        numbers.add_row(
            Text(f"{snap.online_users:.0f}", style="bold green"), "users online",
            f"{tps:.1f}", "transitions/s",
            f"{snap.lag:.0f}", "consumer lag (msgs)",
            latency, "latency p50/p99",
        )  # fmt: skip
        outcomes = ", ".join(f"{k} {v:.0f}" for k, v in sorted(snap.outcomes.items()) if v)
        numbers.add_row(
            f"{snap.users:.0f}", "users known",
            f"{eps:.0f}", "events/s processed",
            f"{snap.sessions:.0f}", "sessions",
            f"{self.transitions_seen}", "transitions seen",
        )  # fmt: skip
        sim_state = "[green]done[/]" if self.sim_done else "[yellow]sending[/]"
        if self.spec is None:
            sim_state = "off"
        p99_ms = s.percentile(0.99, last=200)
        simulator = Text.from_markup(
            f"simulator {sim_state}: {s.events_sent} events in {s.requests} requests, "
            f"[green]{s.accepted} accepted[/], {s.rejected} rejected, "
            f"{'[red]' if s.failed else ''}{s.failed} failed{'[/]' if s.failed else ''}, "
            f"{s.events_per_second():.0f} events/s, gateway p99 {p99_ms:.0f} ms   worker events: {outcomes or '-'}"
        )
        recent = Table(box=None, show_header=True, header_style="dim", pad_edge=False)
        for column in ("time", "user", "change", "cause", "online on"):
            recent.add_column(column)
        for message in reversed(self.recent):
            value = message.value or {}
            cause = value.get("cause") or {}
            to = str(value.get("to"))
            colour = {"online": "green", "offline": "yellow", "logged_out": "red"}.get(to, "white")
            recent.add_row(
                observe.clock(int(value.get("at", message.timestamp_ms))),
                str(value.get("userid", message.key)),
                Text.from_markup(f"{value.get('from')} → [{colour}]{to}[/]"),
                f"{cause.get('event')} on {cause.get('os')}",
                ",".join(value.get("platforms") or []) or "-",
            )
        reconcile = Text(self.reconcile_line(), style="cyan")
        links = Text(
            where_next(self.endpoints, self.settings.kafka_bootstrap_servers, self.logs)
            + "\nCtrl-C stops everything",
            style="dim",
        )
        header = Text.from_markup(
            f"[bold]presence up[/] · {time.monotonic() - self.started:.0f} s · broker "
            f"{self.settings.kafka_bootstrap_servers} · transitions from {self.settings.topic_transitions}"
        )
        return Group(header, Text(""), numbers, simulator, reconcile, Text(""), recent, Text(""), links)

    def reconcile_line(self) -> str:
        if self.api is None:
            return "reconciliation off"
        snap = self.current()
        corrections = (
            ", ".join(f"{kind} {n:.0f}" for kind, n in sorted(snap.corrections.items()) if n) or "none"
        )
        return (
            f"reconciliation against the emulated RongCloud API {self.api.url or '(starting)'}: "
            f"{self.lost} callbacks lost on purpose, {snap.checks:.0f} users checked, corrections: {corrections}"
        )

    # --- main ----------------------------------------------------------------------------------------------

    async def run(self) -> int:
        if self.api is not None:
            await self.api.start(port=self.api_port)
        tasks = [asyncio.create_task(self.tail()), asyncio.create_task(self.poll())]
        try:
            # The tail starts at the current end of TRANSITIONS: wait for it, so the demo's first ones are seen.
            await asyncio.wait_for(self.tail_ready.wait(), 30)
            tasks.append(asyncio.create_task(self.simulate()))
            return await self._watch()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if self.api is not None:
                await self.api.stop()

    async def _watch(self) -> int:
        live: Live | None = None
        if self.live:
            live = Live(self.render(), console=self.console, refresh_per_second=4, transient=False)
            live.start()
        last_line = 0.0
        done_at: float | None = None
        try:
            while True:
                await asyncio.sleep(0.5)
                dead = self.dead_child()
                if dead is not None:
                    raise RuntimeError(
                        f"the {dead.name} exited with code {dead.exit_code()}; last lines of "
                        f"{dead.log_path}:\n{dead.log_tail()}"
                    )
                if self.sim_error:
                    raise RuntimeError(self.sim_error)
                if live is not None:
                    live.update(self.render())
                elif time.monotonic() - last_line >= 3:
                    last_line = time.monotonic()
                    self.console.print(self.status_line(), highlight=False, soft_wrap=True)
                if not self.exit_after_demo:
                    continue
                if self.caught_up():
                    return self._finish()
                if self.sim_done:
                    done_at = done_at or time.monotonic()
                    if time.monotonic() - done_at > 90:
                        self.console.print(
                            f"the worker did not catch up within 90 s of the end of the demo traffic: "
                            f"{self.status_line()}",
                            highlight=False, soft_wrap=True,
                        )  # fmt: skip
                        return 1
        finally:
            if live is not None:
                live.update(self.render())
                live.stop()

    def _finish(self) -> int:
        s = self.stats
        self.console.print(self.status_line(), highlight=False, soft_wrap=True)
        self.console.print(
            f"demo done: {s.accepted} events accepted by the gateway, all processed by the worker; "
            f"{self.transitions_seen} transitions seen on {self.settings.topic_transitions}",
            highlight=False, soft_wrap=True,
        )  # fmt: skip
        for message in list(self.recent)[-5:]:
            self.console.print("  " + observe.format_transition(message), highlight=False, soft_wrap=True)
        if self.transitions_seen == 0:
            self.console.print("no transitions reached TRANSITIONS: see the worker's log", style="red")
            return 1
        return 0


def where_next(endpoints: Endpoints, bootstrap: str, logs: Path) -> str:
    """Where to look once it runs, as commands that work from another shell as printed."""
    b = "" if bootstrap == "127.0.0.1:9092" else f" -b {bootstrap}"
    q = "" if endpoints.worker.endswith(":6066") else f" --url {endpoints.worker}"
    return (
        f"look next:\n"
        f"  API docs   {endpoints.gateway}/docs\n"
        f"  metrics    {endpoints.gateway}/metrics   {endpoints.worker}/metrics\n"
        f"  presence   curl {endpoints.worker}/presence/<userid>   ·   presence query{q} <userid>\n"
        f"  streams    presence tail{b}   ·   presence tail{b} --state --user <userid>   ·   presence topics{b}\n"
        f"  logs       {logs}/gateway.log   {logs}/worker.log"
    )


def lose(generated: trace.Trace, share: float, seed: int) -> trace.Trace:
    """``generated`` without a ``share`` of its deliveries (callbacks upstream gave up on), chosen by ``seed``.
    A retry of a lost delivery is sent as a request of its own (upstream's retry got through)."""
    if share <= 0:
        return generated
    rng = random.Random(seed)  # noqa: S311 - a reproducible demo, not a secret
    kept: list[trace.Delivery] = []
    moved: dict[int, int] = {}
    for index, delivery in enumerate(generated.deliveries):
        if rng.random() < share:
            continue
        retry_of = moved.get(delivery.retry_of) if delivery.retry_of is not None else None
        moved[index] = len(kept)
        kept.append(trace.Delivery(delivery.at_ms, delivery.nonce, delivery.events, retry_of))
    return trace.Trace(generated.spec, kept, generated.scenarios)
