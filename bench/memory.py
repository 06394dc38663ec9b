"""Memory and disk: worker RSS and state size per million users (two sessions each).

A worker restores N users (see bench.recovery) and serves one event per partition, which builds the in-memory
sweep index of every partition; its RSS then, minus that of an empty worker measured the same way in the same
run, divided by N, is the cost per user. Disk is the worker's RocksDB state dir and the changelog on the broker.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from bench.common import dir_bytes, say, table, workspace, write_results
from bench.recovery import Probe, _topic_bytes, prepare, start_and_time
from bench.worker import _settings, faust_worker
from core.topics import ensure_topics
from streams.config import WorkerSettings
from streams.main import worker_topics

SESSIONS_PER_USER = 2


def run(smoke: bool = False, out_dir: Path | None = None) -> dict[str, Any]:
    users = 20_000 if smoke else 1_000_000
    timeout = 120 if smoke else 900
    with workspace("memory", heap="2g") as ws:
        prepare(ws, users, "bench-memory")
        empty_settings = WorkerSettings(**_settings(ws, "recovery", worker_app_id="bench-empty"))
        asyncio.run(ensure_topics(empty_settings, extra=worker_topics(empty_settings)))
        probe = Probe(ws, "bench.recovery.transitions", "bench.worker.raw")
        empty = faust_worker(ws, ws.path("state-empty"), app_id="bench-empty", system="recovery")
        try:
            base = start_and_time(ws, empty, probe, timeout)
        finally:
            empty.stop()
        data_dir = ws.path("state")
        worker = faust_worker(ws, data_dir, app_id="bench-memory", system="recovery")
        say(f"restoring {users:,} users and serving one event per partition")
        try:
            full = start_and_time(ws, worker, probe, timeout)
        finally:
            worker.stop()
        state_bytes = dir_bytes(data_dir)
        changelog_bytes = _topic_bytes(ws, "bench-memory-users-changelog")
    per_user = (full["rss_mib"] - base["rss_mib"]) * 2**20 / users
    result = {
        "rss_mib_empty": base["rss_mib"],
        "rss_mib_loaded": full["rss_mib"],
        "rss_mib_per_million_users": round(per_user * 1e6 / 2**20, 1),
        "rss_mib_per_million_sessions": round(per_user * 1e6 / SESSIONS_PER_USER / 2**20, 1),
        "state_dir_mib": round(state_bytes / 2**20, 1),
        "state_dir_mib_per_million_users": round(state_bytes / users * 1e6 / 2**20, 1),
        "changelog_mib": round(changelog_bytes / 2**20, 1),
        "changelog_mib_per_million_users": round(changelog_bytes / users * 1e6 / 2**20, 1),
    }
    payload = {"settings": {"users": users, "sessions_per_user": SESSIONS_PER_USER}, "memory": result}
    path = write_results("memory", smoke, payload, out_dir)
    print(render(payload))
    say(f"results in {path}")
    return payload


def render(payload: dict[str, Any]) -> str:
    m = payload["memory"]
    return table(
        f"Worker memory and disk ({payload['settings']['users']:,} users x {payload['settings']['sessions_per_user']}"
        " sessions)",
        ["RSS empty MiB", "RSS loaded MiB", "RSS MiB / 1M users", "RSS MiB / 1M sessions", "RocksDB MiB",
         "RocksDB MiB / 1M users", "changelog MiB / 1M users"],
        [[m["rss_mib_empty"], m["rss_mib_loaded"], m["rss_mib_per_million_users"], m["rss_mib_per_million_sessions"],
          m["state_dir_mib"], m["state_dir_mib_per_million_users"], m["changelog_mib_per_million_users"]]],
    )  # fmt: skip
