from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.contract import compute_signature
from gateway.config import GatewaySettings
from gateway.main import create_app
from gateway.metrics import GatewayMetrics

from .fakes import MemoryKafka

APP_KEY = "test-app-key"
SECRET = "test-secret-0001"
PATH = "/rongcloud/online-status"


def signed_url(
    *,
    secret: str = SECRET,
    nonce: str = "n1",
    timestamp: int | None = None,
    path: str = PATH,
    names: tuple[str, str, str] = ("timestamp", "nonce", "signature"),
) -> str:
    ts = str(timestamp if timestamp is not None else time.time_ns() // 1_000_000)
    sig = compute_signature(secret, nonce, ts)
    t, n, s = names
    return f"{path}?appKey={APP_KEY}&{t}={ts}&{n}={nonce}&{s}={sig}"


@pytest.fixture
def gateway_settings(tmp_path: Path) -> Callable[..., GatewaySettings]:
    def make(**overrides: Any) -> GatewaySettings:
        values: dict[str, Any] = {
            "env": "test",
            "app_key": APP_KEY,
            "app_secret": SECRET,
            "gateway_spool_dir": tmp_path / "spool",
            "gateway_publish_budget_seconds": 0.5,
            "gateway_breaker_cooldown_seconds": 0.05,
            "gateway_breaker_max_cooldown_seconds": 0.2,
            "gateway_kafka_request_timeout_seconds": 0.5,
            "gateway_shutdown_drain_seconds": 0.5,
            # The in-memory Kafka has no topics to ensure; test_startup.py exercises that step.
            "gateway_ensure_topics": False,
        }
        values.update(overrides)
        return GatewaySettings(**values)

    return make


class AppHarness:
    def __init__(
        self, client: httpx.AsyncClient, kafka: MemoryKafka, metrics: GatewayMetrics, app: Any
    ) -> None:
        self.client = client
        self.kafka = kafka
        self.metrics = metrics
        self.app = app

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def harness_factory(gateway_settings: Callable[..., GatewaySettings]) -> Callable[..., Any]:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def make(
        *, kafka: MemoryKafka | None = None, client_addr: str = "127.0.0.1", **overrides: Any
    ) -> AsyncIterator[AppHarness]:
        kafka = kafka or MemoryKafka()
        metrics = GatewayMetrics(process_metrics=False)
        app = create_app(gateway_settings(**overrides), producer_factory=kafka.producer, metrics=metrics)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, client=(client_addr, 40000))
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
                yield AppHarness(client, kafka, metrics, app)

    return make
