"""Gateway faults (G7): SIGKILL the gateway process under load and start it again on the same spool. Every event
of every request answered 200 is on RAW afterwards; what was in the spool at the kill is replayed on start."""

from __future__ import annotations

import asyncio
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


def test_gateway_sigkill_under_load_then_restart_replays_the_spool(
    kafka_broker: Any,
    settings_for: Callable[..., dict[str, Any]],
    tmp_path: Path,
    pytestconfig: pytest.Config,
    reliability: Report,
) -> None:
    """Kills alternate between a healthy broker (in-flight requests die with the process) and a broker that is
    down (the spool holds acknowledged events when the process dies; the next start must replay them)."""
    if not kafka_broker.restartable:
        pytest.skip("stops the broker: needs the session's own broker (unset PRESENCE_TEST_KAFKA)")
    kills = int(knob(pytestconfig, "GATEWAY_KILLS", short=2, long=8))
    seed = int(time.time()) % 100_000
    values = settings_for()
    asyncio.run(ensure_topics(CommonSettings(**values)))
    gateway = GatewayProcess(values, tmp_path / "spool", tmp_path / "gateway.log")
    gateway.start()
    load = Load(gateway.webhook, clients=3, batch=20, interval=0.05, tag="gk", seed=seed)
    spooled_at_kill: list[int] = []
    kinds: list[str] = []
    try:
        load.start()
        for kill in range(kills):
            broker_down = kill % 2 == 1
            if broker_down:
                kafka_broker.stop()
            try:
                target = load.requests_acked() + 40
                wait_until(
                    lambda t=target: load.requests_acked() >= t, 90, "requests acknowledged before kill"
                )
                spooled = gateway.spool_records() if broker_down else 0
                if broker_down:
                    assert spooled > 0, "with the broker down, acknowledged events must be in the spool"
                gateway.kill()
                spooled_at_kill.append(spooled)
                kinds.append("broker down, spool holding events" if broker_down else "broker up")
            finally:
                if broker_down:
                    kafka_broker.start()
            gateway.start()
            gateway.wait_drained(180)
        target = load.requests_acked() + 30
        wait_until(lambda t=target: load.requests_acked() >= t, 60, "requests after the last restart")
        ledger = load.stop()
        gateway.wait_drained(120)
        delivery = check_delivery(ledger, raw_events(kafka_broker.bootstrap, values["topic_raw"]))
        reliability.record(
            "test_gateway_faults",
            f"gateway SIGKILL + restart x{kills} under load (every other one with the broker down)",
            faults=kills,
            requests_acked=ledger.acked_requests,
            events_acked=delivery.acked,
            events_lost=delivery.lost,
            duplicates=delivery.duplicates,
            server_errors=ledger.server_errors,
            details={
                "seed": seed,
                "kills": "; ".join(
                    f"{k} ({n} records spooled)" for k, n in zip(kinds, spooled_at_kill, strict=True)
                ),
                "HTTP statuses": dict(sorted(ledger.statuses.items())),
                "requests cut by the kill (transport errors, not acknowledged)": ledger.transport_errors,
                "unacknowledged events found on RAW anyway": delivery.unacked_delivered,
                "latency p50 / p99 (s)": (
                    f"{percentile(ledger.latencies, 0.5):.3f} / {percentile(ledger.latencies, 0.99):.3f}"
                ),
            },
        )
        assert delivery.lost == 0, f"{delivery.lost} acknowledged events lost, e.g. {delivery.lost_sample}"
        assert delivery.phantoms == 0, f"{delivery.phantoms} events on RAW that nobody sent"
        assert ledger.server_errors == 0, f"5xx answers: {ledger.statuses}"
    finally:
        if load.is_alive():
            load.stop()
        kafka_broker.start()
        gateway.stop()
