"""Broker faults (G6, G7): SIGKILL the Kafka broker while the gateway is under load, restart it, and check that
every event of every request answered 200 is on RAW afterwards, through the spool where needed."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from core.settings import CommonSettings
from core.topics import ensure_topics
from presence.children import wait_until

from .conftest import knob
from .report import Report
from .support import GatewayProcess, Load, check_delivery, percentile, raw_events


def test_broker_sigkill_under_load_loses_no_acknowledged_event(
    kafka_broker: Any,
    settings_for: Callable[..., dict[str, Any]],
    tmp_path: Path,
    pytestconfig: pytest.Config,
    reliability: Report,
) -> None:
    if not kafka_broker.restartable:
        pytest.skip("kills the broker: needs the session's own broker (unset PRESENCE_TEST_KAFKA)")
    cycles = int(knob(pytestconfig, "BROKER_KILLS", short=1, long=5))
    seed = int(time.time()) % 100_000
    rng = random.Random(seed)
    values = settings_for()
    asyncio.run(ensure_topics(CommonSettings(**values)))
    gateway = GatewayProcess(values, tmp_path / "spool", tmp_path / "gateway.log")
    gateway.start()
    load = Load(gateway.webhook, clients=3, batch=20, interval=0.05, tag="bk", seed=seed)
    outages: list[str] = []
    max_spooled = 0
    try:
        load.start()
        for cycle in range(cycles):
            # Some acknowledged traffic through a healthy broker before each fault.
            target = load.requests_acked() + 30
            wait_until(lambda t=target: load.requests_acked() >= t, 60, "30 requests acknowledged")
            kafka_broker.kill()
            killed = time.monotonic()
            try:
                # Load keeps flowing during the outage; the gateway must answer through the spool.
                target = load.requests_acked() + 40 + rng.randrange(40)
                wait_until(
                    lambda t=target: load.requests_acked() >= t, 90, "requests acknowledged while down"
                )
                max_spooled = max(max_spooled, gateway.spool_records())
            finally:
                kafka_broker.start()
            outages.append(f"{time.monotonic() - killed:.1f} s")
            wait_until(
                lambda: gateway.readiness()["kafka"] == "closed",
                120,
                f"breaker closed after kill {cycle + 1}",
            )
        target = load.requests_acked() + 30
        wait_until(lambda t=target: load.requests_acked() >= t, 60, "30 requests after the last restart")
        ledger = load.stop()
        gateway.wait_drained(180)
        seen = raw_events(kafka_broker.bootstrap, values["topic_raw"])
        delivery = check_delivery(ledger, seen)
        reliability.record(
            "test_broker_faults",
            f"broker SIGKILL + restart x{cycles} under gateway load",
            faults=cycles,
            requests_acked=ledger.acked_requests,
            events_acked=delivery.acked,
            events_lost=delivery.lost,
            duplicates=delivery.duplicates,
            server_errors=ledger.server_errors,
            details={
                "seed": seed,
                "outage durations (kill to restarted)": ", ".join(outages),
                "most records in the spool at once": max_spooled,
                "HTTP statuses": dict(sorted(ledger.statuses.items())),
                "transport errors": ledger.transport_errors,
                "latency p50 / p99 / max (s)": (
                    f"{percentile(ledger.latencies, 0.5):.3f} / {percentile(ledger.latencies, 0.99):.3f} / "
                    f"{max(ledger.latencies):.3f}"
                ),
                "unacknowledged events found on RAW": delivery.unacked_delivered,
            },
        )
        assert max_spooled > 0, "the outage never reached the spool: the fault was not exercised"
        assert delivery.lost == 0, f"{delivery.lost} acknowledged events lost, e.g. {delivery.lost_sample}"
        assert delivery.phantoms == 0, f"{delivery.phantoms} events on RAW that nobody sent"
        assert ledger.server_errors == 0, f"5xx answers: {ledger.statuses}"
        assert max(ledger.latencies) < 5.0, "an answer took longer than RongCloud's 5 s timeout"
    finally:
        if load.is_alive():
            load.stop()
        kafka_broker.start()
        gateway.stop()
