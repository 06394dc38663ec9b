"""The webhook's rules over plain values (G1-G5, G8): may this source call, is the call signed, fresh and not a
forged replay, what does its body hold, what is published, what is answered and what is counted.

No HTTP framework, no Kafka, no clock of its own. The HTTP glue (:mod:`gateway.webhook`) calls :meth:`Intake.admit`
with the request's head, reads the body only if that admitted it (G4: an unsigned body is never read), hands the
body to :meth:`Intake.take`, publishes the records of what it accepted, and answers what the :class:`Answer` says.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from core.contract import STATUS_BY_CODE
from gateway.config import GatewaySettings
from gateway.parsing import Batch, BodyError, DeadLetter, Receipt, body_too_large, parse_body
from gateway.publisher import Delivery
from gateway.signing import AuthFailure, ReplayGuard, SignedParams, body_digest, extract_params, verify
from gateway.sources import client_address, is_allowed
from gateway.spool import SpoolRecord


@dataclass(frozen=True, slots=True)
class Answer:
    """The response to one webhook request, and the facts the metrics and the access log record of it."""

    status: int
    content: Mapping[str, Any]
    # presence_gateway_requests_total{outcome}
    outcome: str
    # Why the request was refused (an auth failure or a dead-letter reason), for the access log.
    reason: str | None = None
    auth_failure: AuthFailure | None = None
    headers: Mapping[str, str] | None = None
    # presence_gateway_events_total: (status, outcome, count)
    events: tuple[tuple[str, str, int], ...] = ()
    # presence_gateway_dead_letters_total: (reason, count)
    dead_letters: tuple[tuple[str, int], ...] = ()
    # presence_gateway_request_events: events in an accepted request, None when none was accepted.
    request_events: int | None = None


FORBIDDEN = Answer(403, {"error": "forbidden"}, "forbidden")
BODY_NOT_RECEIVED = Answer(408, {"error": "request body not received in time"}, "bad_request")
INTERNAL_ERROR = Answer(500, {"error": "internal error"}, "error")


def unauthorized(reason: AuthFailure) -> Answer:
    # The reason goes to the metric and the access log, never into the answer.
    return Answer(401, {"error": "unauthorized"}, "unauthorized", reason=reason.value, auth_failure=reason)


@dataclass(frozen=True, slots=True)
class Accepted:
    """A signed, fresh body: its records for Kafka (RAW events first, then dead letters), and what to answer once
    they are published or spooled, or could be neither."""

    records: list[SpoolRecord]
    # Valid events per status name (online, offline, logout).
    statuses: tuple[tuple[str, int], ...]
    # Dead letters per reason.
    dead_letters: tuple[tuple[str, int], ...]
    # Set when the body as a whole is unusable: its one dead letter is the only record.
    body_error: BodyError | None = None

    def answer(self, delivery: Delivery) -> Answer:
        """200 with the counts once every record is in Kafka or in the spool; a 4xx for an unusable body."""
        error = self.body_error
        if error is not None:
            return Answer(
                error.status_code,
                {"error": error.reason.value, "detail": error.detail},
                "too_large" if error.status_code == 413 else "bad_request",
                reason=error.reason.value,
                dead_letters=self.dead_letters,
            )
        accepted = sum(count for _, count in self.statuses)
        rejected = sum(count for _, count in self.dead_letters)
        events = tuple((status, delivery.value, count) for status, count in self.statuses)
        if rejected:
            events += (("invalid", "dead_lettered", rejected),)
        return Answer(
            200,
            {"accepted": accepted, "rejected": rejected},
            delivery.value,
            events=events,
            dead_letters=self.dead_letters,
            request_events=accepted + rejected,
        )

    def unavailable(self) -> Answer:
        """503: Kafka did not acknowledge and the spool could not take the records; RongCloud retries (G7)."""
        return Answer(
            503,
            {"error": "unavailable"},
            "unavailable",
            headers={"Retry-After": "5"},
            events=tuple((status, "refused", count) for status, count in self.statuses),
        )


class Intake:
    """The webhook's checks and parsing, configured once from the settings."""

    def __init__(self, settings: GatewaySettings, replay_guard: ReplayGuard) -> None:
        self.replay_guard = replay_guard
        self._allow = settings.gateway_allow_cidrs
        self._trusted_proxies = settings.gateway_trusted_proxies
        self._app_key = settings.app_key
        self._secrets = settings.secrets()
        self._window_ms = int(settings.gateway_timestamp_window_seconds * 1000)
        self._max_body_bytes = settings.gateway_max_body_bytes
        self._max_events = settings.gateway_max_events
        self._max_future_ms = int(settings.gateway_max_future_skew_seconds * 1000)
        self._raw_limit = settings.gateway_dlq_raw_max_bytes
        self._topic_raw = settings.topic_raw
        self._topic_dlq = settings.topic_dlq

    def admit(
        self, *, peer: str | None, headers: Mapping[str, str], query: Mapping[str, str], now_ms: int
    ) -> SignedParams | Answer:
        """The allow-list (G8), then the signature and its timestamp (G1, G2), from the request's head alone.

        ``headers`` by lower-case name, as HTTP/1.1 servers hand them over.
        """
        # Without an allow-list every source is allowed: no need to work out which one this is.
        if self._allow:
            source = client_address(peer, headers.get("x-forwarded-for"), self._trusted_proxies)
            if not is_allowed(source, self._allow):
                return FORBIDDEN
        params = extract_params(query)
        if isinstance(params, AuthFailure):
            return unauthorized(params)
        failure = verify(
            params, app_key=self._app_key, secrets=self._secrets, now_ms=now_ms, window_ms=self._window_ms
        )
        if failure is not None:
            return unauthorized(failure)
        return params

    def take(
        self, params: SignedParams, body: bytes, *, truncated: bool, received_at: int
    ) -> Accepted | Answer:
        """The replay guard (G3), then the body (G4, G5): what to publish, or a refusal.

        ``truncated``: the body exceeded the size limit and ``body`` is its first ``limit`` bytes.
        """
        if not self.replay_guard.check(
            params.nonce, params.timestamp_ms, body_digest(body, truncated=truncated)
        ):
            return unauthorized(AuthFailure.REPLAYED_NONCE)
        receipt = Receipt(received_at=received_at, nonce=params.nonce, timestamp=params.timestamp)
        parsed: Batch | BodyError
        if truncated:
            parsed = body_too_large(
                body, limit=self._max_body_bytes, receipt=receipt, raw_limit=self._raw_limit
            )
        else:
            parsed = parse_body(
                body,
                receipt=receipt,
                max_events=self._max_events,
                max_future_ms=self._max_future_ms,
                raw_limit=self._raw_limit,
            )
        if isinstance(parsed, BodyError):
            return Accepted(
                records=self._dead_letter_records([parsed.dead_letter]),
                statuses=(),
                dead_letters=((parsed.dead_letter.reason, 1),),
                body_error=parsed,
            )
        topic = self._topic_raw
        records = [
            SpoolRecord(topic, event["userid"].encode("utf-8"), orjson.dumps(event))
            for event in parsed.events
        ]
        records += self._dead_letter_records(parsed.rejects)
        return Accepted(
            records=records,
            statuses=tuple(Counter(STATUS_BY_CODE[event["status"]] for event in parsed.events).items()),
            dead_letters=tuple(Counter(letter.reason for letter in parsed.rejects).items()),
        )

    def _dead_letter_records(self, letters: list[DeadLetter]) -> list[SpoolRecord]:
        return [
            SpoolRecord(
                self._topic_dlq,
                letter.key.encode("utf-8") if letter.key is not None else None,
                orjson.dumps(letter.value),
            )
            for letter in letters
        ]
