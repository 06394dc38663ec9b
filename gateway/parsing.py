"""Body and element validation (G4, G5): bytes in, RAW events and dead letters out. Pure: no I/O, no clock."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from core import contract
from core.contract import (
    MAX_DELIVERY_ID_LENGTH,
    MAX_OPTIONAL_LENGTH,
    MAX_SESSION_ID_LENGTH,
    MAX_USERID_LENGTH,
    MIN_EVENT_TIME_MS,
    SCHEMA_VERSION,
    STATUS_BY_CODE,
)

WRAPPER_TYPE = "user:connection_status"
# Upstream sends the code as a string ("0"); integers are accepted too.
_STATUS_CODES = {str(code): code for code in STATUS_BY_CODE}


class DeadLetterReason(StrEnum):
    """Why something upstream sent went to the dead-letter topic; a closed label set."""

    INVALID_JSON = "invalid_json"
    INVALID_BODY = "invalid_body"
    INVALID_ELEMENT = "invalid_element"
    BODY_TOO_LARGE = "body_too_large"
    TOO_MANY_EVENTS = "too_many_events"


@dataclass(frozen=True, slots=True)
class Receipt:
    """What the gateway knows about the request an element arrived in."""

    received_at: int
    nonce: str
    timestamp: str

    def delivery_id(self, wrapper_id: str | None, index: int) -> str:
        if wrapper_id is not None:
            return wrapper_id
        return f"{self.nonce}:{self.timestamp}:{index}"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One DLQ record (schemas/dlq.v1.schema.json) and its key."""

    key: str | None
    value: dict[str, Any]

    @property
    def reason(self) -> str:
        return str(self.value["reason"])


@dataclass(frozen=True, slots=True)
class BodyError:
    """The body as a whole is unusable: the HTTP status to answer and its dead letter."""

    status_code: int
    reason: DeadLetterReason
    detail: str
    dead_letter: DeadLetter


@dataclass(slots=True)
class Batch:
    """A usable body: its valid events (RAW records, schemas/raw.v1.schema.json) and its rejected elements."""

    events: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[DeadLetter] = field(default_factory=list)


def dead_letter(
    *,
    reason: DeadLetterReason,
    detail: str,
    raw: bytes,
    receipt: Receipt,
    raw_limit: int,
    delivery_id: str | None = None,
    index: int | None = None,
    key: str | None = None,
) -> DeadLetter:
    return DeadLetter(
        key=key,
        value=contract.dead_letter(
            source="gateway",
            reason=str(reason),
            detail=detail,
            raw=raw,
            raw_limit=raw_limit,
            received_at=receipt.received_at,
            delivery_id=delivery_id,
            index=index,
        ),
    )


def body_too_large(prefix: bytes, *, limit: int, receipt: Receipt, raw_limit: int) -> BodyError:
    detail = f"body exceeds {limit} bytes"
    return BodyError(
        413,
        DeadLetterReason.BODY_TOO_LARGE,
        detail,
        dead_letter(
            reason=DeadLetterReason.BODY_TOO_LARGE,
            detail=detail,
            raw=prefix,
            receipt=receipt,
            raw_limit=raw_limit,
        ),
    )


def parse_body(
    body: bytes,
    *,
    receipt: Receipt,
    max_events: int,
    max_future_ms: int,
    raw_limit: int,
) -> Batch | BodyError:
    """Split a webhook body into valid RAW events and dead letters, or refuse it as a whole.

    Accepts a JSON array of events or the wrapper object ``{"type", "id", "time", "data": [events]}``.
    Never raises for any input.
    """

    def refuse(
        status: int, reason: DeadLetterReason, detail: str, wrapper_id: str | None = None
    ) -> BodyError:
        letter = dead_letter(
            reason=reason,
            detail=detail,
            raw=body,
            receipt=receipt,
            raw_limit=raw_limit,
            delivery_id=wrapper_id,
        )
        return BodyError(status, reason, detail, letter)

    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return refuse(400, DeadLetterReason.INVALID_JSON, f"not JSON: {exc}"[:300])

    wrapper_id: str | None = None
    if isinstance(document, list):
        elements: list[Any] = document
    elif isinstance(document, dict):
        data = document.get("data")
        if not isinstance(data, list):
            return refuse(400, DeadLetterReason.INVALID_BODY, "object body without a 'data' array")
        kind = document.get("type", WRAPPER_TYPE)
        if kind != WRAPPER_TYPE:
            return refuse(400, DeadLetterReason.INVALID_BODY, f"wrapper type is not {WRAPPER_TYPE!r}")
        raw_id = document.get("id")
        if raw_id is not None:
            if isinstance(raw_id, bool) or not isinstance(raw_id, str | int) or str(raw_id) == "":
                return refuse(400, DeadLetterReason.INVALID_BODY, "wrapper 'id' must be a non-empty string")
            wrapper_id = str(raw_id)
            if len(wrapper_id) > MAX_DELIVERY_ID_LENGTH:
                return refuse(400, DeadLetterReason.INVALID_BODY, "wrapper 'id' is too long")
        elements = data
    else:
        return refuse(400, DeadLetterReason.INVALID_BODY, "body must be a JSON array or a wrapper object")

    if len(elements) > max_events:
        return refuse(
            413,
            DeadLetterReason.TOO_MANY_EVENTS,
            f"{len(elements)} events exceed the limit of {max_events}",
            wrapper_id,
        )

    batch = Batch()
    max_time = receipt.received_at + max_future_ms
    for index, element in enumerate(elements):
        delivery_id = receipt.delivery_id(wrapper_id, index)
        checked = validate_element(element, max_time_ms=max_time)
        if isinstance(checked, str):
            problem = checked
            userid = element.get("userid") if isinstance(element, dict) else None
            key = userid if isinstance(userid, str) and 0 < len(userid) <= MAX_USERID_LENGTH else None
            raw = _element_bytes(element)
            if raw is None:
                raw = body
                problem += "; the element is nested too deeply to write out alone, so raw is the whole body"
            batch.rejects.append(
                dead_letter(
                    reason=DeadLetterReason.INVALID_ELEMENT,
                    detail=problem,
                    raw=raw,
                    receipt=receipt,
                    raw_limit=raw_limit,
                    delivery_id=delivery_id,
                    index=index,
                    key=key,
                )
            )
            continue
        checked["received_at"] = receipt.received_at
        checked["delivery_id"] = delivery_id
        batch.events.append(checked)
    return batch


def _element_bytes(element: Any) -> bytes | None:
    """The element as JSON again, or None when it cannot be written out.

    orjson reads up to 1,024 levels of nesting but writes only 255, and ``repr`` of the deepest ones exceeds
    Python's recursion limit.
    """
    try:
        return orjson.dumps(element)
    except TypeError:
        return None


def _optional_text(element: dict[str, Any], name: str) -> str | None:
    value = element.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name}: must be a string when present")
    if len(value) > MAX_OPTIONAL_LENGTH:
        raise ValueError(f"{name}: longer than {MAX_OPTIONAL_LENGTH} characters")
    return value


def validate_element(element: Any, *, max_time_ms: int) -> dict[str, Any] | str:
    """The RAW event (without receipt metadata) for one upstream element, or what is wrong with it."""
    if not isinstance(element, dict):
        return f"element must be an object, not {type(element).__name__}"

    userid = element.get("userid")
    if not isinstance(userid, str) or not userid:
        return "userid: required non-empty string"
    if len(userid) > MAX_USERID_LENGTH:
        return f"userid: longer than {MAX_USERID_LENGTH} characters"

    raw_status = element.get("status")
    status: int | None
    if isinstance(raw_status, str):
        status = _STATUS_CODES.get(raw_status)
    elif isinstance(raw_status, int) and not isinstance(raw_status, bool) and raw_status in STATUS_BY_CODE:
        status = raw_status
    else:
        status = None
    if status is None:
        return 'status: must be "0" (online), "1" (offline) or "2" (logout)'

    time = element.get("time")
    if not isinstance(time, int) or isinstance(time, bool):
        return "time: required integer (epoch milliseconds)"
    if time < MIN_EVENT_TIME_MS:
        return "time: before 2010 (seconds instead of milliseconds?)"
    if time > max_time_ms:
        return "time: later than the receipt time plus the allowed skew"

    session_id = element.get("sessionId")
    if not isinstance(session_id, str) or not session_id:
        return "sessionId: required non-empty string"
    if len(session_id) > MAX_SESSION_ID_LENGTH:
        return f"sessionId: longer than {MAX_SESSION_ID_LENGTH} characters"

    try:
        os_name = _optional_text(element, "os")
        client_ip = _optional_text(element, "clientIp")
    except ValueError as exc:
        return str(exc)

    return {
        "schema": SCHEMA_VERSION,
        "userid": userid,
        "status": status,
        "time": time,
        "sessionId": session_id,
        "os": os_name,
        "clientIp": client_ip,
    }
