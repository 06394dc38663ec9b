"""Hostile input at the real gateway process (G2, G4, G5): schemathesis on the OpenAPI document and hypothesis on
raw bodies and query strings. No 5xx, no crash, memory bounded, and nothing published without a valid signature:
RAW holds exactly the events the signed requests' answers counted as accepted, DLQ exactly their dead letters."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.settings import CommonSettings
from core.topics import ensure_topics
from tests.integration.streams.harness import read_topic

from .conftest import knob
from .report import Report
from .support import GatewayProcess, now_ms, rss_bytes, signed_query

_nonces = itertools.count()
# The gateway's own bound on what it holds per request is the body limit; allow a few of them plus slack.
RSS_BOUND_BYTES = 96 * 1024 * 1024


class Tally:
    """Expected RAW and DLQ counts from the answers to signed requests; statuses of everything."""

    def __init__(self) -> None:
        self.raw = 0
        self.dlq = 0
        self.statuses: dict[int, int] = {}
        self.requests = 0
        self.signed = 0

    def note(self, signed: bool, response: httpx.Response | Any) -> None:
        status = response.status_code
        self.requests += 1
        self.signed += signed
        self.statuses[status] = self.statuses.get(status, 0) + 1
        assert status < 500, f"{status} for a client's request: {response.text[:300]}"
        if not signed:
            assert status in (400, 401, 408, 413), status
            return
        if status == 200:
            body = response.json()
            self.raw += body["accepted"]
            self.dlq += body["rejected"]
        elif status in (400, 413):
            self.dlq += 1  # an unusable body under a valid signature is dead-lettered whole (G4)

    @property
    def server_errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s >= 500)


def _count(bootstrap: str, topic: str) -> int:
    # Records with a "kind" are not events: the gateway marks an intake gap for every 400, 408 and 413 (G10).
    records = asyncio.run(read_topic(bootstrap, topic, timeout=30))
    return sum(1 for *_, value in records if value is None or b'"kind"' not in value)


def _check_published(gateway: GatewayProcess, values: dict[str, Any], tally: Tally) -> tuple[int, int]:
    gateway.wait_drained(60)
    bootstrap = values["kafka_bootstrap_servers"]
    raw, dlq = _count(bootstrap, values["topic_raw"]), _count(bootstrap, values["topic_dlq"])
    return raw, dlq


@pytest.fixture
def fuzz_gateway(settings_for: Callable[..., dict[str, Any]], tmp_path: Path) -> Any:
    values = settings_for()
    asyncio.run(ensure_topics(CommonSettings(**values)))
    gateway = GatewayProcess(values, tmp_path / "spool", tmp_path / "gateway.log")
    gateway.start()
    try:
        yield gateway, values
    finally:
        gateway.stop()


def test_schemathesis_on_the_openapi_no_5xx_and_unsigned_never_published(
    fuzz_gateway: tuple[GatewayProcess, dict[str, Any]], pytestconfig: pytest.Config, reliability: Report
) -> None:
    gateway, values = fuzz_gateway
    examples = int(knob(pytestconfig, "SCHEMA_EXAMPLES", short=200, long=3000))
    schema = schemathesis.openapi.from_url(f"{gateway.url}/openapi.json")
    operation = schema["/rongcloud/online-status"]["POST"]
    tally = Tally()
    rss_before = rss_bytes(gateway.pid)

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=operation.as_strategy(), signed=st.booleans())
    def run(case: Any, signed: bool) -> None:
        if signed:
            case.query = dict(httpx.QueryParams(signed_query(nonce=f"st-{next(_nonces)}")))
        response = case.call(base_url=gateway.url, timeout=10)
        tally.note(signed, response)

    run()
    rss_after = rss_bytes(gateway.pid)
    raw, dlq = _check_published(gateway, values, tally)
    reliability.record(
        "test_hostile_input::schemathesis",
        f"schemathesis, {tally.requests} requests from the OpenAPI document ({tally.signed} signed)",
        requests_acked=tally.statuses.get(200, 0),
        server_errors=tally.server_errors,
        details={
            "HTTP statuses": dict(sorted(tally.statuses.items())),
            "RAW records / expected from the answers": f"{raw} / {tally.raw}",
            "DLQ records / expected from the answers": f"{dlq} / {tally.dlq}",
            "gateway RSS before / after (MiB)": f"{rss_before / 2**20:.1f} / {rss_after / 2**20:.1f}",
        },
    )
    assert tally.requests >= examples // 2
    assert raw == tally.raw, "RAW holds events no signed request's answer accounted for"
    assert dlq == tally.dlq, "DLQ holds letters no signed request's answer accounted for"
    assert rss_after - rss_before < RSS_BOUND_BYTES


# --- raw bodies and query strings ---------------------------------------------------------------------------

_text = st.text(st.characters(codec="utf-8"), max_size=40)
_scalar = (
    st.none()
    | st.booleans()
    | st.integers(-(2**80), 2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | _text
)


def _valid_event(index: int) -> dict[str, Any]:
    return {"userid": f"fz-{index}", "status": "0", "time": now_ms() - 1000, "sessionId": f"s{index}"}


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """Byte bodies a hostile or broken client might send."""
    kind = draw(
        st.sampled_from(
            ["huge", "deep", "nan", "duplicate_keys", "wrong_types", "unicode", "bytes", "numbers", "mixed"]
        )
    )
    index = draw(st.integers(0, 10**9))
    if kind == "huge":
        size = draw(st.sampled_from([1024 * 1024 + 1, 2 * 1024 * 1024, 8 * 1024 * 1024]))
        return b"[" + b" " * size + b"]"
    if kind == "deep":
        depth = draw(st.integers(100, 200_000))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        return opener * depth + b"1" + closer * depth
    if kind == "nan":
        literal = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-0"]))
        return b'[{"userid":"u","status":"0","time":' + literal + b',"sessionId":"s"}]'
    if kind == "duplicate_keys":
        event = orjson.dumps(_valid_event(index))[1:-1]
        return b"[{" + event + b',"userid":' + orjson.dumps(draw(_text)) + b',"status":1}]'
    if kind == "wrong_types":
        event: dict[str, Any] = _valid_event(index)
        field = draw(st.sampled_from(sorted(event)))
        event[field] = draw(
            _scalar | st.lists(_scalar, max_size=3) | st.dictionaries(_text, _scalar, max_size=3)
        )
        return _dumps([event])
    if kind == "unicode":
        event = _valid_event(index)
        event[draw(st.sampled_from(["userid", "sessionId", "os"]))] = draw(
            st.text(st.characters(codec="utf-8"), min_size=1, max_size=80)
        )
        raw = _dumps([event])
        if draw(st.booleans()):
            raw = raw.replace(b'"os"', b'"os\\ud800"')  # a lone surrogate escape
        return raw
    if kind == "bytes":
        return draw(st.binary(max_size=2048))
    if kind == "numbers":
        value = draw(st.sampled_from([b"1" * 5000, b"-" + b"9" * 400, b"1.5e308", b"0x10", b"1_000", b"01"]))
        return b'[{"userid":"u","status":"0","time":' + value + b',"sessionId":"s"}]'
    items = draw(
        st.lists(
            st.recursive(
                _scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4)
            ),
            max_size=5,
        )
    )
    return _dumps(items)


def _dumps(value: Any) -> bytes:
    """JSON as a lenient client library writes it: NaN, Infinity and big integers included (orjson refuses)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")


@st.composite
def queries(draw: st.DrawFn) -> tuple[bool, str]:
    """(signed?, query string). Unsigned ones are broken in every way a query can be."""
    nonce = f"fzq-{next(_nonces)}"
    if draw(st.booleans()):
        return True, signed_query(nonce=nonce)
    good = signed_query(nonce=nonce)
    return False, draw(
        st.sampled_from(
            [
                "",
                good.replace("signature=", "signature=0"),
                good + "&signature=" + "0" * 40,
                signed_query(nonce=nonce, secret="not-the-secret"),
                signed_query(nonce=nonce, timestamp=now_ms() - 3_600_000),
                good.replace("appKey=", "appKey=%00"),
                good.replace("timestamp=", "timestamp=-"),
                good + "&appKey=" + "k" * 10_000,  # the last value of a repeated name counts
                good.replace("nonce=", "nonce=%F0%9F%92%A5%ZZ"),
            ]
        )
        | st.text(st.characters(codec="utf-8", exclude_characters="#"), max_size=200)
    )


def test_hypothesis_raw_bodies_and_queries_no_5xx_memory_bounded_unsigned_never_published(
    fuzz_gateway: tuple[GatewayProcess, dict[str, Any]], pytestconfig: pytest.Config, reliability: Report
) -> None:
    gateway, values = fuzz_gateway
    examples = int(knob(pytestconfig, "RAW_EXAMPLES", short=300, long=5000))
    tally = Tally()
    rss_before = rss_bytes(gateway.pid)
    peak = rss_before
    kinds: dict[str, int] = {}

    with httpx.Client(timeout=15) as client:

        @settings(
            max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        @given(
            query=queries(),
            body=bodies(),
            content_type=st.sampled_from(["application/json", "text/plain", ""]),
        )
        def run(query: tuple[bool, str], body: bytes, content_type: str) -> None:
            nonlocal peak
            signed, text = query
            headers = {"content-type": content_type} if content_type else {}
            try:
                response = client.post(f"{gateway.webhook}?{text}", content=body, headers=headers)
            except httpx.InvalidURL:
                kinds["refused by the client library"] = kinds.get("refused by the client library", 0) + 1
                return
            tally.note(signed, response)
            if tally.requests % 25 == 0:
                peak = max(peak, rss_bytes(gateway.pid))

        run()
    assert gateway.process is not None and gateway.process.poll() is None, "the gateway crashed"
    rss_after = rss_bytes(gateway.pid)
    peak = max(peak, rss_after)
    raw, dlq = _check_published(gateway, values, tally)
    reliability.record(
        "test_hostile_input::raw",
        f"hypothesis, {tally.requests} raw bodies/query strings ({tally.signed} signed)",
        requests_acked=tally.statuses.get(200, 0),
        server_errors=tally.server_errors,
        details={
            "HTTP statuses": dict(sorted(tally.statuses.items())),
            "RAW records / expected from the answers": f"{raw} / {tally.raw}",
            "DLQ records / expected from the answers": f"{dlq} / {tally.dlq}",
            "gateway RSS before / peak / after (MiB)": (
                f"{rss_before / 2**20:.1f} / {peak / 2**20:.1f} / {rss_after / 2**20:.1f}"
            ),
            **kinds,
        },
    )
    assert tally.requests >= examples // 2
    assert raw == tally.raw, "RAW holds events no signed request's answer accounted for"
    assert dlq == tally.dlq, "DLQ holds letters no signed request's answer accounted for"
    assert peak - rss_before < RSS_BOUND_BYTES, f"RSS grew by {(peak - rss_before) / 2**20:.0f} MiB"
