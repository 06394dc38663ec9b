"""Worker throughput: one worker process draining a RAW backlog, against a bare aiokafka loop and quixstreams.

The backlog (bench.traffic.backlog: >= 1M events of >= 100k users in the full run) is produced once; each system
then drains all of it with its own consumer group, output topics and state. Progress is read from each group's
committed offsets, so every system is measured the same way: events/s and events per CPU-second from its first
commit to the commit of the last event (startup is reported apart).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from bench.common import (
    Service,
    Workspace,
    python_module,
    ratio,
    rss_bytes,
    say,
    table,
    workspace,
    write_results,
)
from bench.kafka_tools import Offsets, produce
from bench.traffic import backlog
from core.settings import CommonSettings
from core.topics import TopicSpec, ensure_topics
from presence.localkafka import free_port
from streams.config import WorkerSettings
from streams.main import worker_topics

PARTITIONS = 12
RAW = "bench.worker.raw"


def _topics(system: str) -> dict[str, str]:
    return {
        "topic_raw": RAW,
        "topic_dlq": f"bench.{system}.dlq",
        "topic_transitions": f"bench.{system}.transitions",
        "topic_state": f"bench.{system}.state",
    }


def _settings(ws: Workspace, system: str, **extra: Any) -> dict[str, Any]:
    return {"env": "test", "kafka_bootstrap_servers": ws.bootstrap, "topic_partitions": PARTITIONS,
            **_topics(system), **extra}  # fmt: skip


def faust_worker(ws: Workspace, data_dir: Path, app_id: str = "bench-faust", system: str = "faust",
                 **extra_env: str) -> Service:  # fmt: skip
    values = _settings(
        ws,
        system,
        worker_app_id=app_id,
        worker_data_dir=data_dir,
        worker_web_port=free_port(),
        worker_web_bind="127.0.0.1",
        worker_commit_interval_seconds=1.0,
        log_level="WARNING",
    )
    env = {f"PRESENCE_{k.upper()}": str(v) for k, v in values.items()}
    env.update(extra_env)
    service = Service(system, python_module("presence.cli", "worker"), env, ws.root)
    service.web_port = int(values["worker_web_port"])  # type: ignore[attr-defined]
    return service


def drain(
    ws: Workspace, offsets: Offsets, service: Service, group: str, total: int, timeout: float
) -> dict[str, Any]:
    """Start ``service`` and sample its group's committed offsets until the whole backlog is committed."""
    service.start()
    samples: list[tuple[float, int, float, float]] = []
    peak_rss = 0
    deadline = time.monotonic() + timeout
    try:
        while True:
            service.check()
            done = offsets.committed(group, RAW, PARTITIONS)
            from bench.common import cpu_seconds

            samples.append((time.monotonic(), done, cpu_seconds(service.pid), cpu_seconds(ws.broker_pid)))
            peak_rss = max(peak_rss, rss_bytes(service.pid))
            if done >= total:
                break
            if time.monotonic() > deadline:
                # Out of time: the rate stands, measured over what was committed; the result says so.
                say(f"{service.name}: committed {done:,} of {total:,} within {timeout:.0f} s; measuring that")
                break
            time.sleep(0.25)
    finally:
        service.stop()
    first = next(s for s in samples if s[1] > 0)
    last = samples[-1]
    seconds = last[0] - first[0]
    events = last[1] - first[1]
    cpu = last[2] - first[2]
    return {
        "events": total,
        "drained_all": last[1] >= total,
        "measured_events": events,
        "seconds": round(seconds, 2),
        "startup_seconds": round(first[0] - service.started_at, 2),
        "events_per_second": events / seconds if seconds > 0 else float("nan"),
        "cpu_seconds": round(cpu, 2),
        "cpu_cores": round(cpu / seconds, 2) if seconds > 0 else float("nan"),
        "events_per_cpu_second": events / cpu if cpu > 0 else float("nan"),
        "broker_cpu_cores": round((last[3] - first[3]) / seconds, 2) if seconds > 0 else float("nan"),
        "peak_rss_mib": round(peak_rss / 2**20, 1),
    }


def run(smoke: bool = False, out_dir: Path | None = None) -> dict[str, Any]:
    users = 2_000 if smoke else 100_000
    events = 20_000 if smoke else 1_000_000
    timeout = 300.0 if smoke else float(os.environ.get("BENCH_WORKER_MAX_SECONDS", "1800"))
    results: dict[str, dict[str, Any]] = {}
    with workspace("worker", heap="2g") as ws:
        base = CommonSettings(**_settings(ws, "faust"))
        asyncio.run(ensure_topics(base))
        say(f"producing the backlog: {events:,}+ events of {users:,} users")
        started = time.monotonic()
        total = produce(ws.bootstrap, RAW, backlog(users, events))
        say(f"produced {total:,} events in {time.monotonic() - started:.1f} s")
        offsets = Offsets(ws.bootstrap)
        try:
            # Ours: the product's worker process, as deployed (RocksDB table, changelog, at-least-once).
            faust_settings = WorkerSettings(**_settings(ws, "faust", worker_app_id="bench-faust"))
            asyncio.run(ensure_topics(faust_settings, extra=worker_topics(faust_settings)))
            say("draining with the worker (Faust)")
            results["worker"] = drain(ws, offsets, faust_worker(ws, ws.path("faust-state")), "bench-faust",
                                      total, timeout)  # fmt: skip

            bare = CommonSettings(**_settings(ws, "bare"))
            changelog = "bench.bare.users-changelog"
            compact = {"cleanup.policy": "compact"}
            asyncio.run(
                ensure_topics(
                    bare,
                    extra=[
                        TopicSpec(changelog, PARTITIONS, 1, compact),
                    ],
                )
            )
            say("draining with the bare aiokafka loop")
            t = _topics("bare")
            command = python_module("bench.bare_loop", "--bootstrap", ws.bootstrap, "--group", "bench-bare",
                                    "--raw", RAW, "--transitions", t["topic_transitions"], "--state",
                                    t["topic_state"], "--changelog", changelog)  # fmt: skip
            results["bare_loop"] = drain(ws, offsets, Service("bare", command, {}, ws.root), "bench-bare", total,
                                         timeout)  # fmt: skip

            quix = CommonSettings(**_settings(ws, "quix"))
            asyncio.run(ensure_topics(quix))
            say("draining with quixstreams")
            t = _topics("quix")
            command = python_module("bench.quix_job", "--bootstrap", ws.bootstrap, "--group", "bench-quix",
                                    "--raw", RAW, "--transitions", t["topic_transitions"], "--state",
                                    t["topic_state"], "--state-dir", str(ws.path("quix-state")))  # fmt: skip
            results["quixstreams"] = drain(ws, offsets, Service("quix", command, {}, ws.root), "bench-quix", total,
                                           timeout)  # fmt: skip
            for system in ("faust", "bare", "quix"):
                name = {"faust": "worker", "bare": "bare_loop", "quix": "quixstreams"}[system]
                results[name]["transitions"] = offsets.end(f"bench.{system}.transitions", PARTITIONS)
                results[name]["state_updates"] = offsets.end(f"bench.{system}.state", PARTITIONS)
        finally:
            offsets.close()

    ours = results["worker"]
    ratios = {
        "worker_vs_bare_loop": ratio(ours["events_per_second"], results["bare_loop"]["events_per_second"]),
        "worker_vs_quixstreams": ratio(ours["events_per_second"], results["quixstreams"]["events_per_second"]),
        "worker_vs_bare_loop_per_cpu": ratio(ours["events_per_cpu_second"],
                                             results["bare_loop"]["events_per_cpu_second"]),
        "worker_vs_quixstreams_per_cpu": ratio(ours["events_per_cpu_second"],
                                               results["quixstreams"]["events_per_cpu_second"]),
    }  # fmt: skip
    targets = {
        "worker_vs_bare_loop": {"target": ">= 0.5", "value": ratios["worker_vs_bare_loop"],
                                "met": ratios["worker_vs_bare_loop"] >= 0.5},
        "worker_vs_quixstreams": {"target": "> 1", "value": ratios["worker_vs_quixstreams"],
                                  "met": ratios["worker_vs_quixstreams"] > 1},
    }  # fmt: skip
    payload = {"settings": {"users": users, "events": total, "partitions": PARTITIONS, "commit_interval_s": 1.0},
               "systems": results, "ratios": ratios, "targets": targets}  # fmt: skip
    path = write_results("worker", smoke, payload, out_dir)
    print(render(payload))
    say(f"results in {path}")
    return payload


def render(payload: dict[str, Any]) -> str:
    systems = payload["systems"]
    ours = systems["worker"]
    rows = [[name, s["events_per_second"], ratio(ours["events_per_second"], s["events_per_second"]),
             s["events_per_cpu_second"], s["cpu_cores"], s["broker_cpu_cores"], s["seconds"], s["startup_seconds"],
             s["peak_rss_mib"], s["transitions"], s["state_updates"]]
            for name, s in systems.items()]  # fmt: skip
    s = payload["settings"]
    parts = [table(
        f"Worker throughput: draining {s['events']:,} events of {s['users']:,} users ({s['partitions']} partitions)",
        ["system", "events/s", "worker ×", "events/CPU-s", "cores", "broker cores", "drain s", "startup s",
         "peak RSS MiB", "transitions", "STATE msgs"], rows)]  # fmt: skip
    parts.append(
        table(
            "Targets",
            ["target", "wanted", "value", "met"],
            [[name, t["target"], t["value"], t["met"]] for name, t in payload["targets"].items()],
        )
    )
    return "\n".join(parts)
