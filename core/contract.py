"""Each fact of the upstream contract and of the product's Kafka layout, written once.

RongCloud's webhook (the seed document): the status codes, the limits an element must keep, how a call is
signed. The product's topics: how records are partitioned, what the table's changelog is called, what a RAW
record and a dead letter look like (``schemas/``). The gateway, the worker and the tools all take these from
here. Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, Final, Literal, NamedTuple

import orjson
from aiokafka.partitioner import murmur2

SCHEMA_VERSION: Final = 1
WEBHOOK_PATH: Final = "/rongcloud/online-status"

# Event codes of the webhook (its ``status`` field); the query API's *state* codes differ (1 online, 0 offline).
EventStatus = Literal["online", "offline", "logout"]
STATUS_BY_CODE: Final[Mapping[int, EventStatus]] = {0: "online", 1: "offline", 2: "logout"}
CODE_BY_STATUS: Final[Mapping[EventStatus, int]] = {"online": 0, "offline": 1, "logout": 2}

MIN_EVENT_TIME_MS: Final = 1_262_304_000_000  # 2010-01-01T00:00:00Z: anything earlier is seconds, not ms
MAX_USERID_LENGTH: Final = 64
MAX_SESSION_ID_LENGTH: Final = 256
MAX_OPTIONAL_LENGTH: Final = 256
MAX_DELIVERY_ID_LENGTH: Final = 256
# Users per batch query (Q2), also the page size of the tools that ask for many users.
MAX_QUERY_BATCH: Final = 1000

DEFAULT_WORKER_APP_ID: Final = "presence-worker"
USERS_TABLE: Final = "users"

# Epoch values below this are seconds (10 digits until the year 5138), above it milliseconds.
_SECONDS_LIMIT = 100_000_000_000


def changelog_topic(app_id: str) -> str:
    """The users table's changelog topic of the worker group ``app_id`` (Faust's naming)."""
    return f"{app_id}-{USERS_TABLE}-changelog"


def partition_of(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner (murmur2, as the Java clients and aiokafka use): where ``key`` lives on every
    product topic, since all of them have the same partition count and are keyed by userid."""
    return int(murmur2(key) & 0x7FFFFFFF) % partitions


def compute_signature(secret: str, nonce: str, timestamp: str) -> str:
    """Lower-case hex SHA1 of secret + nonce + timestamp, the three joined exactly as sent.

    RongCloud signs its callbacks (query parameters) and its server API requests (headers) the same way.
    """
    return hashlib.sha1((secret + nonce + timestamp).encode("utf-8"), usedforsecurity=False).hexdigest()


def parse_timestamp_ms(value: str) -> int:
    """Epoch milliseconds from a timestamp parameter; 10-digit (seconds) values are scaled."""
    if not value.isascii() or not value.isdigit() or len(value) > 16:
        raise ValueError("timestamp must be 1-16 decimal digits")
    number = int(value)
    return number * 1000 if number < _SECONDS_LIMIT else number


class Event(NamedTuple):
    """One upstream connection event for one session, as published on RAW (``schemas/raw.v1.schema.json``)."""

    userid: str
    session_id: str
    status: EventStatus
    time: int
    os: str | None = None
    client_ip: str | None = None
    received_at: int = 0
    delivery_id: str = ""

    @property
    def trigger(self) -> tuple[str, str, int, str]:
        """What identifies this event as the cause of a transition."""
        return (self.session_id, self.status, self.time, self.delivery_id)


class InvalidRaw(ValueError):
    """A RAW message a consumer cannot use; ``reason`` is a closed-set code for the DLQ and metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def decode_raw(key: bytes | None, value: bytes | None, delivery_id: str) -> Event:
    """Decode and check a RAW message; raise :class:`InvalidRaw` if it is unusable.

    RAW is written by the gateway after validation, so this only fails for records someone else produced.
    """
    if value is None:
        raise InvalidRaw("undecodable_raw", "empty value")
    try:
        raw = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InvalidRaw("undecodable_raw", f"not JSON: {exc}") from None
    return _event_from_dict(raw, key, delivery_id)


def _event_from_dict(raw: Any, key: bytes | None, delivery_id: str) -> Event:
    if not isinstance(raw, dict):
        raise InvalidRaw("invalid_raw", "not a JSON object")
    userid = raw.get("userid")
    session_id = raw.get("sessionId")
    status = raw.get("status")
    time = raw.get("time")
    if not isinstance(userid, str) or not userid or len(userid) > MAX_USERID_LENGTH:
        raise InvalidRaw(
            "invalid_raw", f"userid missing, not a string or over {MAX_USERID_LENGTH} characters"
        )
    if not isinstance(session_id, str) or not session_id:
        raise InvalidRaw("invalid_raw", "sessionId missing or not a string")
    if not isinstance(status, int) or isinstance(status, bool) or status not in STATUS_BY_CODE:
        raise InvalidRaw("invalid_raw", f"status {status!r} is not 0, 1 or 2")
    if not isinstance(time, int) or isinstance(time, bool):
        raise InvalidRaw("invalid_raw", "time missing or not an integer")
    for optional in ("os", "clientIp"):
        if raw.get(optional) is not None and not isinstance(raw[optional], str):
            raise InvalidRaw("invalid_raw", f"{optional} is not a string")
    if key is not None and key != userid.encode():
        # The table lives in the partition of the key; a record filed under another user's partition would
        # break per-user ordering and query routing.
        raise InvalidRaw("key_mismatch", "message key differs from userid")
    received_at = raw.get("received_at")
    return Event(
        userid=userid,
        session_id=session_id,
        status=STATUS_BY_CODE[status],
        time=time,
        os=raw.get("os"),
        client_ip=raw.get("clientIp"),
        received_at=received_at if isinstance(received_at, int) else 0,
        delivery_id=delivery_id,
    )


def cap_text(data: bytes, limit: int) -> tuple[str, bool]:
    """At most ``limit`` bytes of data as text (invalid UTF-8 replaced), and whether anything was cut."""
    truncated = len(data) > limit
    if truncated:
        # "ignore" drops a multi-byte character the cut split in two; "replace" would invent one.
        return data[:limit].decode("utf-8", errors="ignore"), True
    return data.decode("utf-8", errors="replace"), False


def dead_letter(
    *,
    source: Literal["gateway", "worker"],
    reason: str,
    detail: str,
    raw: bytes,
    raw_limit: int,
    received_at: int,
    delivery_id: str | None = None,
    index: int | None = None,
) -> dict[str, Any]:
    """A dead-letter record (``schemas/dlq.v1.schema.json``): what could not be used, why, and its bytes."""
    text, truncated = cap_text(raw, raw_limit)
    return {
        "schema": SCHEMA_VERSION,
        "source": source,
        "reason": reason,
        "detail": detail,
        "raw": text,
        "raw_truncated": truncated,
        "received_at": received_at,
        "delivery_id": delivery_id,
        "index": index,
    }


# --- observations (R1) --------------------------------------------------------------------------------------
# What RongCloud's server API (``/user/checkOnline.json``) answered about one user, published on RAW keyed by the
# userid so the worker applies it in order with the user's events. A RAW record is an observation when its
# ``kind`` is "observation"; upstream events carry no ``kind`` (``schemas/raw.v1.schema.json``).

OBSERVATION_KIND: Final = "observation"
# Why the user was checked, most urgent first (the checker's queue serves them in this order).
ObservationSource = Literal["on_demand", "suspect", "intake_gap", "age"]
OBSERVATION_SOURCES: Final[tuple[ObservationSource, ...]] = ("on_demand", "suspect", "intake_gap", "age")
# The server API's *state* codes (its ``status`` field): not the webhook's event codes.
ONLINE_BY_STATE_CODE: Final[Mapping[str, bool]] = {"1": True, "0": False}


class Observation(NamedTuple):
    """R1: the user was ``online`` (or not) when RongCloud answered a request sent at ``at`` (epoch ms).

    ``at`` is the wall clock when the answered request was sent (the attempt that got the answer, not the first
    of its retries): the state it reports held at some instant at or after ``at``, so an event older than
    ``at`` can never be newer than what the observation saw. ``answered_at`` is when the answer arrived.
    ``delivery_id`` is the RAW record's Kafka position, set by the decoder (as for events, S10).
    """

    userid: str
    online: bool
    at: int
    source: ObservationSource
    answered_at: int = 0
    delivery_id: str = ""


def encode_observation(observation: Observation) -> bytes:
    """The RAW record of an observation (its key is the userid, UTF-8)."""
    return orjson.dumps(
        {
            "schema": SCHEMA_VERSION,
            "kind": OBSERVATION_KIND,
            "userid": observation.userid,
            "online": observation.online,
            "at": observation.at,
            "source": observation.source,
            "answered_at": observation.answered_at,
        }
    )


def is_observation(raw: Mapping[str, Any]) -> bool:
    """Whether a decoded RAW value is an observation rather than an upstream event."""
    return raw.get("kind") == OBSERVATION_KIND


def observation_from_dict(raw: Mapping[str, Any], key: bytes | None, delivery_id: str) -> Observation:
    """Check a decoded RAW value that :func:`is_observation`; raise :class:`InvalidRaw` if it is unusable."""
    userid = raw.get("userid")
    online = raw.get("online")
    at = raw.get("at")
    source = raw.get("source")
    answered_at = raw.get("answered_at", 0)
    if not isinstance(userid, str) or not userid or len(userid) > MAX_USERID_LENGTH:
        raise InvalidRaw(
            "invalid_raw", f"userid missing, not a string or over {MAX_USERID_LENGTH} characters"
        )
    if not isinstance(online, bool):
        raise InvalidRaw("invalid_raw", "online missing or not a boolean")
    if not isinstance(at, int) or isinstance(at, bool) or at < MIN_EVENT_TIME_MS:
        raise InvalidRaw("invalid_raw", "at missing or not epoch milliseconds")
    if source not in OBSERVATION_SOURCES:
        raise InvalidRaw("invalid_raw", f"source {source!r} is not one of {', '.join(OBSERVATION_SOURCES)}")
    if not isinstance(answered_at, int) or isinstance(answered_at, bool):
        raise InvalidRaw("invalid_raw", "answered_at is not an integer")
    if key is not None and key != userid.encode():
        raise InvalidRaw("key_mismatch", "message key differs from userid")
    return Observation(userid, online, at, source, answered_at, delivery_id)


def decode_observation(key: bytes | None, value: bytes | None, delivery_id: str) -> Observation:
    """Decode and check an observation record; raise :class:`InvalidRaw` if it is not a usable one."""
    if value is None:
        raise InvalidRaw("undecodable_raw", "empty value")
    try:
        raw = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InvalidRaw("undecodable_raw", f"not JSON: {exc}") from None
    if not isinstance(raw, dict) or not is_observation(raw):
        raise InvalidRaw("invalid_raw", f'not an observation (its "kind" must be "{OBSERVATION_KIND}")')
    return observation_from_dict(raw, key, delivery_id)


# --- intake gaps ---------------------------------------------------------------------------------------------
# The gateway marks a window in which it may have lost callbacks: it started after an unclean stop (the window
# runs from its last persisted heartbeat to its start), or it answered a callback with something other than 200,
# or later than upstream's 5 s timeout (upstream then retries, and after three failures drops the callback). The
# marker goes to every RAW partition, so each worker learns of it in order with its users' events and can check
# the users a lost callback may have left wrong. A RAW record is a marker when its ``kind`` is "intake_gap".

GAP_KIND: Final = "intake_gap"
UPSTREAM_TIMEOUT_MS: Final = 5_000  # upstream gives up on a callback attempt after 5 s (the seed document)
GapReason = Literal["unclean_stop", "error_answer", "slow_answer"]
GAP_REASONS: Final[tuple[GapReason, ...]] = ("unclean_stop", "error_answer", "slow_answer")


class GapMarker(NamedTuple):
    """A window ``[start, end]`` (epoch ms, the gateway's wall clock) in which callbacks may have been lost.

    ``id`` names the gap (the same on every partition: a worker owning several partitions caps its checks per
    gap, not per partition); ``gateway`` the instance that saw it; ``reason`` why (:data:`GAP_REASONS`, an open
    set). ``delivery_id`` is the RAW record's Kafka position, set by the decoder.
    """

    id: str
    gateway: str
    reason: str
    start: int
    end: int
    delivery_id: str = ""


def encode_gap_marker(marker: GapMarker) -> bytes:
    """The RAW record of an intake-gap marker (no key: it is sent to each partition explicitly)."""
    return orjson.dumps(
        {
            "schema": SCHEMA_VERSION,
            "kind": GAP_KIND,
            "id": marker.id,
            "gateway": marker.gateway,
            "reason": marker.reason,
            "start": marker.start,
            "end": marker.end,
        }
    )


def gap_marker_from_dict(raw: Mapping[str, Any], delivery_id: str) -> GapMarker:
    """Check a decoded RAW value whose ``kind`` is "intake_gap"; raise :class:`InvalidRaw` if it is unusable."""
    gap_id, gateway, reason = raw.get("id"), raw.get("gateway"), raw.get("reason")
    start, end = raw.get("start"), raw.get("end")
    for name, text in (("id", gap_id), ("gateway", gateway), ("reason", reason)):
        if not isinstance(text, str) or not text or len(text) > MAX_OPTIONAL_LENGTH:
            raise InvalidRaw(
                "invalid_raw", f"{name} missing, not a string or over {MAX_OPTIONAL_LENGTH} characters"
            )
    for name, moment in (("start", start), ("end", end)):
        if not isinstance(moment, int) or isinstance(moment, bool) or moment < MIN_EVENT_TIME_MS:
            raise InvalidRaw("invalid_raw", f"{name} missing or not epoch milliseconds")
    assert isinstance(start, int) and isinstance(end, int)  # noqa: S101 - narrowed above
    if end < start:
        raise InvalidRaw("invalid_raw", "end is before start")
    return GapMarker(str(gap_id), str(gateway), str(reason), start, end, delivery_id)


# --- one RAW record, whatever its kind ------------------------------------------------------------------------

RawRecord = Event | Observation | GapMarker


def decode_raw_record(key: bytes | None, value: bytes | None, delivery_id: str) -> RawRecord:
    """Decode any RAW record, dispatching on ``kind`` before the event checks: an upstream event (no ``kind``),
    an observation (R1) or an intake-gap marker. Raises :class:`InvalidRaw` like :func:`decode_raw`."""
    if value is None:
        raise InvalidRaw("undecodable_raw", "empty value")
    try:
        raw = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InvalidRaw("undecodable_raw", f"not JSON: {exc}") from None
    if isinstance(raw, dict):
        kind = raw.get("kind")
        if kind == OBSERVATION_KIND:
            return observation_from_dict(raw, key, delivery_id)
        if kind == GAP_KIND:
            return gap_marker_from_dict(raw, delivery_id)
        if kind is not None:
            raise InvalidRaw("invalid_raw", f"unknown kind {kind!r}")
    return _event_from_dict(raw, key, delivery_id)
