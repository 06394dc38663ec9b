"""Soak: steady signed traffic through a gateway into a worker for a configurable time (short mode: 90 s; long
mode: 30 min; ``PRESENCE_CHAOS_SOAK_SECONDS``). Records RSS of both processes, request latency and the worker's
consumer lag; afterwards every acknowledged event is on RAW and the worker has caught up. Flat memory means the
gateway's RSS grows < 5 % from the end of warm-up to the end (the worker's too in long mode, where warm-up covers
its ended-session retention)."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.topics import ensure_topics
from presence.children import wait_until
from streams.config import WorkerSettings
from streams.main import worker_topics
from tests.integration.streams.harness import WorkerProcess, worker_env

from .conftest import knob, long_mode
from .report import Report
from .support import GatewayProcess, Load, check_delivery, percentile, raw_events, rss_bytes

SAMPLE_SECONDS = 5.0
# Bounded caches fill during warm-up: the replay guard holds a window of nonces, the worker ended sessions.
REPLAY_WINDOW_SECONDS = 30
ENDED_SESSION_RETENTION_SECONDS = 60
ROCKSDB_BUFFER_BYTES = 1024**2


def _lag(worker: WorkerProcess) -> float:
    try:
        return worker.metric("presence_worker_consumer_lag_messages")
    except (httpx.HTTPError, ValueError):
        return float("nan")


def _growth(samples: list[int], warmup: int) -> float:
    """Percent change from the median of the first post-warm-up samples to the median of the last ones."""
    after = samples[warmup:]
    span = max(3, len(after) // 5)
    base, end = statistics.median(after[:span]), statistics.median(after[-span:])
    return (end - base) / base * 100


def test_soak_steady_load_memory_flat_nothing_lost(
    kafka_bootstrap: str,
    settings_for: Callable[..., dict[str, Any]],
    unique: Callable[[str], str],
    tmp_path: Path,
    pytestconfig: pytest.Config,
    reliability: Report,
) -> None:
    duration = knob(pytestconfig, "SOAK_SECONDS", short=90, long=1800)
    warmup_seconds = max(2 * REPLAY_WINDOW_SECONDS, duration / 3)
    values = settings_for()
    app_id = unique("soak")
    settings = WorkerSettings(**values, worker_app_id=app_id)
    asyncio.run(ensure_topics(settings, extra=worker_topics(settings)))
    gateway = GatewayProcess(
        values,
        tmp_path / "spool",
        tmp_path / "gateway.log",
        extra_env={"PRESENCE_GATEWAY_TIMESTAMP_WINDOW_SECONDS": str(REPLAY_WINDOW_SECONDS)},
    )
    worker = WorkerProcess(
        env=worker_env(
            values,
            app_id,
            PRESENCE_WORKER_ENDED_SESSION_RETENTION_SECONDS=str(ENDED_SESSION_RETENTION_SECONDS),
            # RocksDB's memtables and block cache grow until they reach their configured size, which at this
            # rate takes longer than a soak with the defaults: with the smallest sizes they are full within the
            # warm-up, and what still grows after it is the worker's own memory.
            PRESENCE_WORKER_ROCKSDB_WRITE_BUFFER_BYTES=str(ROCKSDB_BUFFER_BYTES),
            PRESENCE_WORKER_ROCKSDB_BLOCK_CACHE_BYTES=str(ROCKSDB_BUFFER_BYTES),
            PRESENCE_LOG_LEVEL="WARNING",
        ),
        data_dir=tmp_path / "worker",
        log_path=tmp_path / "worker.log",
    )
    gateway.start()
    worker.start()
    load = Load(gateway.webhook, clients=2, batch=10, interval=0.1, users=500, tag="soak", seed=7)
    gateway_rss: list[int] = []
    worker_rss: list[int] = []
    lags: list[float] = []
    try:
        worker.wait_ready(120)
        load.start()
        started = time.monotonic()
        next_sample = started
        while time.monotonic() - started < duration:
            # Sampling cadence of the soak, not synchronisation.
            wait_until(lambda t=next_sample: time.monotonic() >= t, SAMPLE_SECONDS + 5, "the next sample")
            next_sample += SAMPLE_SECONDS
            gateway_rss.append(rss_bytes(gateway.pid))
            assert worker.process is not None
            worker_rss.append(rss_bytes(worker.process.pid))
            lags.append(_lag(worker))
            assert load.is_alive(), "the load generator died"
        ledger = load.stop()
        gateway.wait_drained(60)
        caught_up = time.monotonic()
        try:
            wait_until(lambda: _lag(worker) == 0, 120, "the worker to catch up (lag 0)", interval=1.0)
            catch_up = f"{time.monotonic() - caught_up:.1f} s"
        except TimeoutError:
            catch_up = f"not within 120 s (lag {_lag(worker):.0f})"
        delivery = check_delivery(ledger, raw_events(kafka_bootstrap, values["topic_raw"]))
        warmup = int(warmup_seconds / SAMPLE_SECONDS)
        gateway_growth = _growth(gateway_rss, warmup)
        worker_growth = _growth(worker_rss, warmup)
        known_lags = [lag for lag in lags if lag == lag]
        mib = 2**20
        reliability.record(
            "test_soak",
            f"{duration / 60:.1f} min steady load, gateway + worker",
            requests_acked=ledger.acked_requests,
            events_acked=delivery.acked,
            events_lost=delivery.lost,
            duplicates=delivery.duplicates,
            server_errors=ledger.server_errors,
            rss_growth_pct=gateway_growth,
            details={
                "duration / warm-up (s)": f"{duration:.0f} / {warmup_seconds:.0f}",
                "rate (events/s)": round(delivery.acked / duration),
                "gateway RSS start / after warm-up / end (MiB)": (
                    f"{gateway_rss[0] / mib:.1f} / {gateway_rss[warmup] / mib:.1f} / {gateway_rss[-1] / mib:.1f}"
                ),
                "gateway RSS growth after warm-up": f"{gateway_growth:+.1f} %",
                "worker RSS start / after warm-up / end (MiB)": (
                    f"{worker_rss[0] / mib:.1f} / {worker_rss[warmup] / mib:.1f} / {worker_rss[-1] / mib:.1f}"
                ),
                "worker RSS growth after warm-up": f"{worker_growth:+.1f} %",
                "worker RocksDB write buffer and block cache per partition (MiB)": ROCKSDB_BUFFER_BYTES
                / 2**20,
                "request latency p50 / p99 / max (s)": (
                    f"{percentile(ledger.latencies, 0.5):.3f} / {percentile(ledger.latencies, 0.99):.3f} / "
                    f"{max(ledger.latencies):.3f}"
                ),
                "worker consumer lag median / max (messages)": (
                    f"{statistics.median(known_lags):.0f} / {max(known_lags):.0f}" if known_lags else "–"
                ),
                "HTTP statuses": dict(sorted(ledger.statuses.items())),
                "worker caught up (lag 0) after the load stopped": catch_up,
            },
        )
        assert catch_up.endswith(" s"), f"the worker did not catch up: {catch_up}"
        assert delivery.lost == 0, f"{delivery.lost} acknowledged events lost, e.g. {delivery.lost_sample}"
        assert ledger.server_errors == 0, f"5xx answers: {ledger.statuses}"
        assert ledger.transport_errors == 0
        assert gateway_growth < 5.0, f"gateway RSS grew {gateway_growth:.1f} % after warm-up"
        if long_mode(pytestconfig):
            assert worker_growth < 5.0, f"worker RSS grew {worker_growth:.1f} % after warm-up"
    finally:
        if load.is_alive():
            load.stop()
        worker.stop()
        gateway.stop()
