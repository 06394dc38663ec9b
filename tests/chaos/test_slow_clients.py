"""Slow clients (slowloris): connections that trickle their request head or body must not starve other callers,
and must not hold the gateway forever. A slow body is answered 408 within the publish budget (G4); a connection
whose request head is not complete within ``PRESENCE_GATEWAY_HEADER_TIMEOUT_SECONDS`` (silent, or stalled after
the request line) is closed, so the connections slow clients can hold are bounded by rate x timeout."""

from __future__ import annotations

import asyncio
import socket
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
from .support import GatewayProcess, Load, percentile, rss_bytes, signed_query


def _open_slow(port: int, head: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head)
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed (or answered and closed) the connection."""
    sock.setblocking(False)
    try:
        data = sock.recv(65536)
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)
    if data == b"":
        return True
    return b"HTTP/1.1 408" in data or _closed_by_server(sock)


def test_slow_clients_do_not_starve_others_and_slow_bodies_get_408(
    settings_for: Callable[..., dict[str, Any]],
    tmp_path: Path,
    pytestconfig: pytest.Config,
    reliability: Report,
) -> None:
    slow = int(knob(pytestconfig, "SLOW_CLIENTS", short=200, long=800))
    values = settings_for()
    asyncio.run(ensure_topics(CommonSettings(**values)))
    head_timeout = 5.0
    gateway = GatewayProcess(
        values,
        tmp_path / "spool",
        tmp_path / "gateway.log",
        extra_env={"PRESENCE_GATEWAY_HEADER_TIMEOUT_SECONDS": str(head_timeout)},
    )
    gateway.start()
    path = "/rongcloud/online-status"
    heads: list[socket.socket] = []
    bodies: list[socket.socket] = []
    load = Load(gateway.webhook, clients=2, batch=10, interval=0.05, tag="slow", seed=3)
    try:
        rss_before = rss_bytes(gateway.pid)
        for n in range(slow):
            if n % 4 == 1:
                heads.append(_open_slow(gateway.port, b""))  # connects and never says anything
            elif n % 2:
                # The head never completes: one header line and then silence.
                heads.append(
                    _open_slow(gateway.port, f"POST {path}?{signed_query(f'h{n}')} HTTP/1.1\r\n".encode())
                )
            else:
                head = (
                    f"POST {path}?{signed_query(f'b{n}')} HTTP/1.1\r\nHost: x\r\n"
                    "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n["
                )
                bodies.append(_open_slow(gateway.port, head.encode()))
        opened = time.monotonic()
        load.start()
        # Legitimate callers are served while every slow connection is open.
        wait_until(lambda: load.requests_acked() >= 100, 60, "100 requests from other callers")
        # Slow bodies are cut off by the body deadline (publish budget 2 s) with 408.
        wait_until(
            lambda: all(_closed_by_server(s) for s in bodies), 30, "slow-body connections answered 408"
        )
        body_closed_after = time.monotonic() - opened
        # Silent and stalled heads are closed by the gateway once the header timeout has passed.
        wait_until(
            lambda: all(_closed_by_server(s) for s in heads),
            head_timeout + 30,
            "stalled heads closed by the gateway",
        )
        heads_closed_after = time.monotonic() - opened
        ledger = load.stop()
        rss_after = rss_bytes(gateway.pid)
        reliability.record(
            "test_slow_clients",
            f"{slow} slowloris connections (silent, stalled head, stalled body) beside normal load",
            faults=slow,
            requests_acked=ledger.acked_requests,
            server_errors=ledger.server_errors,
            details={
                "normal callers' latency p50 / p99 / max (s)": (
                    f"{percentile(ledger.latencies, 0.5):.3f} / {percentile(ledger.latencies, 0.99):.3f} / "
                    f"{max(ledger.latencies):.3f}"
                ),
                "slow-body connections answered 408 and closed within (s)": round(body_closed_after, 1),
                "stalled-head connections all closed by the gateway within (s)": round(heads_closed_after, 1),
                "header timeout (s)": head_timeout,
                "gateway RSS before / after (MiB)": f"{rss_before / 2**20:.1f} / {rss_after / 2**20:.1f}",
                "HTTP statuses of normal callers": dict(sorted(ledger.statuses.items())),
            },
        )
        assert ledger.server_errors == 0 and ledger.transport_errors == 0
        assert set(ledger.statuses) == {200}
        assert percentile(ledger.latencies, 0.99) < 1.0, "slow clients starved the others"
        assert gateway.process is not None and gateway.process.poll() is None
        assert heads_closed_after >= head_timeout - 1, "stalled heads were closed before the header timeout"
    finally:
        if load.is_alive():
            load.stop()
        for sock in heads + bodies:
            sock.close()
        gateway.stop()
