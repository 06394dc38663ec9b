"""The gateway's HTTP application: ``create_app(settings)`` builds it, ``run(settings)`` serves it with uvicorn."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Annotated, Any

import orjson
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from core.contract import STATUS_BY_CODE
from core.logs import configure_logging
from core.topics import TopicsNotReady, ensure_topics
from gateway.config import GatewaySettings, get_settings
from gateway.metrics import GatewayMetrics
from gateway.parsing import BodyError, DeadLetter, Receipt, body_too_large, parse_body
from gateway.publisher import Delivery, ProducerFactory, Publisher, Unavailable, kafka_producer_factory
from gateway.signing import AuthFailure, ReplayGuard, body_digest, extract_params, verify
from gateway.sources import client_address, is_allowed
from gateway.spool import Spool, SpoolRecord

log = logging.getLogger("gateway")
access_log = logging.getLogger("gateway.access")

# How long one attempt to ensure the topics may take (reaching Kafka, creating, waiting for leaders).
ENSURE_TOPICS_TIMEOUT_SECONDS = 10.0

# Below this much time left, a direct publish could not succeed anyway: spool without judging Kafka by it.
_MIN_DIRECT_PUBLISH_SECONDS = 0.25


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Gateway:
    """Everything a request needs, built once per app."""

    settings: GatewaySettings
    metrics: GatewayMetrics
    publisher: Publisher
    replay_guard: ReplayGuard
    shutting_down: bool = False

    def begin_shutdown(self) -> None:
        """Stop calling ourselves ready; requests already in flight still complete."""
        self.shutting_down = True

    def ready(self) -> bool:
        return not self.shutting_down and self.publisher.ready()


async def get_gateway(request: Request) -> Gateway:
    # async: FastAPI runs a plain-def dependency in its thread pool, a thread hop per request.
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


def _json(status: int, content: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json", headers=headers)


async def _ensure_topics(settings: GatewaySettings) -> bool:
    """Create the product's topics (D2); False if Kafka is not ready (retried before the producer connects).

    A :class:`core.topics.TopicLayoutError` (topics that exist with a layout the product cannot use) is raised
    on: the gateway refuses to start rather than misroute users.
    """
    try:
        created = await ensure_topics(settings, timeout=ENSURE_TOPICS_TIMEOUT_SECONDS)
    except TopicsNotReady as exc:
        log.warning("could not ensure topics; Kafka not ready, spooling meanwhile", extra={"error": str(exc)})
        return False
    if created:
        log.info("created topics", extra={"topics": created})
    return True


def create_app(
    settings: GatewaySettings | None = None,
    *,
    producer_factory: ProducerFactory | None = None,
    metrics: GatewayMetrics | None = None,
) -> FastAPI:
    """Build the gateway app. Nothing connects until the app's lifespan starts."""
    settings = settings or get_settings()
    metrics = metrics or GatewayMetrics()
    factory = producer_factory or kafka_producer_factory(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        spool = None
        if settings.gateway_spool_enabled:
            spool = Spool(
                settings.gateway_spool_dir,
                max_bytes=settings.gateway_spool_max_bytes,
                segment_bytes=settings.gateway_spool_segment_bytes,
                clock_ms=_wall_ms,
            )
        prepare = None
        if settings.gateway_ensure_topics and not await _ensure_topics(settings):

            async def prepare() -> None:
                if not await _ensure_topics(settings):
                    raise OSError("topics not ensured yet")

        publisher = Publisher(settings, metrics, producer_factory=factory, spool=spool, prepare=prepare)
        window_ms = int(settings.gateway_timestamp_window_seconds * 1000)
        guard = ReplayGuard(
            window_ms=window_ms, max_entries=settings.gateway_replay_cache_max_entries, clock_ms=_wall_ms
        )
        metrics.replay_cache_entries.set_function(lambda: len(guard))
        gateway = Gateway(settings, metrics, publisher, guard)
        app.state.gateway = gateway
        if not settings.secrets():
            log.warning("PRESENCE_APP_SECRET is empty: every callback will be refused")
        await publisher.start(connect_timeout=settings.gateway_publish_budget_seconds)
        # Everything allocated by start-up (FastAPI, pydantic, aiokafka) lives as long as the process: keep it
        # out of the cyclic collector's full passes, which would otherwise walk it all and stall requests.
        gc.freeze()
        log.info(
            "gateway started",
            extra={
                "path": settings.gateway_path,
                "kafka": settings.kafka_bootstrap_servers,
                "topic_raw": settings.topic_raw,
                "topic_dlq": settings.topic_dlq,
                "spool": str(settings.gateway_spool_dir) if spool else None,
            },
        )
        try:
            yield
        finally:
            gateway.begin_shutdown()
            await publisher.stop(drain_seconds=settings.gateway_shutdown_drain_seconds)
            log.info("gateway stopped")

    app = FastAPI(
        title="RongCloud presence gateway",
        description=(
            "Receives RongCloud's signed online-status callbacks and publishes every event to Kafka. "
            "Rules G1-G9 are described in docs/gateway.md."
        ),
        version="1",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.add_middleware(AccessLogMiddleware)

    app.add_api_route(
        settings.gateway_path,
        _webhook,
        methods=["POST"],
        summary="RongCloud online-status callback",
        response_class=JSONResponse,
        responses={
            200: {
                "description": "Every event is in Kafka or in the durable spool; rejected ones dead-lettered."
            },
            400: {
                "description": "The body is not a JSON array of events nor the wrapper object (dead-lettered)."
            },
            401: {
                "description": "Missing or invalid signature parameters, stale timestamp or replayed nonce."
            },
            403: {"description": "Source address not in the allow-list."},
            413: {"description": "Body or event count over the limit (dead-lettered)."},
            503: {"description": "Kafka is not acknowledging and the spool is full or disabled."},
        },
        openapi_extra=_WEBHOOK_OPENAPI,
    )

    @app.get("/healthz", summary="Liveness: the process serves HTTP")
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: callbacks can be accepted (Kafka healthy or spool has room)")
    async def readyz(gateway: GatewayDep) -> Response:
        """Ready while the gateway can accept callbacks (G9)."""
        spool = gateway.publisher.spool
        body = {
            "ready": gateway.ready(),
            "kafka": gateway.publisher.breaker.state.value,
            "spool_records": spool.records if spool else None,
            "spool_bytes": spool.bytes if spool else None,
        }
        return _json(200 if body["ready"] else 503, body)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> Response:
        """Prometheus exposition of the gateway's metrics (M1)."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["userid", "status", "time", "sessionId"],
    "properties": {
        "userid": {"type": "string", "minLength": 1, "maxLength": 64},
        "status": {"type": "string", "enum": ["0", "1", "2"], "description": "0 online, 1 offline, 2 logout"},
        "os": {"type": "string"},
        "time": {"type": "integer", "description": "epoch milliseconds"},
        "clientIp": {"type": "string"},
        "sessionId": {"type": "string", "minLength": 1},
    },
}

_WEBHOOK_OPENAPI: dict[str, Any] = {
    "parameters": [
        {"name": "appKey", "in": "query", "required": True, "schema": {"type": "string"}},
        {
            "name": "timestamp",
            "in": "query",
            "required": True,
            "schema": {"type": "string"},
            "description": "Epoch ms (10-digit seconds accepted). Also accepted as signTimestamp or rc-timestamp.",
        },
        {
            "name": "nonce",
            "in": "query",
            "required": True,
            "schema": {"type": "string"},
            "description": "Also accepted as rc-nonce.",
        },
        {
            "name": "signature",
            "in": "query",
            "required": True,
            "schema": {"type": "string"},
            "description": "hex SHA1(appSecret + nonce + timestamp). Also accepted as rc-signature.",
        },
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        {"type": "array", "items": _EVENT_SCHEMA},
                        {
                            "type": "object",
                            "required": ["data"],
                            "properties": {
                                "type": {"type": "string", "const": "user:connection_status"},
                                "id": {"type": "string"},
                                "time": {"type": "integer"},
                                "data": {"type": "array", "items": _EVENT_SCHEMA},
                            },
                        },
                    ]
                }
            }
        },
    },
}


class _BodyTooLarge(Exception):
    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        # Read no more than the limit: the prefix is all the dead letter keeps anyway.
        prefix = bytearray()
        async for chunk in request.stream():
            prefix += chunk
            if len(prefix) > limit:
                break
        raise _BodyTooLarge(bytes(prefix[:limit]))
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _BodyTooLarge(bytes(body[:limit]))
    return bytes(body)


def _records(
    settings: GatewaySettings, events: list[dict[str, Any]], letters: list[DeadLetter]
) -> list[SpoolRecord]:
    records = [
        SpoolRecord(settings.topic_raw, event["userid"].encode("utf-8"), orjson.dumps(event))
        for event in events
    ]
    records.extend(
        SpoolRecord(
            settings.topic_dlq,
            letter.key.encode("utf-8") if letter.key is not None else None,
            orjson.dumps(letter.value),
        )
        for letter in letters
    )
    return records


async def _webhook(request: Request) -> Response:
    """Verify a RongCloud callback and publish its events (G1-G8)."""
    # Taken from the app's state rather than through a FastAPI dependency: the webhook is the hot path, and
    # dependency solving is a measurable share of the framework's work per request.
    gateway: Gateway = request.app.state.gateway
    settings, metrics = gateway.settings, gateway.metrics
    started = time.monotonic()
    deadline = started + settings.gateway_publish_budget_seconds
    received_at = _wall_ms()

    def finish(outcome: str, response: Response) -> Response:
        metrics.requests.labels(outcome).inc()
        metrics.request_duration.labels(outcome).observe(time.monotonic() - started)
        request.scope.setdefault("state", {})["outcome"] = outcome
        return response

    def refuse(reason: AuthFailure) -> Response:
        metrics.auth_failures.labels(reason.value).inc()
        request.scope.setdefault("state", {})["reason"] = reason.value
        return finish("unauthorized", _json(401, {"error": "unauthorized"}))

    peer = request.client.host if request.client else None
    source = client_address(peer, request.headers.get("x-forwarded-for"), settings.gateway_trusted_proxies)
    if not is_allowed(source, settings.gateway_allow_cidrs):
        return finish("forbidden", _json(403, {"error": "forbidden"}))

    params = extract_params(request.query_params)
    if isinstance(params, AuthFailure):
        return refuse(params)
    failure = verify(
        params,
        app_key=settings.app_key,
        secrets=settings.secrets(),
        now_ms=received_at,
        window_ms=int(settings.gateway_timestamp_window_seconds * 1000),
    )
    if failure is not None:
        return refuse(failure)

    too_large: bytes | None = None
    try:
        async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
            body = await _read_body(request, settings.gateway_max_body_bytes)
    except _BodyTooLarge as exc:
        body, too_large = exc.prefix, exc.prefix
    except (TimeoutError, ClientDisconnect):
        return finish("bad_request", _json(408, {"error": "request body not received in time"}))

    if not gateway.replay_guard.check(
        params.nonce, params.timestamp_ms, body_digest(body, truncated=too_large is not None)
    ):
        return refuse(AuthFailure.REPLAYED_NONCE)

    receipt = Receipt(received_at=received_at, nonce=params.nonce, timestamp=params.timestamp)
    parsed = (
        body_too_large(
            too_large,
            limit=settings.gateway_max_body_bytes,
            receipt=receipt,
            raw_limit=settings.gateway_dlq_raw_max_bytes,
        )
        if too_large is not None
        else parse_body(
            body,
            receipt=receipt,
            max_events=settings.gateway_max_events,
            max_future_ms=int(settings.gateway_max_future_skew_seconds * 1000),
            raw_limit=settings.gateway_dlq_raw_max_bytes,
        )
    )

    if isinstance(parsed, BodyError):
        events: list[dict[str, Any]] = []
        letters = [parsed.dead_letter]
    else:
        events, letters = parsed.events, parsed.rejects

    records = _records(settings, events, letters)
    remaining = deadline - time.monotonic()
    try:
        if remaining < _MIN_DIRECT_PUBLISH_SECONDS:
            delivery = await gateway.publisher.publish_to_spool(records)
        else:
            delivery = await gateway.publisher.publish(records, budget=remaining)
    except Unavailable as exc:
        log.error("cannot accept a callback: kafka unavailable and spool unusable", extra={"error": str(exc)})
        _count_events(metrics, events, "refused")
        return finish("unavailable", _json(503, {"error": "unavailable"}, headers={"Retry-After": "5"}))

    for letter in letters:
        metrics.dead_letters.labels(letter.reason).inc()
    if isinstance(parsed, BodyError):
        outcome = "too_large" if parsed.status_code == 413 else "bad_request"
        request.scope.setdefault("state", {})["reason"] = parsed.reason.value
        return finish(
            outcome, _json(parsed.status_code, {"error": parsed.reason.value, "detail": parsed.detail})
        )

    _count_events(metrics, events, delivery.value)
    if letters:
        metrics.events.labels("invalid", "dead_lettered").inc(len(letters))
    metrics.request_events.observe(len(events) + len(letters))
    outcome = "published" if delivery is Delivery.PUBLISHED else "spooled"
    return finish(outcome, _json(200, {"accepted": len(events), "rejected": len(letters)}))


def _count_events(metrics: GatewayMetrics, events: list[dict[str, Any]], outcome: str) -> None:
    # One counter update per status, not per event.
    for status_name, count in Counter(STATUS_BY_CODE[event["status"]] for event in events).items():
        metrics.events.labels(status_name, outcome).inc(count)


class AccessLogMiddleware:
    """One JSON line per request: method, path without the query string (it carries the signature), status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

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
            level = logging.DEBUG if path in ("/healthz", "/readyz", "/metrics") else logging.INFO
            if access_log.isEnabledFor(level):
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


class _Server(uvicorn.Server):
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


def run(settings: GatewaySettings | None = None) -> None:
    """Serve the gateway until SIGTERM/SIGINT, then drain (``presence gateway``)."""
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)

    def on_exit() -> None:
        gateway: Gateway | None = getattr(app.state, "gateway", None)
        if gateway is not None:
            gateway.begin_shutdown()

    _Server(uvicorn_config(app, settings), on_exit).run()
