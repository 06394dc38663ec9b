"""The real gateway in a real uvicorn server on a free port, against the session's real Kafka broker."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvicorn
from aiokafka import AIOKafkaConsumer

from core.contract import compute_signature
from gateway.config import GatewaySettings
from gateway.main import create_app
from gateway.server import uvicorn_config
from gateway.webhook import Gateway
from presence.localkafka import free_port

APP_KEY = "integration-app"
SECRET = "integration-secret-1"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def signed_query(*, nonce: str, secret: str = SECRET, timestamp: int | None = None) -> str:
    ts = str(timestamp if timestamp is not None else now_ms())
    return f"appKey={APP_KEY}&timestamp={ts}&nonce={nonce}&signature={compute_signature(secret, nonce, ts)}"


def event(userid: str, session: str, status: str = "0", **extra: Any) -> dict[str, Any]:
    return {
        "userid": userid,
        "status": status,
        "os": "Android",
        "time": now_ms() - 500,
        "clientIp": "10.1.2.3:5555",
        "sessionId": session,
        **extra,
    }


class GatewayServer:
    """uvicorn serving create_app(settings) in a thread, with the same server options as ``run``."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.port = free_port()
        self.app = create_app(settings)
        config = uvicorn_config(self.app, settings, host="127.0.0.1", port=self.port)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"gateway-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def webhook(self) -> str:
        return f"{self.url}{self.settings.gateway_path}"

    @property
    def gateway(self) -> Gateway:
        gateway: Gateway = self.app.state.gateway
        return gateway

    def start(self, timeout: float = 60.0) -> GatewayServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("gateway server exited during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError("gateway server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError("gateway server did not stop")


@pytest.fixture
def gateway_settings(
    settings_for: Callable[..., dict[str, Any]], tmp_path: Path
) -> Callable[..., GatewaySettings]:
    def make(**overrides: Any) -> GatewaySettings:
        values = settings_for(
            app_key=APP_KEY,
            app_secret=SECRET,
            gateway_spool_dir=tmp_path / "spool",
            gateway_publish_budget_seconds=2.0,
            gateway_breaker_cooldown_seconds=0.2,
            gateway_breaker_max_cooldown_seconds=1.0,
            gateway_kafka_request_timeout_seconds=5.0,
            gateway_shutdown_grace_seconds=5.0,
            gateway_shutdown_drain_seconds=2.0,
            log_level="INFO",
        )
        values.update(overrides)
        return GatewaySettings(**values)

    return make


@pytest.fixture
def start_gateway() -> Iterator[Callable[[GatewaySettings], GatewayServer]]:
    servers: list[GatewayServer] = []

    def start(settings: GatewaySettings) -> GatewayServer:
        server = GatewayServer(settings).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.thread.is_alive():
            server.stop()


async def consume(
    settings: GatewaySettings,
    topic: str,
    until: Callable[[list[tuple[bytes | None, dict[str, Any], dict[str, Any]]]], bool],
    timeout: float = 60.0,
) -> list[tuple[bytes | None, dict[str, Any], dict[str, Any]]]:
    """Read ``topic`` from the beginning until ``until(records)`` holds; records are (key, value, metadata)."""
    consumer = AIOKafkaConsumer(
        topic,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        isolation_level="read_committed",
        **settings.aiokafka_options(),
    )
    await consumer.start()
    records: list[tuple[bytes | None, dict[str, Any], dict[str, Any]]] = []
    try:
        deadline = time.monotonic() + timeout
        while not until(records):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"condition on {topic} not met in {timeout} s; got {len(records)} records"
                )
            batches = await consumer.getmany(timeout_ms=500)
            for messages in batches.values():
                for message in messages:
                    meta = {"partition": message.partition, "offset": message.offset}
                    records.append((message.key, orjson.loads(message.value), meta))
    finally:
        await consumer.stop()
    return records


async def wait_until(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        await asyncio.sleep(0.05)
