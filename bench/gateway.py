"""Gateway ingest: requests/s and events/s accepted by one gateway process, and latency at offered rates.

Baselines in the same run: the same FastAPI/uvicorn stack answering 200 without Kafka (framework ceiling) and a
bare aiokafka producer with the gateway's producer settings (Kafka ceiling). Load comes from wrk replaying
pre-signed requests (bench/wrk/signed.lua); wrk's own CPU is reported so a saturated generator would show.
"""

from __future__ import annotations

import asyncio
import json
import math
import resource
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    REPO_ROOT,
    CpuMeter,
    Service,
    Workspace,
    python_module,
    ratio,
    say,
    table,
    workspace,
    write_results,
)
from bench.plot import line_chart
from bench.traffic import APP_KEY, APP_SECRET, request_pool
from core.settings import CommonSettings
from core.topics import ensure_topics
from presence.children import wait_until
from presence.localkafka import free_port

LUA = Path(__file__).resolve().parent / "wrk" / "signed.lua"
TOPIC_RAW = "bench.gateway.raw"
TOPIC_DLQ = "bench.gateway.dlq"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wrk(url: str, pool_file: Path, seconds: float, connections: int, delay_ms: int = 0) -> dict[str, Any]:
    """One wrk run; returns its JSON summary plus the CPU wrk itself used."""
    binary = shutil.which("wrk")
    if binary is None:
        raise RuntimeError("wrk not found: apt-get install wrk")
    env = {"BENCH_POOL": str(pool_file), "BENCH_DELAY_MS": str(delay_ms), "PATH": "/usr/bin:/bin"}
    before = _children_cpu()
    result = subprocess.run(  # noqa: S603
        [binary, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(LUA), url],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    cpu = _children_cpu() - before
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("{")), None)
    if result.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    summary: dict[str, Any] = json.loads(line)
    summary["wrk_cpu_seconds"] = round(cpu, 2)
    seconds_run = summary["duration_us"] / 1e6
    summary["requests_per_second"] = summary["requests"] / seconds_run if seconds_run else 0.0
    summary["non_2xx_or_errors"] = sum(summary["errors"].values())
    return summary


def write_pool(path: Path, count: int, events: int) -> Path:
    with path.open("wb") as handle:
        for target, body in request_pool(count, events, seed=events):
            handle.write(target.encode() + b"\t" + body + b"\n")
    return path


def _server_env(ws: Workspace, port: int) -> dict[str, str]:
    return {
        "PRESENCE_ENV": "test",
        "PRESENCE_KAFKA_BOOTSTRAP_SERVERS": ws.bootstrap,
        "PRESENCE_APP_KEY": APP_KEY,
        "PRESENCE_APP_SECRET": APP_SECRET,
        "PRESENCE_GATEWAY_HOST": "127.0.0.1",
        "PRESENCE_GATEWAY_PORT": str(port),
        "PRESENCE_GATEWAY_SPOOL_DIR": str(ws.path(f"spool-{port}")),
        "PRESENCE_TOPIC_RAW": TOPIC_RAW,
        "PRESENCE_TOPIC_DLQ": TOPIC_DLQ,
        "PRESENCE_TOPIC_PARTITIONS": "12",
    }


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def kafka_ceiling(ws: Workspace, events: int, seconds: float, concurrency: int) -> dict[str, Any]:
    meter = CpuMeter({"broker": ws.broker_pid})
    meter.start()
    out = subprocess.run(  # noqa: S603
        python_module("bench.kafka_ceiling", "--bootstrap", ws.bootstrap, "--topic", TOPIC_RAW,
                      "--events", str(events), "--concurrency", str(concurrency), "--seconds", str(seconds)),
        capture_output=True, text=True, check=True, cwd=REPO_ROOT,
    )  # fmt: skip
    meter.stop()
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "events_per_request": events,
        "requests_per_second": result["batches"] / result["seconds"],
        "events_per_second": result["events"] / result["seconds"],
        "latency_ms": result["latency_ms"],
        "cpu_cores": {
            "producer": round(result["cpu_seconds"] / result["seconds"], 2),
            "broker": meter.cores()["broker"],
        },  # fmt: skip
    }


def _start_server(ws: Workspace, kind: str) -> tuple[Service, str]:
    port = free_port()
    command = python_module("presence.cli", "gateway") if kind == "gateway" else python_module(
        "bench.ceiling_app", str(port))  # fmt: skip
    service = Service(kind, command, _server_env(ws, port), ws.root).start()
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: service.check() or _healthy(url), 60, f"{kind} to answer /healthz")
    return service, url


def _measured(ws: Workspace, service: Service, url: str, pool: Path, seconds: float, connections: int,
              delay_ms: int = 0) -> tuple[dict[str, Any], dict[str, float]]:  # fmt: skip
    meter = CpuMeter({"server": service.pid, "broker": ws.broker_pid})
    meter.start()
    result = wrk(url, pool, seconds, connections, delay_ms)
    meter.stop()
    return result, {**meter.cores(), "wrk": round(result["wrk_cpu_seconds"] / meter.wall, 2)}


def measure_servers(
    ws: Workspace, sizes: list[int], seconds: float, fractions: list[float], connections: int, pool_size: int
) -> dict[str, list[dict[str, Any]]]:
    """Max rate, then latency at fractions of it, for the gateway and the framework ceiling, interleaved.

    Both servers run side by side (the idle one costs nothing) and each step measures one then the other, so
    drift in the machine's background load falls on both alike.
    """
    servers = {kind: _start_server(ws, kind) for kind in ("framework", "gateway")}
    rows: dict[str, list[dict[str, Any]]] = {kind: [] for kind in servers}
    try:
        for events in sizes:
            pool = write_pool(
                ws.root / f"pool-{events}.tsv", max(50, pool_size * 10 // max(10, events)), events
            )
            current: dict[str, dict[str, Any]] = {}
            for kind, (service, url) in servers.items():
                wrk(url, pool, 1, connections)  # warm-up: connections, caches, producer metadata
                top, cores = _measured(ws, service, url, pool, seconds, connections)
                current[kind] = {
                    "system": kind,
                    "events_per_request": events,
                    "max": {
                        "requests_per_second": top["requests_per_second"],
                        "events_per_second": top["requests_per_second"] * events,
                        "latency_ms": {k: v / 1000 for k, v in top["latency_us"].items()},
                        "errors": top["non_2xx_or_errors"],
                        "connections": connections,
                        "cpu_cores": cores,
                    },
                    "at_rate": [],
                }
                say(f"{kind} {events} ev/req: {top['requests_per_second']:,.0f} req/s max")
            for fraction in fractions:
                for kind, (service, url) in servers.items():
                    offered = current[kind]["max"]["requests_per_second"] * fraction
                    conns = max(2, min(64, round(offered / 50)))
                    delay_ms = max(1, round(conns * 1000 / offered))
                    paced, cores = _measured(ws, service, url, pool, seconds, conns, delay_ms)
                    current[kind]["at_rate"].append({
                        "fraction_of_max": fraction,
                        "offered_requests_per_second": conns * 1000 / delay_ms,
                        "achieved_requests_per_second": paced["requests_per_second"],
                        "connections": conns,
                        "latency_ms": {k: v / 1000 for k, v in paced["latency_us"].items()},
                        "errors": paced["non_2xx_or_errors"],
                        "cpu_cores": cores,
                    })  # fmt: skip
            for kind in servers:
                rows[kind].append(current[kind])
    finally:
        for service, _url in servers.values():
            service.stop()
    return rows


def run(smoke: bool = False, out_dir: Path | None = None) -> dict[str, Any]:
    seconds = 1.0 if smoke else 10.0
    sizes = [10] if smoke else [1, 10, 100]
    fractions = [0.5] if smoke else [0.25, 0.5, 0.75]
    connections = 8 if smoke else 32
    pool_size = 200 if smoke else 4000
    with workspace("gateway", heap="1g") as ws:
        settings = CommonSettings(env="test", kafka_bootstrap_servers=ws.bootstrap, topic_raw=TOPIC_RAW,
                                  topic_dlq=TOPIC_DLQ, topic_partitions=12)  # fmt: skip
        asyncio.run(ensure_topics(settings))
        measured = measure_servers(ws, sizes, seconds, fractions, connections, pool_size)
        framework, gateway = measured["framework"], measured["gateway"]
        kafka = [kafka_ceiling(ws, events, seconds, connections) for events in sizes]

    summary = []
    for fw, gw, kc in zip(framework, gateway, kafka, strict=True):
        half = next((r for r in gw["at_rate"] if r["fraction_of_max"] == 0.5), None)
        summary.append({
            "events_per_request": gw["events_per_request"],
            "gateway_requests_per_second": gw["max"]["requests_per_second"],
            "gateway_events_per_second": gw["max"]["events_per_second"],
            "framework_requests_per_second": fw["max"]["requests_per_second"],
            "kafka_events_per_second": kc["events_per_second"],
            "ratio_to_framework": ratio(gw["max"]["requests_per_second"], fw["max"]["requests_per_second"]),
            "ratio_to_kafka": ratio(gw["max"]["events_per_second"], kc["events_per_second"]),
            "gateway_p99_ms_at_half_max": half["latency_ms"]["p99"] if half else math.nan,
        })  # fmt: skip
    ten = next((s for s in summary if s["events_per_request"] == 10), None)
    targets = {}
    if ten is not None:
        targets = {
            "ratio_to_framework_at_10_events": {"target": ">= 0.6", "value": ten["ratio_to_framework"],
                                                "met": ten["ratio_to_framework"] >= 0.6},
            "p99_ms_at_half_max": {"target": "<= 25", "value": ten["gateway_p99_ms_at_half_max"],
                                   "met": ten["gateway_p99_ms_at_half_max"] <= 25},
        }  # fmt: skip
    payload = {"settings": {"seconds_per_run": seconds, "connections": connections, "sizes": sizes,
                            "fractions": fractions},
               "summary": summary, "targets": targets, "framework": framework, "gateway": gateway,
               "kafka": kafka}  # fmt: skip
    path = write_results("gateway", smoke, payload, out_dir)
    series = []
    for row in [*gateway, *framework]:
        points = [
            (r["achieved_requests_per_second"] * row["events_per_request"], r["latency_ms"]["p99"])
            for r in row["at_rate"]
        ]
        top = row["max"]
        points.append((top["events_per_second"], top["latency_ms"]["p99"]))
        series.append((f"{row['system']} {row['events_per_request']} ev/req", points))
    line_chart(
        path.with_suffix(".svg"),
        "Gateway vs framework ceiling: p99 latency against accepted events/s",
        "events/s",
        "p99 ms (log)",
        series,
    )
    print(render(payload))
    say(f"results in {path}")
    return payload


def render(payload: dict[str, Any]) -> str:
    parts = [table(
        "Gateway ingest, max rate (one process; 200 only after Kafka acked every event)",
        ["events/req", "gateway req/s", "gateway ev/s", "framework req/s", "× framework", "Kafka ceiling ev/s",
         "× Kafka"],
        [[s["events_per_request"], s["gateway_requests_per_second"], s["gateway_events_per_second"],
          s["framework_requests_per_second"], s["ratio_to_framework"], s["kafka_events_per_second"],
          s["ratio_to_kafka"]] for s in payload["summary"]],
    )]  # fmt: skip
    rows = []
    for row in [*payload["gateway"], *payload["framework"]]:
        top = row["max"]
        rows.append([row["system"], row["events_per_request"], "max", top["requests_per_second"],
                     top["latency_ms"]["p50"], top["latency_ms"]["p99"], top["latency_ms"]["p999"], top["errors"],
                     top["cpu_cores"]["server"], top["cpu_cores"]["broker"], top["cpu_cores"]["wrk"]])  # fmt: skip
        for r in row["at_rate"]:
            rows.append([row["system"], row["events_per_request"], f"{r['fraction_of_max']:.0%}",
                         r["achieved_requests_per_second"], r["latency_ms"]["p50"], r["latency_ms"]["p99"],
                         r["latency_ms"]["p999"], r["errors"], r["cpu_cores"]["server"], r["cpu_cores"]["broker"],
                         r["cpu_cores"]["wrk"]])  # fmt: skip
    parts.append(table("Latency at offered rates (wrk, paced connections)",
                       ["system", "events/req", "rate", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "errors",
                        "server cores", "broker cores", "wrk cores"], rows))  # fmt: skip
    parts.append(table("Kafka ceiling (bare aiokafka producer, gateway settings)",
                       ["events/batch", "batches/s", "events/s", "p50 ms", "p99 ms", "producer cores",
                        "broker cores"],
                       [[k["events_per_request"], k["requests_per_second"], k["events_per_second"],
                         k["latency_ms"]["p50"], k["latency_ms"]["p99"], k["cpu_cores"]["producer"],
                         k["cpu_cores"]["broker"]] for k in payload["kafka"]]))  # fmt: skip
    if payload["targets"]:
        parts.append(
            table(
                "Targets",
                ["target", "wanted", "value", "met"],
                [[name, t["target"], t["value"], t["met"]] for name, t in payload["targets"].items()],
            )
        )
    return "\n".join(parts)
