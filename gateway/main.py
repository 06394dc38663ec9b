"""The gateway's HTTP application: ``create_app(settings)`` builds it, ``run(settings)`` serves it with uvicorn."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import orjson
from aiokafka.errors import KafkaError
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from core.logs import configure_logging
from core.topics import KafkaUnreachable, ensure_topics
from gateway.config import GatewaySettings, get_settings
from gateway.intake import Intake
from gateway.metrics import GatewayMetrics
from gateway.producer import ProducerFactory, kafka_producer_factory
from gateway.publisher import Publisher
from gateway.server import AccessLogMiddleware, Server, uvicorn_config
from gateway.signing import ReplayGuard
from gateway.spool import Spool
from gateway.webhook import WEBHOOK_OPENAPI, WEBHOOK_RESPONSES, Gateway, wall_ms, webhook

log = logging.getLogger("gateway")

# How long one attempt to ensure the topics may take (reaching Kafka, creating, waiting for leaders).
ENSURE_TOPICS_TIMEOUT_SECONDS = 10.0


async def get_gateway(request: Request) -> Gateway:
    # async: FastAPI runs a plain-def dependency in its thread pool, a thread hop per request.
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


def _json(status: int, content: dict[str, Any]) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


async def _ensure_topics(settings: GatewaySettings) -> bool:
    """Create the product's topics (D2); False while Kafka cannot be reached, stops answering midway or leaves
    partitions without a leader (retried before the producer connects).

    Any other :class:`core.topics.TopicError` (topics that exist with a layout the product cannot use) is raised
    on: the gateway refuses to start rather than misroute users.
    """
    try:
        created = await ensure_topics(settings, timeout=ENSURE_TOPICS_TIMEOUT_SECONDS)
    except (KafkaUnreachable, KafkaError, OSError, TimeoutError) as exc:
        log.warning(
            "could not ensure topics; Kafka not ready, spooling meanwhile", extra={"error": repr(exc)}
        )
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
                clock_ms=wall_ms,
            )
        prepare = None
        if settings.gateway_ensure_topics and not await _ensure_topics(settings):

            async def prepare() -> None:
                if not await _ensure_topics(settings):
                    raise OSError("topics not ensured yet")

        publisher = Publisher(settings, metrics, producer_factory=factory, spool=spool, prepare=prepare)
        window_ms = int(settings.gateway_timestamp_window_seconds * 1000)
        guard = ReplayGuard(
            window_ms=window_ms, max_entries=settings.gateway_replay_cache_max_entries, clock_ms=wall_ms
        )
        metrics.replay_cache_entries.set_function(lambda: len(guard))
        gateway = Gateway(settings, metrics, publisher, Intake(settings, guard))
        app.state.gateway = gateway
        if not settings.secrets():
            log.warning("PRESENCE_APP_SECRET is empty: every callback will be refused")
        await publisher.start()
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
    app.add_middleware(AccessLogMiddleware, success_sample=settings.gateway_access_log_success_sample)

    app.add_api_route(
        settings.gateway_path,
        webhook,
        methods=["POST"],
        summary="RongCloud online-status callback",
        response_class=JSONResponse,
        responses=WEBHOOK_RESPONSES,
        openapi_extra=WEBHOOK_OPENAPI,
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


def run(settings: GatewaySettings | None = None) -> None:
    """Serve the gateway until SIGTERM/SIGINT, then drain (``presence gateway``)."""
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)

    def on_exit() -> None:
        gateway: Gateway | None = getattr(app.state, "gateway", None)
        if gateway is not None:
            gateway.begin_shutdown()

    Server(uvicorn_config(app, settings), on_exit).run()
