"""Malformed and unsigned requests at the real server (G2, G4): no 5xx, nothing published without a signature.

The bulk of the fuzzing runs in-process (tests/unit/gateway/test_fuzz.py); this smaller run goes through uvicorn,
httptools and the real producer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import GatewaySettings

from .conftest import GatewayServer, consume, event, signed_query

StartGateway = Callable[[GatewaySettings], GatewayServer]

text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)
junk = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=10,
)


@st.composite
def fuzz_requests(draw: st.DrawFn) -> tuple[bool, str, bytes]:
    """(signed?, query, body). Unsigned bodies always hold a valid event for a user named "unsigned-…"."""
    index = draw(st.integers(0, 10**9))
    signed = draw(st.booleans())
    if signed:
        query = signed_query(nonce=f"fz{index}")
    else:
        query = draw(
            st.sampled_from(
                [
                    "",
                    signed_query(nonce=f"fz{index}", secret="wrong-secret"),
                    signed_query(nonce=f"fz{index}").replace("appKey=", "appKey=x"),
                    signed_query(nonce=f"fz{index}", timestamp=1),
                    str(
                        httpx.QueryParams(
                            draw(
                                st.dictionaries(
                                    st.sampled_from(["appKey", "nonce", "signature", "timestamp"]), text
                                )
                            )
                        )
                    ),
                ]
            )
        )
    items: list[Any] = draw(st.lists(junk, max_size=3))
    if not signed:
        items.append(event(f"unsigned-{index}", "s"))
    shape = draw(st.sampled_from(["array", "wrapper", "bytes"]))
    if shape == "bytes" and signed:
        body = draw(st.binary(max_size=200))
    elif shape == "wrapper":
        body = orjson.dumps({"type": "user:connection_status", "id": f"w{index}", "data": items})
    else:
        body = orjson.dumps(items)
    return signed, query, body


async def test_g4_fuzz_real_server_no_5xx_and_unsigned_never_published(
    gateway_settings: Callable[..., GatewaySettings], start_gateway: StartGateway
) -> None:
    gateway = gateway_settings()
    server = start_gateway(gateway)
    results: list[tuple[bool, int]] = []
    loop = asyncio.get_running_loop()

    with httpx.Client(timeout=10) as client:

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(fuzz_requests())
        def one(request: tuple[bool, str, bytes]) -> None:
            signed, query, body = request
            response = client.post(f"{server.webhook}?{query}", content=body)
            results.append((signed, response.status_code))
            assert response.status_code < 500, response.text
            if not signed:
                assert response.status_code == 401

        await loop.run_in_executor(None, one)
        marker = client.post(
            f"{server.webhook}?{signed_query(nonce='fuzz-marker')}", json=[event("marker", "s")]
        )
        assert marker.status_code == 200
        dlq_marker = client.post(
            f"{server.webhook}?{signed_query(nonce='fuzz-dlq-marker')}", content=b"dlq-marker"
        )
        assert dlq_marker.status_code == 400

    assert sum(1 for signed, _ in results if not signed) > 50
    assert sum(1 for signed, status in results if signed and status == 200) > 20
    raw = await consume(gateway, gateway.topic_raw, lambda rs: any(v["userid"] == "marker" for _, v, _ in rs))
    assert not [v for _, v, _ in raw if v["userid"].startswith("unsigned-")]
    dlq = await consume(
        gateway, gateway.topic_dlq, lambda rs: any(v["raw"] == "dlq-marker" for _, v, _ in rs)
    )
    assert not [v for _, v, _ in dlq if "unsigned-" in v["raw"]]
