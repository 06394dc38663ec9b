"""Thousands of malformed requests through the app in-process: never a 5xx, nothing published unsigned (G2, G4)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.contract import compute_signature
from gateway.config import GatewaySettings
from gateway.main import create_app
from gateway.metrics import GatewayMetrics

from .conftest import APP_KEY, PATH, SECRET
from .fakes import MemoryKafka

PARAM_NAMES = [
    "appKey",
    "timestamp",
    "signTimestamp",
    "rc-timestamp",
    "nonce",
    "rc-nonce",
    "signature",
    "rc-signature",
    "x",
]
text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)
json_scalar = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text
)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=20,
)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@st.composite
def elements(draw: st.DrawFn) -> Any:
    if draw(st.booleans()):
        return draw(json_value)
    good = {
        "userid": draw(st.sampled_from(["u1", "u2", "", "x" * 65]) | text),
        "status": draw(st.sampled_from(["0", "1", "2", 0, 1, 2, "3", True, None])),
        "time": draw(st.sampled_from([now_ms() - 1000, now_ms() + 10**7, 5, "1", 1.5])),
        "sessionId": draw(st.sampled_from(["s1", "", None]) | text),
        "os": draw(st.sampled_from(["iOS", None, 5])),
    }
    drop = draw(st.sets(st.sampled_from(list(good))))
    return {k: v for k, v in good.items() if k not in drop}


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "array", "wrapper"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "json":
        return orjson.dumps(draw(json_value))
    items = draw(st.lists(elements(), max_size=6))
    if kind == "array":
        return orjson.dumps(items)
    wrapper: dict[str, Any] = {"data": items}
    wrapper.update(draw(st.dictionaries(st.sampled_from(["type", "id", "time"]), json_scalar, max_size=3)))
    return orjson.dumps(wrapper)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str], bool]:
    """(query, body, headers, validly signed?)"""
    signed = draw(st.booleans())
    nonce = draw(st.text(st.characters(codec="ascii", categories=("L", "N")), min_size=1, max_size=12))
    timestamp = str(now_ms() + draw(st.sampled_from([0, -1000, 10**6, -(10**6)])))
    params: dict[str, str] = {}
    if signed:
        params = {
            "appKey": APP_KEY,
            "timestamp": timestamp,
            "nonce": nonce,
            "signature": compute_signature(SECRET, nonce, timestamp),
        }
        # a valid signature but a wrong detail is still unsigned for our purposes
        mutate = draw(st.sampled_from([None, None, None, "appKey", "signature", "timestamp", "nonce"]))
        if mutate is not None:
            params[mutate] = draw(text.filter(lambda v, old=params[mutate]: v != old))
            signed = False
        elif timestamp != str(now_ms()) and abs(int(timestamp) - now_ms()) > 600_000:
            signed = False
    else:
        params = draw(st.dictionaries(st.sampled_from(PARAM_NAMES), text, max_size=6))
    query = str(httpx.QueryParams(params))
    headers = draw(
        st.dictionaries(
            st.sampled_from(["content-type", "x-forwarded-for", "content-encoding"]),
            st.text(st.characters(codec="ascii", min_codepoint=32, max_codepoint=126), max_size=20),
            max_size=2,
        )
    )
    return query, draw(bodies()), headers, signed


def test_g4_fuzz_in_process_no_5xx_nothing_published_unsigned(
    gateway_settings: Callable[..., GatewaySettings],
) -> None:
    kafka = MemoryKafka()
    app = create_app(
        gateway_settings(gateway_max_body_bytes=4096, gateway_max_events=5),
        producer_factory=kafka.producer,
        metrics=GatewayMetrics(process_metrics=False),
    )
    statuses: dict[int, int] = {}
    with asyncio.Runner() as runner:
        lifespan = app.router.lifespan_context(app)
        runner.run(lifespan.__aenter__())
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")
        try:

            @settings(
                max_examples=2500, deadline=None, suppress_health_check=list(HealthCheck), database=None
            )
            @given(requests())
            def one(request: tuple[str, bytes, dict[str, str], bool]) -> None:
                query, body, headers, signed = request
                before = len(kafka.acked)
                response = runner.run(client.post(f"{PATH}?{query}", content=body, headers=headers))
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                assert response.status_code < 500, response.text
                if not signed:
                    assert response.status_code in (401, 403), response.text
                    assert len(kafka.acked) == before
                elif response.status_code == 200:
                    counts = response.json()
                    assert len(kafka.acked) - before == counts["accepted"] + counts["rejected"]

            one()
        finally:
            runner.run(client.aclose())
            runner.run(lifespan.__aexit__(None, None, None))
    # the run explored both sides of the signature check and the body check
    assert statuses.get(401, 0) > 100
    assert statuses.get(200, 0) > 30
    assert statuses.get(400, 0) > 10
