"""The webhook's HTTP glue: read the request, ask :mod:`gateway.intake`, publish, answer, count.

Everything the webhook decides is decided by :class:`gateway.intake.Intake`, and where its records go by
:class:`gateway.publisher.Publisher`; what stays here is what needs the request and the event loop: reading the
body and waiting for Kafka, both within the request's one deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from gateway.config import GatewaySettings
from gateway.intake import BODY_NOT_RECEIVED, INTERNAL_ERROR, Accepted, Answer, Intake
from gateway.metrics import GatewayMetrics
from gateway.publisher import Publication, Publisher, Unavailable

log = logging.getLogger("gateway")


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Gateway:
    """Everything a request needs, built once per app."""

    settings: GatewaySettings
    metrics: GatewayMetrics
    publisher: Publisher
    intake: Intake
    shutting_down: bool = False

    def begin_shutdown(self) -> None:
        """Stop calling ourselves ready; requests already in flight still complete."""
        self.shutting_down = True

    def ready(self) -> bool:
        return not self.shutting_down and self.publisher.ready()


async def _read_body(request: Request, limit: int) -> tuple[bytes, bool]:
    """The body, or its first ``limit`` bytes and True when it is longer (never reading much past the limit)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        # Read no more than the limit: the prefix is all the dead letter keeps anyway.
        prefix = bytearray()
        async for chunk in request.stream():
            prefix += chunk
            if len(prefix) > limit:
                break
        return bytes(prefix[:limit]), True
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return bytes(body[:limit]), True
    return bytes(body), False


async def webhook(request: Request) -> Response:
    """Verify a RongCloud callback and publish its events (G1-G8)."""
    # Taken from the app's state rather than through a FastAPI dependency: the webhook is the hot path, and
    # dependency solving is a measurable share of the framework's work per request.
    gateway: Gateway = request.app.state.gateway
    started = time.monotonic()
    try:
        return await _handle(request, gateway, started)
    except Exception:
        # A bug, never something a client sent (those have answers of their own): logged with its traceback,
        # answered without one, and counted where the 5xx alert looks.
        log.exception("unhandled error in the webhook")
        return _respond(request, gateway.metrics, INTERNAL_ERROR, started)


async def _handle(request: Request, gateway: Gateway, started: float) -> Response:
    deadline = started + gateway.settings.gateway_publish_budget_seconds
    received_at = wall_ms()

    admitted = gateway.intake.admit(
        peer=request.client.host if request.client else None,
        headers=request.headers,
        query=request.query_params,
        now_ms=received_at,
    )
    if isinstance(admitted, Answer):
        return _respond(request, gateway.metrics, admitted, started)

    pending: tuple[Accepted, Publication] | None = None
    # One deadline for the whole request: reading the body, then waiting for Kafka's acknowledgements. Past it
    # while waiting for Kafka, what is not acknowledged goes to the spool.
    with contextlib.suppress(TimeoutError, ClientDisconnect):
        async with asyncio.timeout(max(0.1, deadline - started)):
            body, truncated = await _read_body(request, gateway.settings.gateway_max_body_bytes)
            taken = gateway.intake.take(admitted, body, truncated=truncated, received_at=received_at)
            if isinstance(taken, Answer):
                return _respond(request, gateway.metrics, taken, started)
            pending = (taken, gateway.publisher.begin(taken.records, deadline=deadline))
            await pending[1].acknowledged()
    if pending is None:
        # The body did not arrive in time, or the client went away while sending it.
        return _respond(request, gateway.metrics, BODY_NOT_RECEIVED, started)

    accepted, publication = pending
    try:
        delivery = await gateway.publisher.finish(publication)
    except Unavailable as exc:
        log.error("cannot accept a callback: kafka unavailable and spool unusable", extra={"error": str(exc)})
        return _respond(request, gateway.metrics, accepted.unavailable(), started)
    return _respond(request, gateway.metrics, accepted.answer(delivery), started)


def _respond(request: Request, metrics: GatewayMetrics, answer: Answer, started: float) -> Response:
    if answer.auth_failure is not None:
        metrics.auth_failures_by_reason[answer.auth_failure].inc()
    for status_name, outcome, count in answer.events:
        metrics.events_by[status_name, outcome].inc(count)
    for reason, count in answer.dead_letters:
        metrics.dead_letters_by_reason[reason].inc(count)
    if answer.request_events is not None:
        metrics.request_events.observe(answer.request_events)
    requests, duration = metrics.by_outcome[answer.outcome]
    requests.inc()
    duration.observe(time.monotonic() - started)
    # For the access log line (gateway.server.AccessLogMiddleware).
    state = request.scope.setdefault("state", {})
    state["outcome"] = answer.outcome
    if answer.reason is not None:
        state["reason"] = answer.reason
    return Response(
        orjson.dumps(answer.content),
        status_code=answer.status,
        media_type="application/json",
        headers=dict(answer.headers) if answer.headers else None,
    )


WEBHOOK_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Every event is in Kafka or in the durable spool; rejected ones dead-lettered."},
    400: {"description": "The body is not a JSON array of events nor the wrapper object (dead-lettered)."},
    401: {"description": "Missing or invalid signature parameters, stale timestamp or replayed nonce."},
    403: {"description": "Source address not in the allow-list."},
    413: {"description": "Body or event count over the limit (dead-lettered)."},
    503: {"description": "Kafka is not acknowledging and the spool is full or disabled."},
}

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

WEBHOOK_OPENAPI: dict[str, Any] = {
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
