"""Intake-gap markers (G10) against a real broker: a gateway process killed with SIGKILL marks the window from its
last heartbeat on every RAW partition when it starts again, one stopped cleanly marks nothing, and a failed answer
marks its time."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.config import GatewaySettings
from gateway.gaps import HEARTBEAT_FILE

from .conftest import GatewayServer, consume, event, signed_query, wait_until

pytestmark = pytest.mark.integration

Process = Callable[..., tuple[subprocess.Popen[bytes], str, Path]]
# Fast beats and a short quiet time keep the tests short.
FAST = {"PRESENCE_GATEWAY_HEARTBEAT_SECONDS": "0.2", "PRESENCE_GATEWAY_INSTANCE": "gateway-0"}


def gap_markers(records: list[tuple[bytes | None, dict[str, Any], dict[str, Any]]]) -> list[dict[str, Any]]:
    return [
        {**value, "partition": meta["partition"], "key": key}
        for key, value, meta in records
        if value.get("kind") == "intake_gap"
    ]


def heartbeat(settings: GatewaySettings) -> dict[str, Any]:
    loaded: dict[str, Any] = orjson.loads((settings.gateway_spool_dir / HEARTBEAT_FILE).read_bytes())
    return loaded


async def test_g10_sigkill_then_restart_marks_the_gap_from_the_last_heartbeat_on_every_partition(
    gateway_settings: Callable[..., GatewaySettings], gateway_process: Process
) -> None:
    settings = gateway_settings()
    partitions = settings.topic_partitions
    process, _, _ = gateway_process(settings, **FAST)
    # A few beats, so the last one is not the first one the start wrote.
    first = heartbeat(settings)["alive_at"]
    await wait_until(lambda: heartbeat(settings)["alive_at"] >= first + 400, what="heartbeats")
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    last = heartbeat(settings)
    assert last["clean"] is False and last["gateway"] == "gateway-0"
    killed_at = time.time_ns() // 1_000_000

    process, url, log_path = gateway_process(settings, **FAST)
    records = await consume(
        settings, settings.topic_raw, lambda rs: len(gap_markers(rs)) >= partitions, gaps=True
    )
    markers = gap_markers(records)
    assert sorted(m["partition"] for m in markers) == list(range(partitions))
    assert {m["key"] for m in markers} == {None}
    assert {(m["id"], m["reason"], m["gateway"], m["start"]) for m in markers} == {
        (markers[0]["id"], "unclean_stop", "gateway-0", last["alive_at"])
    }
    assert markers[0]["end"] >= killed_at
    metrics = httpx.get(f"{url}/metrics").text
    assert 'presence_gateway_intake_gap_markers_total{reason="unclean_stop"} 1.0' in metrics

    # A clean stop (SIGTERM, after the drain) and a start: no marker.
    process.send_signal(signal.SIGTERM)
    process.wait(60)
    assert heartbeat(settings)["clean"] is True
    process, url, log_path = gateway_process(settings, **FAST)
    async with httpx.AsyncClient(timeout=10) as client:
        query = signed_query(nonce="after-clean-stop")
        response = await client.post(f"{url}{settings.gateway_path}?{query}", json=[event("probe", "s1")])
        assert response.status_code == 200
    records = await consume(
        settings, settings.topic_raw, lambda rs: any(v.get("userid") == "probe" for _, v, _ in rs), gaps=True
    )
    assert len(gap_markers(records)) == partitions  # still only the first run's
    assert "did not stop cleanly" not in log_path.read_text()
    metrics = httpx.get(f"{url}/metrics").text
    assert 'presence_gateway_intake_gap_markers_total{reason="unclean_stop"} 0.0' in metrics


async def test_g10_a_failed_answer_marks_its_time_on_every_partition(
    gateway_settings: Callable[..., GatewaySettings],
    start_gateway: Callable[[GatewaySettings], GatewayServer],
) -> None:
    settings = gateway_settings(gateway_max_events=1, gateway_gap_quiet_seconds=2.0, gateway_instance="gw-b")
    server = start_gateway(settings)
    started = time.time_ns() // 1_000_000
    async with httpx.AsyncClient(timeout=10) as client:
        for i in range(10):  # a burst of 413s (each well within the quiet time of the last): one marker
            query = signed_query(nonce=f"too-many-{i}")
            events = [event(f"u{i}", "s1"), event(f"u{i}", "s2")]
            response = await client.post(f"{server.webhook}?{query}", json=events)
            assert response.status_code == 413
    answered = time.time_ns() // 1_000_000
    records = await consume(
        settings, settings.topic_raw, lambda rs: len(gap_markers(rs)) >= settings.topic_partitions, gaps=True
    )
    markers = gap_markers(records)
    assert sorted(m["partition"] for m in markers) == list(range(settings.topic_partitions))
    assert len({m["id"] for m in markers}) == 1
    marker = markers[0]
    assert marker["reason"] == "error_answer" and marker["gateway"] == "gw-b"
    assert started <= marker["start"] <= marker["end"] <= answered
    # The events went nowhere but the dead-letter topic; RAW holds the marker alone.
    assert [v for _, v, _ in records if v.get("kind") is None] == []
