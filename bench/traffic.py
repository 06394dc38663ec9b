"""Synthetic RongCloud traffic: RAW backlogs for the worker, signed webhook requests for the gateway."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import orjson

from core.contract import WEBHOOK_PATH, compute_signature

PLATFORMS = ("iOS", "Android", "PC", "Websocket", "MiniProgram")
APP_KEY = "bench-app-key"
APP_SECRET = "bench-app-secret-0123456789"  # noqa: S105 - a benchmark's throwaway credential


def raw_event(userid: str, session: str, status: int, at: int, os_name: str, delivery: str) -> dict[str, Any]:
    """A RAW record as the gateway publishes it (schemas/raw.v1.schema.json)."""
    return {
        "schema": 1,
        "userid": userid,
        "status": status,
        "time": at,
        "sessionId": session,
        "os": os_name,
        "clientIp": "203.0.113.7:52100",
        "received_at": at,
        "delivery_id": delivery,
    }


def backlog(users: int, events: int, seed: int = 7, start_ms: int = 1_750_000_000_000,
            span_ms: int = 8 * 60_000) -> Iterator[tuple[bytes, bytes]]:  # fmt: skip
    """At least ``events`` RAW records for ``users`` users, as (key, value), in publish order.

    The mix of a busy IM app: each user holds one to three devices; every session comes online and most end
    (offline 70 %, logout 30 %); one event in five is an upstream retry (a duplicate, S1), one end in ten arrives
    late after the user's newer traffic (stale or re-ordered, S2), and sessions are interleaved across users.
    Event time spans ``span_ms`` (8 minutes): less than the ended-session retention (15 minutes), so no system
    has retention sweeps to do and the work per event is the same for the worker and the baselines.
    """
    rng = random.Random(seed)
    produced = 0
    round_no = 0
    per_round = max(1.0, users * 2 * 1.9)  # sessions per user * events per session, roughly
    rounds = max(1, round(events / per_round))
    step = span_ms / (rounds * per_round)
    clock = float(start_ms)
    order = list(range(users))
    late: list[tuple[bytes, bytes]] = []
    while produced < events:
        rng.shuffle(order)
        for u in order:
            userid = f"user-{u:07d}"
            key = userid.encode()
            for d in range(rng.randint(1, 3)):
                clock += step
                at = int(clock)
                os_name = PLATFORMS[(u + d) % len(PLATFORMS)]
                session = f"{userid}-{round_no}-{d}"
                online = orjson.dumps(raw_event(userid, session, 0, at, os_name, f"b:{session}:0"))
                yield key, online
                produced += 1
                if rng.random() < 0.2:
                    yield key, online
                    produced += 1
                if rng.random() < 0.85:
                    status = 2 if rng.random() < 0.3 else 1
                    end = orjson.dumps(
                        raw_event(
                            userid, session, status, at + rng.randint(5, 5000), os_name, f"b:{session}:e"
                        )
                    )
                    if rng.random() < 0.1:
                        late.append((key, end))
                    else:
                        yield key, end
                        produced += 1
            if produced >= events:
                break
            if len(late) > 64:
                for item in late:
                    yield item
                    produced += 1
                late.clear()
        round_no += 1
    yield from late


# --- signed webhook requests -----------------------------------------------------------------------------------


def signed_path(nonce: str, timestamp_ms: int, path: str = WEBHOOK_PATH) -> str:
    ts = str(timestamp_ms)
    query = urlencode(
        {
            "appKey": APP_KEY,
            "nonce": nonce,
            "timestamp": ts,
            "signature": compute_signature(APP_SECRET, nonce, ts),
        }
    )
    return f"{path}?{query}"


def webhook_event(userid: str, session: str, status: int, at: int, os_name: str) -> dict[str, Any]:
    """One element of a webhook body as RongCloud sends it (status as a string)."""
    return {
        "userid": userid,
        "status": str(status),
        "os": os_name,
        "time": at,
        "clientIp": "203.0.113.7:52100",
        "sessionId": session,
    }


def request_pool(count: int, events_per_request: int, seed: int = 11) -> list[tuple[str, bytes]]:
    """``count`` distinct signed requests (path with query, body) carrying a realistic mix of events."""
    rng = random.Random(seed)
    now = time.time_ns() // 1_000_000
    pool: list[tuple[str, bytes]] = []
    for i in range(count):
        events = []
        for j in range(events_per_request):
            u = rng.randrange(1_000_000)
            userid = f"user-{u:07d}"
            status = rng.choice((0, 0, 1, 2))
            events.append(webhook_event(userid, f"{userid}-{i}-{j}", status, now - rng.randint(0, 60_000),
                                        PLATFORMS[u % 5]))  # fmt: skip
        pool.append((signed_path(f"n{seed}-{i}", now), orjson.dumps(events)))
    return pool
