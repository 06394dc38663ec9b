"""The contract module: each fact of the upstream webhook and of the product's Kafka layout, once."""

from __future__ import annotations

import orjson
import pytest

from core import contract


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
