"""Helpers for worker integration tests: real worker processes, RAW producers, topic readers, the model run."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from jsonschema import Draft202012Validator

from presence.children import wait_until
from presence.localkafka import free_port
from streams.processor import Outgoing, Processor
from streams.rules import PresenceConfig
from tests.schemas import writer_validator


def validator(name: str) -> Draft202012Validator:
    """The closed (writer) form: the worker publishes nothing the schema does not declare."""
    return writer_validator(name)


@dataclass
class WorkerProcess:
    """One ``presence worker`` process with its own data dir and web port."""

    env: dict[str, str]
    data_dir: Path
    log_path: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {
            **os.environ,
            **self.env,
            "PRESENCE_WORKER_DATA_DIR": str(self.data_dir),
            "PRESENCE_WORKER_WEB_PORT": str(self.port),
            "PRESENCE_WORKER_WEB_BIND": "127.0.0.1",
        }
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "presence.cli", "worker"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()

    def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"worker exited with {self.process.returncode}; log:\n{self.log_tail()}")
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 90) -> None:
        wait_until(self.ready, timeout, f"worker on port {self.port} to be ready")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self, timeout: float = 30) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def metric(self, name: str, labels: str = "") -> float:
        """Sum of a metric's samples whose label text contains ``labels``."""
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and (line[len(name)] in " {") and labels in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def worker_env(settings: dict[str, Any], app_id: str, **extra: str) -> dict[str, str]:
    env = {f"PRESENCE_{key.upper()}": str(value) for key, value in settings.items()}
    env.update(
        {
            "PRESENCE_WORKER_APP_ID": app_id,
            # Short timeouts so a killed worker's partitions move on quickly (Faust's default is 60 s).
            "PRESENCE_WORKER_SESSION_TIMEOUT_SECONDS": "6",
            "PRESENCE_WORKER_HEARTBEAT_INTERVAL_SECONDS": "1",
            "PRESENCE_WORKER_COMMIT_INTERVAL_SECONDS": "0.5",
            "PRESENCE_LOG_LEVEL": "INFO",
        }
    )
    env.update(extra)
    return env


# --- traffic ------------------------------------------------------------------------------------------------


def raw_event(
    userid: str, session: str, status: int, at: int, os_name: str = "iOS", received_at: int | None = None
) -> dict[str, Any]:
    return {
        "schema": 1,
        "userid": userid,
        "status": status,
        "time": at,
        "sessionId": session,
        "os": os_name,
        "clientIp": "10.0.0.1:5000",
        "received_at": received_at if received_at is not None else at,
        "delivery_id": f"test:{userid}:{session}:{status}:{at}",
    }


def scenario(users: int, rounds: int, seed: int, start_ms: int) -> list[dict[str, Any]]:
    """Realistic noisy traffic: several devices per user, reconnects, kicks, logouts, late offlines, retries."""
    rng = random.Random(seed)
    platforms = ("iOS", "Android", "PC", "Websocket", "MiniProgram")
    events: list[dict[str, Any]] = []
    clock = start_ms
    for round_no in range(rounds):
        for u in range(users):
            userid = f"user-{u}"
            devices = rng.randint(1, 3)
            for d in range(devices):
                clock += rng.randint(1, 20)
                session = f"{userid}-r{round_no}-d{d}"
                os_name = platforms[(u + d) % len(platforms)]
                online = raw_event(userid, session, 0, clock, os_name)
                events.append(online)
                if rng.random() < 0.2:
                    events.append(dict(online))  # upstream retry of the same event
                end_at = clock + rng.randint(5, 500)
                end = raw_event(userid, session, 2 if rng.random() < 0.3 else 1, end_at, os_name)
                if rng.random() < 0.7:
                    if rng.random() < 0.15:
                        # Delivered late, after later traffic of the user (the 5-minute-late offline).
                        events.insert(len(events) - rng.randint(0, min(5, len(events))), end)
                    else:
                        events.append(end)
    return events


async def produce_raw(bootstrap: str, topic: str, events: Iterable[dict[str, Any]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    await producer.start()
    try:
        futures = [
            await producer.send(topic, key=e["userid"].encode(), value=orjson.dumps(e)) for e in events
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def read_topic(
    bootstrap: str, topic: str, timeout: float = 5.0
) -> list[tuple[int, int, bytes, bytes | None]]:
    """Everything on ``topic`` now: (partition, offset, key, value), in partition/offset order."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                isolation_level="read_committed")  # fmt: skip
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in (consumer.partitions_for_topic(topic) or set())]
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = [TopicPartition(topic, p) for p in (consumer.partitions_for_topic(topic) or set())]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        out: list[tuple[int, int, bytes, bytes | None]] = []
        remaining = {tp for tp in partitions if ends[tp] > 0}
        async with asyncio.timeout(timeout + 30):
            while remaining:
                batch = await consumer.getmany(timeout_ms=500)
                for tp, records in batch.items():
                    out.extend((tp.partition, r.offset, r.key, r.value) for r in records)
                    if records and records[-1].offset + 1 >= ends[tp]:
                        remaining.discard(tp)
                for tp in list(remaining):
                    if await consumer.position(tp) >= ends[tp]:
                        remaining.discard(tp)
        return sorted(out, key=lambda item: (item[0], item[1]))
    finally:
        await consumer.stop()


def model_run(
    raw: list[tuple[int, int, bytes, bytes | None]], config: PresenceConfig | None = None
) -> dict[str, Any]:
    """The uninterrupted run: the same processor over RAW in partition order, with plain dicts."""
    table: dict[str, Any] = {}
    by_partition: dict[int, set[str]] = defaultdict(set)

    def records_of_partition(partition: int) -> list[tuple[str, bytes]]:
        return [(key, table[key]) for key in by_partition[partition] if key in table]

    processor = Processor(table, config or PresenceConfig(), records_of_partition)
    transitions: dict[str, list[dict[str, Any]]] = defaultdict(list)
    state: dict[str, dict[str, Any] | None] = {}

    def collect(outgoing: list[Outgoing]) -> None:
        for out in outgoing:
            if out.topic == "transitions":
                assert out.value is not None
                payload = orjson.loads(out.value)
                transitions[payload["userid"]].append(payload)
            elif out.topic == "state":
                state[out.key.decode() if out.key else ""] = orjson.loads(out.value) if out.value else None

    for partition, offset, key, value in raw:
        collect(processor.on_raw(partition, offset, key, value, now_ms=0))
        if key is not None:
            by_partition[partition].add(key.decode())
    return {"transitions": transitions, "state": state}


def without_emitted_at(payload: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in payload.items() if k != "emitted_at"}


def check_s10(expected: dict[str, list[dict[str, Any]]], actual_raw: list[bytes]) -> dict[str, int]:
    """Compare TRANSITIONS with the uninterrupted run under S10; return counts (repeats)."""
    seen: dict[tuple[str, int, int], dict[str, Any]] = {}
    repeats = 0
    for value in actual_raw:
        payload = without_emitted_at(orjson.loads(value))
        key = (payload["userid"], payload["epoch"], payload["seq"])
        if key in seen:
            assert seen[key] == payload, f"a repeat of {key} differs:\n{seen[key]}\n{payload}"
            repeats += 1
        seen[key] = payload
    wanted = {
        (p["userid"], p["epoch"], p["seq"]): without_emitted_at(p) for ps in expected.values() for p in ps
    }
    missing = sorted(set(wanted) - set(seen))
    extra = sorted(set(seen) - set(wanted))
    if missing:
        userid = missing[0][0]
        have = sorted((k[1], k[2], v["from"], v["to"], v["at"]) for k, v in seen.items() if k[0] == userid)
        want = sorted((k[1], k[2], v["from"], v["to"], v["at"]) for k, v in wanted.items() if k[0] == userid)
        raise AssertionError(
            f"{len(missing)} transitions lost, e.g. {missing[:5]}\n{userid} expected {want}\n{userid} actual   {have}"
        )
    assert not extra, f"{len(extra)} transitions the uninterrupted run does not have, e.g. {extra[:5]}"
    for key, payload in wanted.items():
        assert seen[key] == payload, f"transition {key} differs:\nexpected {payload}\nactual   {seen[key]}"
    return {"transitions": len(wanted), "repeats": repeats}
