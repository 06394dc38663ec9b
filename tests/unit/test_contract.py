"""The contract module: each fact of the upstream webhook and of the product's Kafka layout, once."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from core import contract
from tests.schemas import closed, load


def test_g1_signature_test_vector() -> None:
    """G1: the test vector of the behaviour contract."""
    assert (
        contract.compute_signature("Y1W2MeFwwwRxa0", "14314", "1408710653000")
        == "30be0bbca9c9b2e27578701e9fda2358a814c88f"
    )


def test_timestamps_in_seconds_are_scaled_to_milliseconds() -> None:
    assert contract.parse_timestamp_ms("1408710653") == 1408710653000
    assert contract.parse_timestamp_ms("1408710653000") == 1408710653000
    with pytest.raises(ValueError, match="digits"):
        contract.parse_timestamp_ms("-1")


def test_partition_of_matches_the_java_client() -> None:
    """murmur2 as Kafka's DefaultPartitioner computes it (values from the Java client's test suite)."""
    assert contract.partition_of(b"21", 1000) == (-973932308 & 0x7FFFFFFF) % 1000
    assert contract.partition_of(b"foobar", 1000) == (-790332482 & 0x7FFFFFFF) % 1000


def test_changelog_topic_follows_fausts_naming() -> None:
    assert contract.changelog_topic("presence-worker") == "presence-worker-users-changelog"


RAW = {
    "schema": 1,
    "userid": "apert60541",
    "status": 2,
    "time": 1437982625625,
    "sessionId": "0O6Bvfvik_L9R_NxR6GqQb",
    "os": "iOS",
    "clientIp": "172.20.10.94:41748",
    "received_at": 1437982625700,
    "delivery_id": "14314:1408710653000:0",
}


def test_decode_raw_maps_upstream_codes() -> None:
    e = contract.decode_raw(b"apert60541", orjson.dumps(RAW), delivery_id="raw:3:17")
    assert (e.userid, e.session_id, e.status, e.time) == (
        "apert60541",
        "0O6Bvfvik_L9R_NxR6GqQb",
        "logout",
        RAW["time"],
    )
    assert (e.os, e.client_ip, e.received_at, e.delivery_id) == (
        "iOS",
        "172.20.10.94:41748",
        1437982625700,
        "raw:3:17",
    )
    online = contract.decode_raw(None, orjson.dumps({**RAW, "status": 0, "os": None}), "d")
    assert (online.status, online.os) == ("online", None)


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        (None, None, "undecodable_raw"),
        (None, b"{not json", "undecodable_raw"),
        (None, b"[1]", "invalid_raw"),
        (None, orjson.dumps({**RAW, "userid": "u" * 65}), "invalid_raw"),
        (None, orjson.dumps({**RAW, "status": True}), "invalid_raw"),
        (None, orjson.dumps({**RAW, "status": 3}), "invalid_raw"),
        (None, orjson.dumps({**RAW, "time": "1"}), "invalid_raw"),
        (None, orjson.dumps({**RAW, "os": 1}), "invalid_raw"),
        (b"someone-else", orjson.dumps(RAW), "key_mismatch"),
    ],
)
def test_decode_raw_refuses_what_it_cannot_use(key: bytes | None, value: bytes | None, reason: str) -> None:
    with pytest.raises(contract.InvalidRaw) as caught:
        contract.decode_raw(key, value, "d")
    assert caught.value.reason == reason


def test_dead_letter_caps_raw_bytes_without_splitting_a_character() -> None:
    letter = contract.dead_letter(
        source="worker", reason="invalid_raw", detail="d", raw="é".encode() * 3, raw_limit=5, received_at=7
    )
    assert (letter["raw"], letter["raw_truncated"], letter["source"], letter["received_at"]) == (
        "éé",
        True,
        "worker",
        7,
    )
    whole = contract.dead_letter(
        source="gateway", reason="r", detail="d", raw=b"\xff", raw_limit=5, received_at=1
    )
    assert (whole["raw"], whole["raw_truncated"]) == ("\ufffd", False)


# --- observations on RAW (R1) -------------------------------------------------------------------------------

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
# raw.v1 as it was before observations were added: every event it accepts must stay valid.
RAW_V1_BEFORE_OBSERVATIONS = {
    "type": "object",
    "required": ["schema", "userid", "status", "time", "sessionId", "received_at", "delivery_id"],
    "additionalProperties": False,
    "properties": {
        "schema": {"const": 1},
        "userid": {"type": "string", "minLength": 1, "maxLength": 64},
        "status": {"type": "integer", "enum": [0, 1, 2]},
        "time": {"type": "integer"},
        "sessionId": {"type": "string", "minLength": 1},
        "os": {"type": ["string", "null"]},
        "clientIp": {"type": ["string", "null"]},
        "received_at": {"type": "integer"},
        "delivery_id": {"type": "string", "minLength": 1},
    },
}
OBSERVATION = contract.Observation("apert60541", False, 1_700_000_000_000, "age", 1_700_000_000_120)


def raw_schema() -> Draft202012Validator:
    """The writer (closed) form: what a producer may publish (readers accept more: tests/schemas.py)."""
    return Draft202012Validator(closed(load("raw.v1.schema.json")))


def test_r1_observation_round_trip() -> None:
    value = contract.encode_observation(OBSERVATION)
    decoded = contract.decode_observation(b"apert60541", value, delivery_id="2@17")
    assert decoded == OBSERVATION._replace(delivery_id="2@17")
    assert contract.is_observation(orjson.loads(value))
    assert not contract.is_observation(RAW)
    raw_schema().validate(orjson.loads(value))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"online": "1"}, "invalid_raw"),
        ({"at": 1_700_000_000}, "invalid_raw"),  # seconds, not ms
        ({"source": "cron"}, "invalid_raw"),
        ({"userid": ""}, "invalid_raw"),
        ({"kind": "event"}, "invalid_raw"),
    ],
)
def test_r1_unusable_observations_are_refused(change: dict[str, object], reason: str) -> None:
    value = orjson.loads(contract.encode_observation(OBSERVATION)) | change
    with pytest.raises(contract.InvalidRaw) as caught:
        contract.decode_observation(b"apert60541", orjson.dumps(value), delivery_id="0@0")
    assert caught.value.reason == reason
    assert not raw_schema().is_valid(value)


def test_r1_observation_key_must_be_its_user() -> None:
    with pytest.raises(contract.InvalidRaw) as caught:
        contract.decode_observation(
            b"someone-else", contract.encode_observation(OBSERVATION), delivery_id="0@0"
        )
    assert caught.value.reason == "key_mismatch"


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {
            "schema": st.just(1),
            "userid": st.text(min_size=1, max_size=64),
            "status": st.sampled_from([0, 1, 2]),
            "time": st.integers(),
            "sessionId": st.text(min_size=1, max_size=30),
            "received_at": st.integers(),
            "delivery_id": st.text(min_size=1, max_size=30),
        },
        optional={"os": st.none() | st.text(max_size=10), "clientIp": st.none() | st.text(max_size=10)},
    )
)
def test_raw_schema_change_is_additive(event: dict[str, object]) -> None:
    """Every event valid under raw.v1 before observations is valid now, and is not an observation."""
    assert Draft202012Validator(RAW_V1_BEFORE_OBSERVATIONS).is_valid(event)
    assert raw_schema().is_valid(event)
    assert not contract.is_observation(event)


def test_raw_schema_event_branch_is_unchanged() -> None:
    event = closed(load("raw.v1.schema.json"))["$defs"]["event"]
    assert event["required"] == RAW_V1_BEFORE_OBSERVATIONS["required"]
    assert event["additionalProperties"] is False
    assert set(event["properties"]) == set(RAW_V1_BEFORE_OBSERVATIONS["properties"])  # type: ignore[arg-type]
    # An event with a kind is neither an event nor an observation.
    assert not raw_schema().is_valid(RAW | {"kind": "event"})


# --- intake-gap markers and the RAW dispatcher ----------------------------------------------------------------

GAP = contract.GapMarker("gw-1:1700000000000:unclean_stop", "gw-1", "unclean_stop", 1_700_000_000_000,
                         1_700_000_042_000)  # fmt: skip


def test_a_gap_marker_round_trips_and_matches_the_schema() -> None:
    value = contract.encode_gap_marker(GAP)
    raw_schema().validate(orjson.loads(value))
    assert contract.decode_raw_record(None, value, "3@9") == GAP._replace(delivery_id="3@9")
    # A marker is no event and no observation, whatever its key.
    assert not contract.is_observation(orjson.loads(value))
    assert contract.decode_raw_record(b"anything", value, "") == GAP


@pytest.mark.parametrize(
    "change",
    [{"start": 1_700_000}, {"end": 1_600_000_000_000}, {"id": ""}, {"gateway": None}, {"reason": 7}],
)
def test_unusable_gap_markers_are_refused(change: dict[str, object]) -> None:
    value = orjson.loads(contract.encode_gap_marker(GAP)) | change
    with pytest.raises(contract.InvalidRaw) as caught:
        contract.decode_raw_record(None, orjson.dumps(value), "0@0")
    assert caught.value.reason == "invalid_raw"
    if "end" not in change:  # a schema cannot compare two fields: end before start is the decoder's check
        assert not raw_schema().is_valid(value)


def test_the_raw_dispatcher_reads_each_kind_and_refuses_unknown_ones() -> None:
    event = contract.decode_raw_record(b"apert60541", orjson.dumps(RAW), "1@1")
    assert event == contract.decode_raw(b"apert60541", orjson.dumps(RAW), "1@1")
    observation = contract.decode_raw_record(b"apert60541", contract.encode_observation(OBSERVATION), "1@2")
    assert observation == OBSERVATION._replace(delivery_id="1@2")
    with pytest.raises(contract.InvalidRaw) as caught:
        contract.decode_raw_record(b"apert60541", orjson.dumps(RAW | {"kind": "event"}), "1@3")
    assert caught.value.reason == "invalid_raw"
    with pytest.raises(contract.InvalidRaw) as caught:
        contract.decode_raw_record(None, b"{nope", "1@4")
    assert caught.value.reason == "undecodable_raw"
