"""Body and element validation (G4, G5) and the RAW/DLQ payload contracts (D4)."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.contract import cap_text
from gateway.parsing import (
    MIN_EVENT_TIME_MS,
    Batch,
    BodyError,
    DeadLetterReason,
    Receipt,
    body_too_large,
    parse_body,
)
from tests.schemas import writer_validator

# The closed (writer) form: the gateway publishes nothing the schemas do not declare.
RAW = writer_validator("raw.v1.schema.json")
DLQ = writer_validator("dlq.v1.schema.json")

NOW = 1_700_000_000_000
RECEIPT = Receipt(received_at=NOW, nonce="14314", timestamp="1700000000000")
EXAMPLE = [
    {"userid": "apert60541", "status": "1", "os": "iOS", "time": 1437982625625, "clientIp": "172.20.10.94:41748", "sessionId": "0O6Bvfvik_L9R_NxR6GqQb"},
    {"userid": "apert60592", "status": "1", "os": "Android", "time": 1437982625625, "clientIp": "172.20.10.94:41748", "sessionId": "0O9Fvfvik_L9R_NaR3GqYz"},
    {"userid": "apert60533", "status": "2", "os": "Android", "time": 1437982625625, "clientIp": "172.20.10.94:41748", "sessionId": "0O4Hvfvik_L3B_XaR7GxAf"},
]  # fmt: skip


def parse(body: Any, *, max_events: int = 5000, raw_limit: int = 65536) -> Batch | BodyError:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_body(
        data, receipt=RECEIPT, max_events=max_events, max_future_ms=300_000, raw_limit=raw_limit
    )


def event(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "userid": "u1",
        "status": "0",
        "os": "iOS",
        "time": NOW - 1000,
        "clientIp": "1.2.3.4:5",
        "sessionId": "s1",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not ...}


def test_g4_upstream_example_array() -> None:
    batch = parse(EXAMPLE)
    assert isinstance(batch, Batch)
    assert batch.rejects == []
    assert [e["userid"] for e in batch.events] == ["apert60541", "apert60592", "apert60533"]
    assert [e["status"] for e in batch.events] == [1, 1, 2]
    assert batch.events[0] == {
        "schema": 1,
        "userid": "apert60541",
        "status": 1,
        "time": 1437982625625,
        "sessionId": "0O6Bvfvik_L9R_NxR6GqQb",
        "os": "iOS",
        "clientIp": "172.20.10.94:41748",
        "received_at": NOW,
        "delivery_id": "14314:1700000000000:0",
    }
    for e in batch.events:
        RAW.validate(e)


def test_g4_wrapper_object_uses_its_id_as_delivery_id() -> None:
    batch = parse({"type": "user:connection_status", "id": "evt-9", "time": NOW, "data": EXAMPLE})
    assert isinstance(batch, Batch)
    assert len(batch.events) == 3
    assert {e["delivery_id"] for e in batch.events} == {"evt-9"}


def test_g4_wrapper_without_id_or_type() -> None:
    batch = parse({"data": [event()]})
    assert isinstance(batch, Batch)
    assert batch.events[0]["delivery_id"] == "14314:1700000000000:0"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", DeadLetterReason.INVALID_JSON),
        (b"[{", DeadLetterReason.INVALID_JSON),
        (b"\xff\xfe", DeadLetterReason.INVALID_JSON),
        (b"NaN", DeadLetterReason.INVALID_JSON),
        (b"{}", DeadLetterReason.INVALID_BODY),
        (b'{"data": {}}', DeadLetterReason.INVALID_BODY),
        (b'{"type": "user:other", "data": []}', DeadLetterReason.INVALID_BODY),
        (b'{"id": true, "data": []}', DeadLetterReason.INVALID_BODY),
        (b'"text"', DeadLetterReason.INVALID_BODY),
        (b"42", DeadLetterReason.INVALID_BODY),
        (b"null", DeadLetterReason.INVALID_BODY),
    ],
)
def test_g4_unusable_body_is_400_and_dead_lettered(body: bytes, reason: DeadLetterReason) -> None:
    result = parse(body)
    assert isinstance(result, BodyError)
    assert result.status_code == 400
    assert result.reason is reason
    DLQ.validate(result.dead_letter.value)
    assert result.dead_letter.value["raw"] == body.decode("utf-8", errors="replace")


def test_g4_too_many_events_is_413() -> None:
    result = parse([event()] * 11, max_events=10)
    assert isinstance(result, BodyError)
    assert (result.status_code, result.reason) == (413, DeadLetterReason.TOO_MANY_EVENTS)
    assert isinstance(parse([event()] * 10, max_events=10), Batch)


def test_g4_body_too_large_dead_letter_is_capped() -> None:
    result = body_too_large(b"x" * 5000, limit=4096, receipt=RECEIPT, raw_limit=1000)
    assert (result.status_code, result.reason) == (413, DeadLetterReason.BODY_TOO_LARGE)
    assert result.dead_letter.value["raw"] == "x" * 1000
    assert result.dead_letter.value["raw_truncated"] is True
    DLQ.validate(result.dead_letter.value)


def test_g4_cap_never_splits_a_character() -> None:
    text, truncated = cap_text("é".encode() * 10, 5)
    assert (text, truncated) == ("éé", True)


def test_g4_empty_array_is_fine() -> None:
    assert parse([]) == Batch()


@pytest.mark.parametrize(
    ("element", "problem"),
    [
        ("not an object", "element must be an object"),
        (event(userid=...), "userid"),
        (event(userid=""), "userid"),
        (event(userid="x" * 65), "userid"),
        (event(userid=7), "userid"),
        (event(status="3"), "status"),
        (event(status=3), "status"),
        (event(status=True), "status"),
        (event(status=None), "status"),
        (event(status="online"), "status"),
        (event(time=...), "time"),
        (event(time="1437982625625"), "time"),
        (event(time=1437982625625.0), "time"),
        (event(time=True), "time"),
        (event(time=MIN_EVENT_TIME_MS - 1), "time"),
        (event(time=1437982625), "time"),
        (event(time=NOW + 300_001), "time"),
        (event(sessionId=...), "sessionId"),
        (event(sessionId=""), "sessionId"),
        (event(sessionId=["s"]), "sessionId"),
        (event(os=5), "os"),
        (event(clientIp={"ip": 1}), "clientIp"),
    ],
)
def test_g5_invalid_element_is_dead_lettered_with_reason(element: Any, problem: str) -> None:
    batch = parse([event(userid="good"), element])
    assert isinstance(batch, Batch)
    assert [e["userid"] for e in batch.events] == ["good"]
    assert len(batch.rejects) == 1
    letter = batch.rejects[0].value
    DLQ.validate(letter)
    assert letter["reason"] == "invalid_element"
    assert problem in letter["detail"]
    assert letter["index"] == 1
    assert letter["delivery_id"] == "14314:1700000000000:1"
    assert orjson.loads(letter["raw"]) == element


@pytest.mark.parametrize(
    ("element", "status"),
    [(event(status="0"), 0), (event(status=1), 1), (event(status="2"), 2)],
)
def test_g5_status_as_string_or_int(element: dict[str, Any], status: int) -> None:
    batch = parse([element])
    assert isinstance(batch, Batch)
    assert batch.events[0]["status"] == status


def test_g5_optional_fields_may_be_absent_or_null() -> None:
    batch = parse([event(os=..., clientIp=None)])
    assert isinstance(batch, Batch)
    assert (batch.events[0]["os"], batch.events[0]["clientIp"]) == (None, None)
    RAW.validate(batch.events[0])


def test_g5_extra_fields_are_dropped() -> None:
    batch = parse([event(extra="x")])
    assert isinstance(batch, Batch)
    assert "extra" not in batch.events[0]
    RAW.validate(batch.events[0])


def test_g5_time_at_the_future_limit_is_accepted() -> None:
    batch = parse([event(time=NOW + 300_000), event(time=MIN_EVENT_TIME_MS)])
    assert isinstance(batch, Batch)
    assert len(batch.events) == 2


def test_g5_dead_letter_key_is_the_userid_when_readable() -> None:
    batch = parse([event(status="9"), event(userid="x" * 100, status="9"), {"userid": 5}])
    assert isinstance(batch, Batch)
    assert [r.key for r in batch.rejects] == ["u1", None, None]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)
field_values = st.one_of(
    json_values,
    st.sampled_from(["0", "1", "2", 0, 1, 2, "", "u", NOW, NOW - 5, MIN_EVENT_TIME_MS, 10**20]),
)
elements = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional=dict.fromkeys(("userid", "status", "time", "sessionId", "os", "clientIp"), field_values),
    ),
)


@settings(max_examples=400)
@given(st.lists(elements, max_size=8))
def test_g5_every_element_becomes_exactly_one_event_or_dead_letter(batch_elements: list[Any]) -> None:
    result = parse(batch_elements)
    assert isinstance(result, Batch)
    assert len(result.events) + len(result.rejects) == len(batch_elements)
    for e in result.events:
        RAW.validate(e)
        assert e["time"] <= NOW + 300_000
    for r in result.rejects:
        DLQ.validate(r.value)


@settings(max_examples=400)
@given(st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())))
def test_g4_parse_never_raises_and_always_decides(body: bytes) -> None:
    result = parse(body)
    assert isinstance(result, Batch | BodyError)
    if isinstance(result, BodyError):
        assert result.status_code in (400, 413)
        DLQ.validate(result.dead_letter.value)


@pytest.mark.parametrize("depth", [300, 1000, 1023])
def test_g5_an_element_too_deep_to_write_out_is_dead_lettered_with_the_whole_body(depth: int) -> None:
    # orjson reads 1,024 levels but writes 255; the deepest also defeat repr. None of it may become a 500.
    deep = "[" * depth + "1" + "]" * depth
    body = f'[{{"userid":"good","status":"0","time":{NOW},"sessionId":"s"}},{deep}]'.encode()
    batch = parse_body(body, receipt=RECEIPT, max_events=100, max_future_ms=300_000, raw_limit=1 << 20)
    assert isinstance(batch, Batch)
    assert [e["userid"] for e in batch.events] == ["good"]
    (letter,) = [r.value for r in batch.rejects]
    DLQ.validate(letter)
    assert letter["index"] == 1
    assert "nested too deeply" in letter["detail"]
    assert letter["raw"] == body.decode()
