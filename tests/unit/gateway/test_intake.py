"""The webhook's rules without an app (G1-G5, G8): request head and body in, an answer, records and counts out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest

from core.contract import compute_signature
from gateway.config import GatewaySettings
from gateway.intake import Accepted, Answer, Intake
from gateway.publisher import Delivery
from gateway.signing import ReplayGuard, SignedParams

from .conftest import APP_KEY, SECRET

NOW = 1_700_000_000_000


def query(nonce: str = "n1", timestamp: int = NOW, secret: str = SECRET) -> dict[str, str]:
    ts = str(timestamp)
    return {
        "appKey": APP_KEY,
        "timestamp": ts,
        "nonce": nonce,
        "signature": compute_signature(secret, nonce, ts),
    }


def ev(userid: str = "u1", status: str = "0", **extra: Any) -> dict[str, Any]:
    return {"userid": userid, "status": status, "time": NOW - 1000, "sessionId": "s1", **extra}


@pytest.fixture
def make_intake(gateway_settings: Callable[..., GatewaySettings]) -> Callable[..., Intake]:
    def make(**overrides: Any) -> Intake:
        settings = gateway_settings(**overrides)
        guard = ReplayGuard(window_ms=600_000, max_entries=1000, clock_ms=lambda: NOW)
        return Intake(settings, guard)

    return make


def admitted(intake: Intake, nonce: str = "n1") -> SignedParams:
    params = intake.admit(peer="127.0.0.1", headers={}, query=query(nonce), now_ms=NOW)
    assert isinstance(params, SignedParams)
    return params


def accepted(intake: Intake, body: bytes, nonce: str = "n1", *, truncated: bool = False) -> Accepted:
    taken = intake.take(admitted(intake, nonce), body, truncated=truncated, received_at=NOW)
    assert isinstance(taken, Accepted)
    return taken


def test_g1_signed_request_is_admitted_with_its_parameters(make_intake: Callable[..., Intake]) -> None:
    params = admitted(make_intake(), "abc")
    assert (params.nonce, params.timestamp_ms) == ("abc", NOW)


@pytest.mark.parametrize(
    ("make_query", "reason"),
    [
        (lambda: {}, "missing_params"),
        (lambda: {**query(), "timestamp": "soon"}, "malformed_params"),
        (lambda: {**query(), "appKey": "other-app"}, "unknown_app_key"),
        (lambda: query(secret="wrong-secret"), "bad_signature"),
        (lambda: query(timestamp=NOW - 11 * 60 * 1000), "timestamp_out_of_window"),
    ],
)
def test_g2_refusals_are_401_with_the_reason_counted_not_answered(
    make_intake: Callable[..., Intake], make_query: Callable[[], dict[str, str]], reason: str
) -> None:
    answer = make_intake().admit(peer="127.0.0.1", headers={}, query=make_query(), now_ms=NOW)
    assert isinstance(answer, Answer)
    assert (answer.status, dict(answer.content), answer.outcome) == (
        401,
        {"error": "unauthorized"},
        "unauthorized",
    )
    assert answer.auth_failure is not None and answer.auth_failure.value == reason
    assert answer.reason == reason


def test_g8_allow_list_and_forwarded_for_only_from_a_trusted_proxy(
    make_intake: Callable[..., Intake],
) -> None:
    intake = make_intake(gateway_allow_cidrs="203.0.113.0/24", gateway_trusted_proxies="10.0.0.0/8")
    forwarded = {"x-forwarded-for": "203.0.113.5"}
    outside = intake.admit(peer="198.51.100.1", headers=forwarded, query=query(), now_ms=NOW)
    assert isinstance(outside, Answer) and (outside.status, outside.outcome) == (403, "forbidden")
    # The allow-list is judged before the signature: a forbidden source learns nothing about its signature.
    unsigned = intake.admit(peer="198.51.100.1", headers={}, query={}, now_ms=NOW)
    assert isinstance(unsigned, Answer) and unsigned.status == 403
    via_proxy = intake.admit(peer="10.0.0.2", headers=forwarded, query=query(), now_ms=NOW)
    assert isinstance(via_proxy, SignedParams)


def test_g6_valid_events_become_keyed_raw_records_and_a_200_once_delivered(
    make_intake: Callable[..., Intake], gateway_settings: Callable[..., GatewaySettings]
) -> None:
    taken = accepted(make_intake(), orjson.dumps([ev("alice"), ev("bob", "1"), ev("carol")]), "abc")
    raw = gateway_settings().topic_raw
    assert [(record.topic, record.key) for record in taken.records] == [
        (raw, b"alice"),
        (raw, b"bob"),
        (raw, b"carol"),
    ]
    first = orjson.loads(taken.records[0].value)
    assert (first["status"], first["received_at"], first["delivery_id"]) == (0, NOW, f"abc:{NOW}:0")

    published = taken.answer(Delivery.PUBLISHED)
    assert (published.status, dict(published.content)) == (200, {"accepted": 3, "rejected": 0})
    assert published.outcome == "published"
    assert sorted(published.events) == [("offline", "published", 1), ("online", "published", 2)]
    assert published.request_events == 3
    assert published.dead_letters == ()

    spooled = taken.answer(Delivery.SPOOLED)
    assert spooled.outcome == "spooled"
    assert sorted(spooled.events) == [("offline", "spooled", 1), ("online", "spooled", 2)]


def test_g5_mixed_batch_publishes_good_events_then_dead_letters_bad_ones(
    make_intake: Callable[..., Intake], gateway_settings: Callable[..., GatewaySettings]
) -> None:
    settings = gateway_settings()
    taken = accepted(make_intake(), orjson.dumps([ev("a"), ev("b", status="7"), ev("c"), {"userid": "d"}]))
    assert [(record.topic, record.key) for record in taken.records] == [
        (settings.topic_raw, b"a"),
        (settings.topic_raw, b"c"),
        (settings.topic_dlq, b"b"),
        (settings.topic_dlq, b"d"),
    ]
    answer = taken.answer(Delivery.PUBLISHED)
    assert dict(answer.content) == {"accepted": 2, "rejected": 2}
    assert ("invalid", "dead_lettered", 2) in answer.events
    assert answer.dead_letters == (("invalid_element", 2),)
    assert answer.request_events == 4


@pytest.mark.parametrize(
    ("body", "truncated", "status", "outcome", "reason"),
    [
        (b"[{not json", False, 400, "bad_request", "invalid_json"),
        (b'{"data": 1}', False, 400, "bad_request", "invalid_body"),
        (orjson.dumps([ev()] * 6), False, 413, "too_large", "too_many_events"),
        (b"[" + b" " * 100, True, 413, "too_large", "body_too_large"),
    ],
)
def test_g4_unusable_body_is_refused_as_a_whole_and_dead_lettered(
    make_intake: Callable[..., Intake],
    gateway_settings: Callable[..., GatewaySettings],
    body: bytes,
    truncated: bool,
    status: int,
    outcome: str,
    reason: str,
) -> None:
    taken = accepted(make_intake(gateway_max_events=5), body, truncated=truncated)
    (record,) = taken.records
    assert record.topic == gateway_settings().topic_dlq
    assert orjson.loads(record.value)["reason"] == reason
    answer = taken.answer(Delivery.PUBLISHED)
    assert (answer.status, answer.outcome, answer.reason) == (status, outcome, reason)
    assert answer.content["error"] == reason
    assert answer.dead_letters == ((reason, 1),)
    assert answer.events == () and answer.request_events is None


def test_g3_same_body_again_is_a_retry_another_body_is_refused(make_intake: Callable[..., Intake]) -> None:
    intake = make_intake()
    body = orjson.dumps([ev()])
    accepted(intake, body, "replay")
    accepted(intake, body, "replay")
    forged = intake.take(
        admitted(intake, "replay"), orjson.dumps([ev("mallory")]), truncated=False, received_at=NOW
    )
    assert isinstance(forged, Answer)
    assert (forged.status, forged.reason) == (401, "replayed_nonce")
    # A truncated body is remembered as such: its prefix sent in full is another body.
    prefix = b"[" + b" " * 100
    accepted(intake, prefix, "cut", truncated=True)
    whole = intake.take(admitted(intake, "cut"), prefix, truncated=False, received_at=NOW)
    assert isinstance(whole, Answer) and whole.reason == "replayed_nonce"


def test_g7_unavailable_is_503_with_retry_after_and_events_counted_as_refused(
    make_intake: Callable[..., Intake],
) -> None:
    taken = accepted(make_intake(), orjson.dumps([ev("a"), ev("b", "2"), ev("c", status="9")]))
    answer = taken.unavailable()
    assert (answer.status, dict(answer.content), answer.outcome) == (
        503,
        {"error": "unavailable"},
        "unavailable",
    )
    assert answer.headers == {"Retry-After": "5"}
    assert sorted(answer.events) == [("logout", "refused", 1), ("online", "refused", 1)]
    assert answer.dead_letters == () and answer.request_events is None
