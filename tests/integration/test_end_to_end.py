"""End to end: signed webhooks into the real gateway → real Kafka → a real worker → transitions, state, queries.

Each user below plays one upstream situation; the expected transitions are written out by hand from the rules
(S1–S7), not computed by the code under test.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from core.topics import ensure_topics
from gateway.config import GatewaySettings
from presence.children import wait_until
from streams.config import WorkerSettings
from streams.main import worker_topics

from .gateway.conftest import APP_KEY, SECRET, GatewayServer, signed_query
from .streams.harness import WorkerProcess, read_topic, validator, worker_env

T = (time.time_ns() // 1_000_000) - 120_000


def ev(userid: str, session: str, status: str, at: int, os_name: str = "iOS") -> dict[str, Any]:
    return {"userid": userid, "status": status, "os": os_name, "time": at, "clientIp": "10.9.8.7:4000",
            "sessionId": session}  # fmt: skip


# Requests in the order upstream sends them; a tuple marks the same body sent again (upstream retry).
REQUESTS: list[list[dict[str, Any]] | tuple[list[dict[str, Any]], str]] = [
    # multi-device: two devices, the user stays online until the last one leaves
    [ev("alice", "a-ios", "0", T, "iOS"), ev("alice", "a-and", "0", T + 10, "Android")],
    [ev("alice", "a-ios", "1", T + 20, "iOS")],
    [ev("alice", "a-and", "1", T + 30, "Android")],
    # kick: a second PC login kicks the first, reported as an offline of the first session
    [
        ev("bob", "b-pc1", "0", T, "PC"),
        ev("bob", "b-pc2", "0", T + 5, "PC"),
        ev("bob", "b-pc1", "1", T + 6, "PC"),
    ],
    # logout
    [ev("carol", "c-1", "0", T, "Android")],
    [ev("carol", "c-1", "2", T + 10, "Android")],
    # delayed offline: the old session's offline arrives after the new session's online
    [ev("dave", "d-1", "0", T, "Websocket")],
    [ev("dave", "d-2", "0", T + 20, "MiniProgram")],
    [ev("dave", "d-1", "1", T + 10, "Websocket")],
    # retried duplicate: the same signed request delivered twice
    ([ev("erin", "e-1", "0", T, "iOS")], "retry"),
    # reordering inside a batch: the offline comes first, the older online is then stale (S2, S4)
    [ev("frank", "f-1", "1", T + 10, "PC"), ev("frank", "f-1", "0", T, "PC")],
    # reordering across requests: a logout for a session never seen, then its older online
    [ev("gina", "g-1", "2", T + 10, "iOS")],
    [ev("gina", "g-1", "0", T, "iOS")],
]

# (from, to, at, cause sessionId, cause event, platforms, online_sessions), in seq order per user.
EXPECTED: dict[str, list[tuple[str, str, int, str, str, list[str], int]]] = {
    "alice": [
        ("offline", "online", T, "a-ios", "online", ["iOS"], 1),
        ("online", "offline", T + 30, "a-and", "offline", [], 0),
    ],
    "bob": [("offline", "online", T, "b-pc1", "online", ["PC"], 1)],
    "carol": [
        ("offline", "online", T, "c-1", "online", ["Android"], 1),
        ("online", "logged_out", T + 10, "c-1", "logout", [], 0),
    ],
    "dave": [("offline", "online", T, "d-1", "online", ["Websocket"], 1)],
    "erin": [("offline", "online", T, "e-1", "online", ["iOS"], 1)],
    "frank": [],
    "gina": [("offline", "logged_out", T + 10, "g-1", "logout", [], 0)],
}
FINAL = {"alice": "offline", "bob": "online", "carol": "logged_out", "dave": "online", "erin": "online",
         "frank": "offline", "gina": "logged_out"}  # fmt: skip


@pytest.fixture
def pipeline(
    settings_for: Callable[..., dict[str, Any]], unique: Callable[[str], str], tmp_path: Path
) -> Iterator[dict[str, Any]]:
    values = settings_for()
    app_id = unique("worker")
    worker_settings = WorkerSettings(**values, worker_app_id=app_id)
    asyncio.run(ensure_topics(worker_settings, extra=worker_topics(worker_settings)))
    gateway = GatewayServer(
        GatewaySettings(**values, app_key=APP_KEY, app_secret=SECRET, gateway_spool_dir=tmp_path / "spool")
    ).start()
    worker = WorkerProcess(
        env=worker_env(values, app_id), data_dir=tmp_path / "w", log_path=tmp_path / "w.log"
    )
    worker.start()
    try:
        worker.wait_ready()
        yield {"gateway": gateway, "worker": worker, "settings": worker_settings}
    finally:
        worker.stop()
        gateway.stop()


def test_signed_webhooks_become_user_level_transitions_state_and_answers(pipeline: dict[str, Any]) -> None:
    gateway: GatewayServer = pipeline["gateway"]
    worker: WorkerProcess = pipeline["worker"]
    settings: WorkerSettings = pipeline["settings"]

    with httpx.Client(timeout=10) as client:
        for number, request in enumerate(REQUESTS):
            body, retries = (request[0], 2) if isinstance(request, tuple) else (request, 1)
            query = signed_query(nonce=f"e2e-{number}")
            for _ in range(retries):
                response = client.post(f"{gateway.webhook}?{query}", content=orjson.dumps(body))
                assert response.status_code == 200, response.text
                assert response.json()["accepted"] == len(body)

    def transitions() -> dict[str, list[dict[str, Any]]]:
        by_user: dict[str, list[dict[str, Any]]] = {}
        for _, _, key, value in asyncio.run(
            read_topic(settings.kafka_bootstrap_servers, settings.topic_transitions)
        ):
            by_user.setdefault(key.decode(), []).append(orjson.loads(value))
        return by_user

    def state() -> dict[str, Any]:
        final: dict[str, Any] = {}
        for _, _, key, value in asyncio.run(
            read_topic(settings.kafka_bootstrap_servers, settings.topic_state)
        ):
            final[key.decode()] = orjson.loads(value) if value else None
        return final

    wanted = sum(len(v) for v in EXPECTED.values())
    wait_until(lambda: sum(map(len, transitions().values())) >= wanted, 60, f"{wanted} transitions")
    wait_until(lambda: set(state()) == set(EXPECTED), 60, "a STATE record for every user")

    actual = transitions()
    schema = validator("transitions.v1.schema.json")
    for userid, expected in EXPECTED.items():
        got = actual.get(userid, [])
        for payload in got:
            schema.validate(payload)
        summary = [
            (p["from"], p["to"], p["at"], p["cause"]["sessionId"], p["cause"]["event"], p["platforms"],
             p["online_sessions"])
            for p in got
        ]  # fmt: skip
        assert summary == expected, f"{userid}: {summary}"
        assert [p["seq"] for p in got] == list(range(1, len(got) + 1)), f"{userid}: seq must be 1, 2, …"
        # Pipeline latency is measurable from the payloads: the worker stamps emitted_at.
        assert all(p["emitted_at"] >= p["at"] for p in got)

    final = state()
    for userid, status in FINAL.items():
        assert final[userid]["status"] == status, userid
        answer = httpx.get(f"{worker.url}/presence/{userid}", timeout=5)
        assert answer.status_code == 200
        assert answer.json() == final[userid]
    # Who is online, and on which platforms, after everything settled.
    assert final["dave"]["platforms"] == ["MiniProgram"]
    assert [s["sessionId"] for s in final["bob"]["sessions"]] == ["b-pc2"]
    assert worker.metric("presence_worker_events_total", 'outcome="duplicate"') >= 1
    assert worker.metric("presence_worker_events_total", 'outcome="stale"') >= 2
    assert worker.metric("presence_worker_pipeline_latency_seconds_count") >= wanted
