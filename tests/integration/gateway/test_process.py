"""``python -m gateway`` as a process: graceful drain on SIGTERM (G7) and logs without secrets (G9)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.config import GatewaySettings
from presence.localkafka import free_port

from .conftest import SECRET, consume, event, signed_query, wait_until


def _env(settings: GatewaySettings, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_")}
    env.update(
        {
            "PRESENCE_ENV": "test",
            "PRESENCE_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
            "PRESENCE_TOPIC_RAW": settings.topic_raw,
            "PRESENCE_TOPIC_DLQ": settings.topic_dlq,
            "PRESENCE_TOPIC_TRANSITIONS": settings.topic_transitions,
            "PRESENCE_TOPIC_STATE": settings.topic_state,
            "PRESENCE_TOPIC_PARTITIONS": str(settings.topic_partitions),
            "PRESENCE_APP_KEY": settings.app_key,
            "PRESENCE_APP_SECRET": settings.app_secret.get_secret_value(),
            "PRESENCE_GATEWAY_HOST": "127.0.0.1",
            "PRESENCE_GATEWAY_PORT": str(port),
            "PRESENCE_GATEWAY_SPOOL_DIR": str(settings.gateway_spool_dir),
            "PRESENCE_GATEWAY_PUBLISH_BUDGET_SECONDS": "1",
            "PRESENCE_LOG_LEVEL": "INFO",
            "PRESENCE_LOG_FORMAT": "json",
            **extra,
        }
    )
    return env


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], str, Path]]]:
    processes: list[subprocess.Popen[bytes]] = []

    def start(settings: GatewaySettings, **extra: str) -> tuple[subprocess.Popen[bytes], str, Path]:
        port = free_port()
        log_path = tmp_path / f"gateway-{port}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway"],
            env=_env(settings, port, **extra),
            stdout=log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise AssertionError(f"gateway exited: {log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("gateway did not come up")
            time.sleep(0.1)
        return process, url, log_path

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_g7_sigterm_drains_the_spool_before_exit_and_g9_logs_hold_no_secrets(
    kafka_broker: Any,
    gateway_settings: Callable[..., GatewaySettings],
    gateway_process: Callable[..., tuple[subprocess.Popen[bytes], str, Path]],
) -> None:
    if not kafka_broker.restartable:
        pytest.skip("needs the session's own broker (PRESENCE_TEST_KAFKA is set)")
    settings = gateway_settings()
    # A long breaker cooldown keeps the drainer from retrying on its own: only the shutdown drain can empty it.
    process, url, log_path = gateway_process(
        settings,
        PRESENCE_GATEWAY_BREAKER_COOLDOWN_SECONDS="120",
        PRESENCE_GATEWAY_BREAKER_MAX_COOLDOWN_SECONDS="120",
        PRESENCE_GATEWAY_SHUTDOWN_DRAIN_SECONDS="30",
        # Every request logged, so every line can be checked for secrets (G9).
        PRESENCE_GATEWAY_ACCESS_LOG_SUCCESS_SAMPLE="1",
    )
    sent: set[str] = set()
    signatures: list[str] = []
    async with httpx.AsyncClient(timeout=10) as client:
        await asyncio.to_thread(kafka_broker.stop)
        try:
            for r in range(10):
                query = signed_query(nonce=f"term-{r}")
                signatures.append(query.rsplit("signature=", 1)[1])
                events = [event(f"term-u{r}-{i}", f"s{i}") for i in range(5)]
                response = await client.post(f"{url}{settings.gateway_path}?{query}", json=events)
                assert response.status_code == 200
                sent |= {e["userid"] for e in events}
            ready = (await client.get(f"{url}/readyz")).json()
            assert ready["spool_records"] == 50
            assert ready["kafka"] == "open"
        finally:
            await asyncio.to_thread(kafka_broker.start)
    process.send_signal(signal.SIGTERM)
    await wait_until(lambda: process.poll() is not None, timeout=60, what="gateway exited after SIGTERM")
    # uvicorn re-raises the signal once shut down, so the exit status reports SIGTERM like any signalled process.
    assert process.returncode in (0, -signal.SIGTERM)

    raw = await consume(settings, settings.topic_raw, lambda rs: {v["userid"] for _, v, _ in rs} >= sent)
    assert {v["userid"] for _, v, _ in raw} == sent
    assert list(settings.gateway_spool_dir.glob("*.seg")) == []

    lines = log_path.read_text().splitlines()
    entries = [orjson.loads(line) for line in lines if line.startswith("{")]
    assert len(entries) == len(lines), "every log line is JSON"
    assert any(
        e.get("logger") == "gateway.access" and e.get("path") == settings.gateway_path for e in entries
    )
    text = log_path.read_text()
    assert SECRET not in text
    assert not any(signature in text for signature in signatures)
    assert "term-0" not in text  # nonces stay out too
