"""The HTTP layer in-process (ASGI), with an in-memory Kafka: response codes, dead letters, probes, metrics, logs."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from .conftest import APP_KEY, PATH, SECRET, AppHarness, signed_url
from .fakes import MemoryKafka

RAW = "raw"
Harness = Callable[..., Any]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def ev(userid: str = "u1", status: str = "0", session: str = "s1", **extra: Any) -> dict[str, Any]:
    return {
        "userid": userid,
        "status": status,
        "os": "iOS",
        "time": now_ms() - 1000,
        "clientIp": "1.2.3.4:5",
        "sessionId": session,
        **extra,
    }


def topic(h: AppHarness, name: str) -> list[tuple[bytes | None, dict[str, Any]]]:
    settings = h.app.state.gateway.settings
    real = {"raw": settings.topic_raw, "dlq": settings.topic_dlq}[name]
    return [(k, orjson.loads(v)) for k, v in h.kafka.topic(real)]


async def test_g6_signed_request_publishes_keyed_events_with_receipt_metadata(
    harness_factory: Harness,
) -> None:
    async with harness_factory() as h:
        before = now_ms()
        r = await h.client.post(signed_url(nonce="abc"), json=[ev("alice"), ev("bob", "1", "s2")])
        assert r.status_code == 200
        assert r.json() == {"accepted": 2, "rejected": 0}
        published = topic(h, "raw")
        assert [k for k, _ in published] == [b"alice", b"bob"]
        first = published[0][1]
        assert first["received_at"] >= before
        assert first["delivery_id"].startswith("abc:") and first["delivery_id"].endswith(":0")
        assert published[1][1]["status"] == 1
        assert h.sample("presence_gateway_requests_total", outcome="published") == 1
        assert h.sample("presence_gateway_events_total", status="online", outcome="published") == 1


@pytest.mark.parametrize(
    "names",
    [
        ("timestamp", "nonce", "signature"),
        ("signTimestamp", "nonce", "signature"),
        ("rc-timestamp", "rc-nonce", "rc-signature"),
    ],
)
async def test_g1_older_parameter_names(harness_factory: Harness, names: tuple[str, str, str]) -> None:
    async with harness_factory() as h:
        r = await h.client.post(signed_url(names=names), json=[ev()])
        assert r.status_code == 200


async def test_g1_previous_secret_accepted(harness_factory: Harness) -> None:
    async with harness_factory(app_secret="new-secret-xyz", app_secret_previous=SECRET) as h:
        assert (await h.client.post(signed_url(), json=[ev()])).status_code == 200
        assert (
            await h.client.post(signed_url(secret="new-secret-xyz", nonce="n2"), json=[ev()])
        ).status_code == 200
        assert (
            await h.client.post(signed_url(secret="other-secret", nonce="n3"), json=[ev()])
        ).status_code == 401


# URLs are built when the test runs, not at collection: a signed timestamp ages while the suite runs.
@pytest.mark.parametrize(
    ("make_url", "reason"),
    [
        (lambda: PATH, "missing_params"),
        (lambda: PATH + f"?appKey={APP_KEY}&timestamp=x&nonce=1&signature=ab", "malformed_params"),
        (lambda: signed_url().replace(APP_KEY, "other-app"), "unknown_app_key"),
        (lambda: signed_url(secret="wrong-secret"), "bad_signature"),
        (lambda: signed_url(timestamp=now_ms() - 11 * 60 * 1000), "timestamp_out_of_window"),
        (lambda: signed_url(timestamp=now_ms() + 11 * 60 * 1000), "timestamp_out_of_window"),
    ],
)
async def test_g2_unauthorized_publishes_nothing_and_is_counted(
    harness_factory: Harness, make_url: Callable[[], str], reason: str
) -> None:
    async with harness_factory() as h:
        r = await h.client.post(make_url(), json=[ev()])
        assert r.status_code == 401
        assert h.kafka.acked == []
        assert h.sample("presence_gateway_auth_failures_total", reason=reason) == 1
        assert h.sample("presence_gateway_requests_total", outcome="unauthorized") == 1


async def test_g3_replay_with_same_body_is_a_retry_with_other_body_is_401(harness_factory: Harness) -> None:
    async with harness_factory() as h:
        url = signed_url(nonce="replay")
        body = orjson.dumps([ev()])
        assert (await h.client.post(url, content=body)).status_code == 200
        assert (await h.client.post(url, content=body)).status_code == 200
        forged = await h.client.post(url, json=[ev("mallory")])
        assert forged.status_code == 401
        assert all(k != b"mallory" for k, _ in topic(h, "raw"))
        assert h.sample("presence_gateway_auth_failures_total", reason="replayed_nonce") == 1


async def test_g4_invalid_json_is_400_and_dead_lettered(harness_factory: Harness) -> None:
    async with harness_factory() as h:
        r = await h.client.post(signed_url(), content=b"[{not json")
        assert r.status_code == 400
        assert topic(h, "raw") == []
        (letter,) = topic(h, "dlq")
        assert letter[0] is None
        assert letter[1]["reason"] == "invalid_json"
        assert letter[1]["raw"] == "[{not json"


async def test_g4_body_too_large_is_413_and_dead_lettered_capped(harness_factory: Harness) -> None:
    async with harness_factory(gateway_max_body_bytes=2048, gateway_dlq_raw_max_bytes=512) as h:
        r = await h.client.post(signed_url(), content=b"[" + b" " * 5000 + b"]")
        assert r.status_code == 413
        (letter,) = topic(h, "dlq")
        assert letter[1]["reason"] == "body_too_large"
        assert letter[1]["raw_truncated"] is True
        assert len(letter[1]["raw"]) == 512


async def test_g4_unsigned_large_body_is_401_not_read(harness_factory: Harness) -> None:
    async with harness_factory(gateway_max_body_bytes=2048) as h:
        r = await h.client.post(signed_url(secret="wrong-secret"), content=b"x" * 5000)
        assert r.status_code == 401
        assert h.kafka.acked == []


async def test_g4_too_many_events_is_413(harness_factory: Harness) -> None:
    async with harness_factory(gateway_max_events=3) as h:
        r = await h.client.post(signed_url(), json=[ev()] * 4)
        assert r.status_code == 413
        assert topic(h, "raw") == []
        assert topic(h, "dlq")[0][1]["reason"] == "too_many_events"


async def test_g4_wrapper_object(harness_factory: Harness) -> None:
    async with harness_factory() as h:
        body = {"type": "user:connection_status", "id": "evt-1", "time": now_ms(), "data": [ev()]}
        r = await h.client.post(signed_url(), json=body)
        assert r.status_code == 200
        assert topic(h, "raw")[0][1]["delivery_id"] == "evt-1"


async def test_g5_mixed_batch_publishes_good_and_dead_letters_bad(harness_factory: Harness) -> None:
    async with harness_factory() as h:
        r = await h.client.post(signed_url(), json=[ev("a"), ev("b", status="7"), ev("c"), {"userid": "d"}])
        assert r.status_code == 200
        assert r.json() == {"accepted": 2, "rejected": 2}
        assert [k for k, _ in topic(h, "raw")] == [b"a", b"c"]
        letters = topic(h, "dlq")
        assert [(k, v["index"]) for k, v in letters] == [(b"b", 1), (b"d", 3)]
        assert all(v["reason"] == "invalid_element" for _, v in letters)
        assert h.sample("presence_gateway_dead_letters_total", reason="invalid_element") == 2


async def test_g7_kafka_down_spools_and_answers_200_fast(harness_factory: Harness) -> None:
    kafka = MemoryKafka()
    async with harness_factory(kafka=kafka) as h:
        kafka.set_up(False)
        for i in range(5):
            started = time.monotonic()
            r = await h.client.post(signed_url(nonce=f"n{i}"), json=[ev(f"u{i}")])
            assert r.status_code == 200
            assert time.monotonic() - started < 1.0
        assert h.sample("presence_gateway_requests_total", outcome="spooled") == 5
        assert (await h.client.get("/readyz")).status_code == 200
        kafka.set_up(True)
        deadline = time.monotonic() + 5
        while h.app.state.gateway.publisher.spool.records and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert h.app.state.gateway.publisher.spool.records == 0
        assert {k for k, _ in topic(h, "raw")} == {f"u{i}".encode() for i in range(5)}


async def test_g7_spool_disabled_and_kafka_down_is_503(harness_factory: Harness) -> None:
    kafka = MemoryKafka()
    async with harness_factory(kafka=kafka, gateway_spool_enabled=False) as h:
        kafka.set_up(False)
        r = await h.client.post(signed_url(), json=[ev()])
        assert r.status_code == 503
        assert r.headers["retry-after"] == "5"
        assert (await h.client.get("/readyz")).status_code == 503


async def test_g8_allow_list(harness_factory: Harness) -> None:
    async with harness_factory(gateway_allow_cidrs="203.0.113.0/24", client_addr="198.51.100.1") as h:
        r = await h.client.post(signed_url(), json=[ev()])
        assert r.status_code == 403
        assert h.kafka.acked == []
        assert h.sample("presence_gateway_requests_total", outcome="forbidden") == 1
    async with harness_factory(gateway_allow_cidrs="203.0.113.0/24", client_addr="203.0.113.5") as h:
        assert (await h.client.post(signed_url(), json=[ev()])).status_code == 200


async def test_g8_forwarded_for_only_from_trusted_proxy(harness_factory: Harness) -> None:
    kw = {"gateway_allow_cidrs": "203.0.113.0/24", "gateway_trusted_proxies": "10.0.0.0/8"}
    async with harness_factory(client_addr="10.0.0.2", **kw) as h:
        r = await h.client.post(signed_url(), json=[ev()], headers={"X-Forwarded-For": "203.0.113.5"})
        assert r.status_code == 200
    async with harness_factory(client_addr="198.51.100.1", **kw) as h:
        r = await h.client.post(signed_url(), json=[ev()], headers={"X-Forwarded-For": "203.0.113.5"})
        assert r.status_code == 403


async def test_g9_probes_metrics_and_docs(harness_factory: Harness) -> None:
    async with harness_factory() as h:
        assert (await h.client.get("/healthz")).json() == {"status": "ok"}
        ready = await h.client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        metrics = (await h.client.get("/metrics")).text
        for name in (
            "presence_gateway_requests_total",
            "presence_gateway_request_duration_seconds_bucket",
            "presence_gateway_breaker_state",
            "presence_gateway_spool_bytes",
            "presence_gateway_spool_oldest_age_seconds",
        ):
            assert name in metrics
        openapi = (await h.client.get("/openapi.json")).json()
        assert PATH in openapi["paths"]
        assert (await h.client.get("/docs")).status_code == 200


async def test_g9_wrong_method_and_unknown_path_are_not_5xx(harness_factory: Harness) -> None:
    async with harness_factory() as h:
        assert (await h.client.get(PATH)).status_code == 405
        assert (await h.client.post("/elsewhere")).status_code == 404


async def test_g9_logs_never_contain_secret_or_signature(
    harness_factory: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with harness_factory() as h:
        url = signed_url(nonce="lognonce")
        signature = url.rsplit("signature=", 1)[1]
        await h.client.post(url, json=[ev()])
        await h.client.post(signed_url(secret="wrong-secret"), json=[ev()])
        await h.client.post(url, content=b"garbage")
    from core.logs import JsonFormatter

    ours = [r for r in caplog.records if r.name.startswith(("gateway", "uvicorn", "presence"))]
    assert any(r.name == "gateway.access" for r in ours)
    text = "\n".join(JsonFormatter().format(record) for record in ours)
    assert '"path":"/rongcloud/online-status"' in text
    assert SECRET not in text
    assert signature not in text
    assert "lognonce" not in text


def test_g9_redaction_as_defence_in_depth() -> None:
    from core.logs import redact

    assert redact("/x?appKey=k&nonce=1&signature=abc") == "/x?appKey=k&nonce=[redacted]&signature=[redacted]"


async def test_g9_access_log_has_every_failure_and_the_sampled_fraction_of_successes(
    harness_factory: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    async with harness_factory(gateway_access_log_success_sample=0.25) as h:
        for i in range(8):
            assert (await h.client.post(signed_url(nonce=f"ok{i}"), json=[ev()])).status_code == 200
        for i in range(3):
            url = signed_url(nonce=f"bad{i}", secret="wrong-secret")
            assert (await h.client.post(url, json=[ev()])).status_code == 401
        assert (await h.client.post(signed_url(nonce="junk"), content=b"junk")).status_code == 400
        await h.client.get("/healthz")
    lines = [r for r in caplog.records if r.name == "gateway.access" and r.levelno == logging.INFO]
    statuses = sorted(r.__dict__["status"] for r in lines)
    assert statuses == [200, 200, 400, 401, 401, 401]
    assert {r.__dict__["reason"] for r in lines if r.__dict__["status"] == 401} == {"bad_signature"}


async def test_an_unhandled_error_is_a_counted_500_without_a_traceback(
    harness_factory: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug (never something a client sent) answers 500 and is counted as outcome "error", which the 5xx alert
    sees; the traceback goes to the log, not to the client."""
    async with harness_factory() as h:

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("a bug")

        monkeypatch.setattr(h.app.state.gateway.intake, "take", broken)
        with caplog.at_level(logging.ERROR, logger="gateway.webhook"):
            r = await h.client.post(signed_url(nonce="bug"), json=[ev()])
        assert r.status_code == 500
        assert r.json() == {"error": "internal error"}
        assert "Traceback" not in r.text
        assert h.sample("presence_gateway_requests_total", outcome="error") == 1
        assert any(
            record.exc_info for record in caplog.records if record.message == "unhandled error in the webhook"
        )
