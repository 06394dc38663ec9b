"""Recovery: restart of a worker whose table holds N users (1M in the full run), warm and from a wiped state dir.

The table is filled by producing N realistic records (each user with two online sessions, as the processor
encodes them) straight onto the users table's changelog, as a worker that processed their events would have
left it. Then, in one run:

* **empty**: a worker with nothing to restore (the fixed cost of starting a worker), for reference;
* **cold**: a worker with a wiped state dir restores the table from the changelog (restore rate, records/s);
* **warm**: the same worker stopped (SIGTERM) and started again on its local RocksDB state.

"Ready" is ``/readyz`` answering 200; "serving" is a new event on every partition having produced its
transition on TRANSITIONS (which includes rebuilding the per-partition sweep index from the table).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
from confluent_kafka import Consumer, TopicPartition

from bench.common import (
    Service,
    Workspace,
    cpu_seconds,
    dir_bytes,
    rss_bytes,
    say,
    table,
    workspace,
)
from bench.common import write_results as _write
from bench.kafka_tools import produce, produce_to
from bench.traffic import raw_event
from bench.worker import PARTITIONS, _settings, faust_worker
from core.contract import Event, changelog_topic, partition_of
from core.topics import ensure_topics
from presence.children import wait_until
from streams.config import WorkerSettings
from streams.main import worker_topics
from streams.processor import encode_record
from streams.rules import PresenceConfig, apply

START_MS = 1_750_000_000_000
_TEMPLATE = "user-XXXXXXXXX"


def userid(n: int) -> str:
    return f"user-{n:09d}"


def template_record() -> bytes:
    """An encoded record of a user with two online sessions (after two events), userid as a placeholder."""
    config = PresenceConfig()
    record = None
    for index, os_name in enumerate(("iOS", "PC")):
        event = Event(_TEMPLATE, f"{_TEMPLATE}-s{index}", "online", START_MS + index, os_name, "203.0.113.7:52100",
                      START_MS + index, f"0@{index}")  # fmt: skip
        record, _result = apply(record, event, START_MS, config)
    assert record is not None
    return encode_record(record, applied_offset=1, stream_time=START_MS + 1)


def table_records(users: int) -> Any:
    template = template_record()
    placeholder = _TEMPLATE.encode()
    for n in range(users):
        key = userid(n).encode()
        yield partition_of(key, PARTITIONS), key, template.replace(placeholder, key)


@dataclass
class Probe:
    """New users, one per partition, whose first online must come out as a transition."""

    ws: Workspace
    transitions: str
    raw: str
    round_no: int = 0

    def users(self) -> dict[int, str]:
        found: dict[int, str] = {}
        n = 0
        while len(found) < PARTITIONS:
            candidate = f"probe-{self.round_no}-{n}"
            found.setdefault(partition_of(candidate.encode(), PARTITIONS), candidate)
            n += 1
        return found

    def send_and_wait(self, timeout: float) -> float:
        """Send one online per partition; return the monotonic time all their transitions were on TRANSITIONS."""
        self.round_no += 1
        users = set(self.users().values())
        consumer = Consumer({"bootstrap.servers": self.ws.bootstrap, "group.id": f"probe-{time.time_ns()}",
                             "enable.auto.commit": False})  # fmt: skip
        tps = [TopicPartition(self.transitions, p) for p in range(PARTITIONS)]
        ends = [consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in tps]
        consumer.assign([TopicPartition(self.transitions, p, end) for p, end in enumerate(ends)])
        now = time.time_ns() // 1_000_000
        produce(self.ws.bootstrap, self.raw, [
            (u.encode(), orjson.dumps(raw_event(u, f"{u}-s", 0, now, "iOS", f"probe:{u}"))) for u in users
        ])  # fmt: skip
        deadline = time.monotonic() + timeout
        try:
            while users:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no transition for {len(users)} probe users within {timeout:.0f} s")
                message = consumer.poll(0.05)
                if message is None or message.error():
                    continue
                users.discard(orjson.loads(message.value())["userid"])
            return time.monotonic()
        finally:
            consumer.close()


def ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def start_and_time(ws: Workspace, service: Service, probe: Probe, timeout: float) -> dict[str, Any]:
    """Start the worker; seconds to /readyz, to serving (probe transitions), CPU, RSS, a restored user's record."""
    port: int = service.web_port  # type: ignore[attr-defined]
    service.start()
    wait_until(lambda: service.check() or ready(port), timeout, f"{service.name} to be ready", interval=0.05)
    ready_at = time.monotonic()
    served_at = probe.send_and_wait(timeout)
    record = httpx.get(f"http://127.0.0.1:{port}/presence/{userid(0)}", timeout=5)
    return {
        "ready_seconds": round(ready_at - service.started_at, 2),
        "serving_seconds": round(served_at - service.started_at, 2),
        "cpu_seconds": round(cpu_seconds(service.pid), 2),
        "rss_mib": round(rss_bytes(service.pid) / 2**20, 1),
        "restored_user_status": record.status_code,
    }


def prepare(ws: Workspace, users: int, app_id: str) -> tuple[WorkerSettings, dict[str, Any]]:
    """Topics for ``app_id`` and its users table's changelog holding ``users`` records."""
    settings = WorkerSettings(**_settings(ws, "recovery", worker_app_id=app_id))
    asyncio.run(ensure_topics(settings, extra=worker_topics(settings)))
    started = time.monotonic()
    count = produce_to(ws.bootstrap, changelog_topic(app_id), table_records(users))
    seconds = time.monotonic() - started
    say(f"{count:,} table records on the changelog in {seconds:.1f} s")
    return settings, {
        "records": count,
        "produce_seconds": round(seconds, 1),
        "changelog_bytes_on_broker": _topic_bytes(ws, changelog_topic(app_id)),
    }


def _topic_bytes(ws: Workspace, topic: str) -> int:
    return sum(dir_bytes(path) for path in (ws.root / "kafka" / "data").glob(f"{topic}-*"))


def run(smoke: bool = False, out_dir: Path | None = None, users: int | None = None) -> dict[str, Any]:
    """``users``: another table size than the smoke or full one (a manual run, e.g. on a busy machine)."""
    users = users or (20_000 if smoke else 1_000_000)
    timeout = 120 if smoke and users <= 20_000 else 900
    with workspace("recovery", heap="2g") as ws:
        _settings_, dataset = prepare(ws, users, "bench-recovery")
        probe = Probe(ws, "bench.recovery.transitions", "bench.worker.raw")
        empty_settings = WorkerSettings(**_settings(ws, "recovery", worker_app_id="bench-empty"))
        asyncio.run(ensure_topics(empty_settings, extra=worker_topics(empty_settings)))
        say("empty worker (nothing to restore)")
        empty = faust_worker(ws, ws.path("state-empty"), app_id="bench-empty", system="recovery")
        try:
            results = {"empty": start_and_time(ws, empty, probe, timeout)}
        finally:
            empty.stop()
        data_dir = ws.path("state")
        worker = faust_worker(ws, data_dir, app_id="bench-recovery", system="recovery")
        say(f"cold start: restoring {users:,} users from the changelog")
        try:
            results["cold"] = start_and_time(ws, worker, probe, timeout)
        finally:
            worker.stop()
        results["cold"]["state_dir_bytes"] = dir_bytes(data_dir)
        say("warm restart on the local RocksDB state")
        try:
            results["warm"] = start_and_time(ws, worker, probe, timeout)
        finally:
            worker.stop()
    restore = results["cold"]["ready_seconds"] - results["empty"]["ready_seconds"]
    rates = {
        "restore_records_per_second": users / restore if restore > 0 else float("nan"),
        "restore_seconds_beyond_empty_start": round(restore, 2),
    }
    targets = {"warm_ready_seconds": {"target": "<= 10", "value": results["warm"]["ready_seconds"],
                                      "met": results["warm"]["ready_seconds"] <= 10},
               "warm_serving_seconds": {"target": "<= 10", "value": results["warm"]["serving_seconds"],
                                        "met": results["warm"]["serving_seconds"] <= 10}}  # fmt: skip
    payload = {"settings": {"users": users, "sessions_per_user": 2, "partitions": PARTITIONS},
               "dataset": dataset, "starts": results, "restore": rates, "targets": targets}  # fmt: skip
    path = _write("recovery", smoke, payload, out_dir)
    print(render(payload))
    say(f"results in {path}")
    return payload


def render(payload: dict[str, Any]) -> str:
    starts = payload["starts"]
    rows = [[name, s["ready_seconds"], s["serving_seconds"], s["cpu_seconds"], s["rss_mib"]]
            for name, s in starts.items()]  # fmt: skip
    parts = [table(f"Recovery of a worker holding {payload['settings']['users']:,} users",
                   ["start", "ready s", "serving s", "CPU s", "RSS MiB"], rows)]  # fmt: skip
    parts.append(table("Changelog restore (cold start minus an empty worker's start)",
                       ["records", "restore s", "records/s"],
                       [[payload["settings"]["users"], payload["restore"]["restore_seconds_beyond_empty_start"],
                         payload["restore"]["restore_records_per_second"]]]))  # fmt: skip
    parts.append(
        table(
            "Targets",
            ["target", "wanted", "value", "met"],
            [[n, t["target"], t["value"], t["met"]] for n, t in payload["targets"].items()],
        )
    )
    return "\n".join(parts)
