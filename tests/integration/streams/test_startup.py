"""Worker start-up against a real broker: waiting for Kafka with back-off and JSON log lines instead of a
crash loop, refusing a topic layout it cannot use, and static group membership (PRESENCE_WORKER_GROUP_INSTANCE_ID).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from core.settings import CommonSettings
from core.topics import ensure_topics
from presence.localkafka import free_port
from streams.config import WorkerSettings
from streams.main import worker_topics

from .harness import WorkerProcess, wait_until, worker_env


class Forwarder:
    """A TCP port that forwards to the broker once opened: Kafka "coming up" at the worker's bootstrap address.

    Only the bootstrap connection goes through it; the broker's metadata then names its own address.
    """

    def __init__(self, port: int, target: str) -> None:
        self.port = port
        self._host, target_port = target.rsplit(":", 1)
        self._target_port = int(target_port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def open(self) -> None:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._pipe, "127.0.0.1", self.port), self._loop
        ).result(10)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(self._host, self._target_port)

        async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except ConnectionError:
                pass
            finally:
                sink.close()

        await asyncio.gather(copy(reader, upstream_writer), copy(upstream_reader, writer))


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()


def _log_lines(worker: WorkerProcess) -> list[str]:
    return [line for line in worker.log_path.read_text(errors="replace").splitlines() if line.strip()]


def _retries(worker: WorkerProcess) -> list[dict[str, Any]]:
    lines = [orjson.loads(line) for line in _log_lines(worker) if line.startswith("{")]
    return [line for line in lines if line["msg"] == "kafka not reachable yet; retrying"]


def test_a_worker_started_before_kafka_waits_with_back_off_and_json_logs_then_runs(
    kafka_bootstrap: str,
    settings_for: Callable[..., dict[str, Any]],
    unique: Callable[[str], str],
    workers: list[WorkerProcess],
    tmp_path: Path,
) -> None:
    port = free_port()
    values = settings_for(kafka_bootstrap_servers=f"127.0.0.1:{port}")
    worker = WorkerProcess(worker_env(values, unique("worker")), tmp_path / "w", tmp_path / "w.log")
    workers.append(worker)
    worker.start()
    wait_until(lambda: len(_retries(worker)) >= 3, 60, "three retry log lines", interval=0.2)
    assert worker.process is not None and worker.process.poll() is None, "the worker must not exit meanwhile"
    # Every line so far is one JSON object (no bare traceback), and the waits grow.
    for line in _log_lines(worker):
        orjson.loads(line)
    waits = [line["retry_in_seconds"] for line in _retries(worker)]
    assert waits[:3] == [1.0, 2.0, 4.0]
    assert all(
        line["level"] == "warning" and line["kafka"] == f"127.0.0.1:{port}" for line in _retries(worker)
    )

    forwarder = Forwarder(port, kafka_bootstrap)
    forwarder.open()
    try:
        worker.wait_ready(timeout=90)
    finally:
        forwarder.close()
    assert "Traceback" not in worker.log_path.read_text(errors="replace")


def test_a_topic_layout_it_cannot_use_stops_the_worker_with_one_log_line(
    kafka_bootstrap: str,
    settings_for: Callable[..., dict[str, Any]],
    unique: Callable[[str], str],
    workers: list[WorkerProcess],
    tmp_path: Path,
) -> None:
    values = settings_for()

    async def create_raw_with_two_partitions() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(values["topic_raw"], 2, 1)])
        finally:
            await admin.close()

    asyncio.run(create_raw_with_two_partitions())
    worker = WorkerProcess(worker_env(values, unique("worker")), tmp_path / "w", tmp_path / "w.log")
    workers.append(worker)
    worker.start()
    assert worker.process is not None
    assert worker.process.wait(60) == 2
    (line,) = (orjson.loads(line) for line in _log_lines(worker))
    assert line["level"] == "error" and line["msg"] == "worker cannot start"
    assert "has 2 partitions but PRESENCE_TOPIC_PARTITIONS is 4" in line["error"]


def test_a_worker_that_may_not_create_topics_names_the_missing_ones_then_runs_once_they_exist(
    kafka_bootstrap: str,
    settings_for: Callable[..., dict[str, Any]],
    unique: Callable[[str], str],
    workers: list[WorkerProcess],
    tmp_path: Path,
) -> None:
    """PRESENCE_TOPIC_CREATE=false: the product's topics exist, the worker's own do not: it stops with one line
    naming them; after `presence create-topics --worker` it starts and processes without creating anything
    (Faust declares no topic either)."""
    values = settings_for()
    app_id = unique("worker")
    asyncio.run(ensure_topics(CommonSettings(**values)))
    env = worker_env(values, app_id, PRESENCE_TOPIC_CREATE="false")
    worker = WorkerProcess(env, tmp_path / "w", tmp_path / "w.log")
    workers.append(worker)
    worker.start()
    assert worker.process is not None
    assert worker.process.wait(60) == 2
    (line,) = (orjson.loads(line) for line in _log_lines(worker))
    assert line["msg"] == "worker cannot start"
    for name in (f"{app_id}-ticks", f"{app_id}-users-changelog", f"{app_id}-__assignor-__leader"):
        assert f"{name} (partitions" in line["error"]
    assert values["topic_raw"] not in line["error"], "only the missing topics are named"

    created = subprocess.run(
        [sys.executable, "-m", "presence.cli", "create-topics", "--worker"],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_")}, **env},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert f"{app_id}-users-changelog" in created.stdout

    worker.log_path.unlink()
    worker.start()
    worker.wait_ready(timeout=90)
    assert worker.metric("presence_worker_assigned_partitions") == 4


def test_static_membership_a_restarted_worker_takes_its_partitions_back_within_the_session_timeout(
    kafka_bootstrap: str,
    settings_for: Callable[..., dict[str, Any]],
    unique: Callable[[str], str],
    workers: list[WorkerProcess],
    tmp_path: Path,
) -> None:
    """Without a group.instance.id the restarted worker would wait for the killed member's session to expire."""
    session_timeout = 40.0
    values = settings_for()
    app_id = unique("worker")
    settings = WorkerSettings(**values, worker_app_id=app_id)
    asyncio.run(ensure_topics(settings, extra=worker_topics(settings)))
    env = worker_env(
        values,
        app_id,
        PRESENCE_WORKER_GROUP_INSTANCE_ID="presence-worker-0",
        PRESENCE_WORKER_SESSION_TIMEOUT_SECONDS=str(session_timeout),
    )
    worker = WorkerProcess(env, tmp_path / "w", tmp_path / "w.log")
    workers.append(worker)
    worker.start()
    worker.wait_ready()
    assert worker.metric("presence_worker_assigned_partitions") == 4

    worker.kill()
    restarted = time.monotonic()
    worker.start()
    wait_until(
        lambda: worker.ready() and worker.metric("presence_worker_assigned_partitions") == 4,
        session_timeout,
        "the restarted worker to own its partitions again",
    )
    took = time.monotonic() - restarted
    assert took < session_timeout * 0.6, f"took {took:.1f} s: the group waited for the old member to expire"
