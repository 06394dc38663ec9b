"""The HTTP server around the app: uvicorn's configuration, a request-head timeout, the access log, and telling
the app when a shutdown begins."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, MutableMapping
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.config import GatewaySettings

access_log = logging.getLogger("gateway.access")


_PROBES = frozenset(("/healthz", "/readyz", "/metrics"))


class AccessLogMiddleware:
    """A JSON line per request: method, path without the query string (it carries the signature), status,
    outcome, refusal reason, duration.

    Every answer of 400 and above is logged, successes only in the fraction ``success_sample`` (a line costs more
    than a tenth of the gateway's own work on a request); the probes and /metrics at DEBUG.
    """

    def __init__(self, app: ASGIApp, *, success_sample: float = 1.0) -> None:
        self.app = app
        self._success_sample = success_sample
        # Successes owed a line: each adds the sample fraction, and a line is written whenever it reaches one, so
        # exactly that fraction is logged, evenly spread.
        self._success_credit = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500
        state: MutableMapping[str, Any] = scope.setdefault("state", {})

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path: str = scope.get("path", "")
            level = logging.DEBUG if path in _PROBES else logging.INFO
            if access_log.isEnabledFor(level) and (
                level == logging.DEBUG or status >= 400 or self._sampled()
            ):
                client = scope.get("client")
                access_log.log(
                    level,
                    "request",
                    extra={
                        "method": scope.get("method"),
                        "path": path,
                        "status": status,
                        "duration_ms": round((time.monotonic() - started) * 1000, 2),
                        "client": client[0] if client else None,
                        "outcome": state.get("outcome"),
                        "reason": state.get("reason"),
                    },
                )

    def _sampled(self) -> bool:
        self._success_credit += self._success_sample
        if self._success_credit < 1.0:
            return False
        self._success_credit -= 1.0
        return True


class Server(uvicorn.Server):
    """uvicorn's server, telling the app on SIGTERM/SIGINT so /readyz fails while in-flight requests finish."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)


class _HeadTimeoutProtocol(HttpToolsProtocol):
    """httptools' HTTP protocol, closing a connection whose request head does not arrive in time.

    uvicorn times out idle keep-alive connections only after a response; a client that connects and trickles
    (or never sends) its request line and headers would hold the connection forever (slowloris).
    """

    head_timeout_seconds = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout_seconds, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def _http_protocol(head_timeout_seconds: float) -> type[HttpToolsProtocol]:
    return type(
        "HeadTimeoutProtocol", (_HeadTimeoutProtocol,), {"head_timeout_seconds": head_timeout_seconds}
    )


def uvicorn_config(app: FastAPI, settings: GatewaySettings, **overrides: Any) -> uvicorn.Config:
    """The server configuration the gateway runs with (uvloop, httptools, no access log, no proxy rewriting)."""
    options: dict[str, Any] = {
        "host": settings.gateway_host,
        "port": settings.gateway_port,
        "loop": "uvloop",
        "http": _http_protocol(settings.gateway_header_timeout_seconds),
        "lifespan": "on",
        "access_log": False,
        "log_config": None,
        # X-Forwarded-For is judged by the allow-list's own trusted-proxy rule, not rewritten by the server.
        "proxy_headers": False,
        "server_header": False,
        "timeout_graceful_shutdown": int(settings.gateway_shutdown_grace_seconds) or None,
        "timeout_keep_alive": 15,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)
