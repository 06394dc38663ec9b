"""S10: SIGKILL the worker at random instants — mid-stream, during start-up, rebalance and table recovery —
restart it, and compare TRANSITIONS with the uninterrupted run: nothing lost, no gap, repeats only identical.

The seed is printed; ``PRESENCE_CHAOS_SEED=<seed>`` replays the same kill schedule.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.topics import ensure_topics
from streams.config import WorkerSettings
from streams.main import worker_topics

from .harness import (
    WorkerProcess,
    check_s10,
    model_run,
    produce_raw,
    read_topic,
    scenario,
    wait_until,
    worker_env,
)

KILLS = int(os.environ.get("PRESENCE_CHAOS_KILLS", "5"))


def test_s10_kill9_at_random_points_loses_nothing_and_repeats_identically(
    kafka_bootstrap: str,
    settings_for: Callable[..., dict[str, Any]],
    unique: Callable[[str], str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed = int(os.environ.get("PRESENCE_CHAOS_SEED", str(time.time_ns() % 1_000_000)))
    rng = random.Random(seed)
    with capsys.disabled():
        print(f"\n[kill -9] seed {seed} (PRESENCE_CHAOS_SEED={seed} replays it), {KILLS} kills")

    values = settings_for()
    app_id = unique("worker")
    settings = WorkerSettings(**values, worker_app_id=app_id)
    asyncio.run(ensure_topics(settings, extra=worker_topics(settings)))
    start_ms = int(time.time() * 1000) - 3_600_000

    # A backlog first, then steady traffic for the whole kill phase, so kills land mid-stream.
    asyncio.run(produce_raw(kafka_bootstrap, settings.topic_raw, scenario(80, 12, seed, start_ms)))
    traffic = _SteadyTraffic(kafka_bootstrap, settings.topic_raw, seed, start_ms + 3_000_000)
    traffic.start()
    worker = WorkerProcess(
        env=worker_env(values, app_id), data_dir=tmp_path / "w", log_path=tmp_path / "w.log"
    )
    kills: list[str] = []
    try:
        for kill in range(KILLS):
            if rng.random() < 0.3 and worker.data_dir.exists():
                # A wiped state dir: the restart restores the whole table from the changelog.
                shutil.rmtree(worker.data_dir)
                kills.append("wiped")
            worker.start()
            delay = rng.uniform(0.3, 9.0)
            deadline = time.monotonic() + delay
            # The kill instant is the fault being injected, not a synchronisation point.
            wait_until(lambda d=deadline: time.monotonic() >= d, delay + 5, "the kill instant", interval=0.05)
            phase = "processing" if worker.ready() else "starting/rebalancing/recovering"
            worker.kill()
            kills.append(f"kill {kill + 1} after {delay:.1f} s ({phase})")
        traffic.stop()

        raw = asyncio.run(read_topic(kafka_bootstrap, settings.topic_raw))
        expected = model_run(raw)
        wanted = {(p["userid"], p["epoch"], p["seq"]) for ps in expected["transitions"].values() for p in ps}

        worker.start()
        worker.wait_ready(120)

        def transitions() -> list[bytes]:
            return [v for *_, v in asyncio.run(read_topic(kafka_bootstrap, settings.topic_transitions)) if v]

        def complete() -> bool:
            seen = {(p["userid"], p["epoch"], p["seq"]) for p in map(orjson.loads, transitions())}
            return wanted <= seen

        try:
            wait_until(complete, 180, f"{len(wanted)} transitions after {KILLS} kills", interval=1.0)
        finally:
            counts = check_s10(expected["transitions"], transitions())
        # Every repeat was identical (check_s10 asserts it); the count is reported, not bounded.
        with capsys.disabled():
            print(f"[kill -9] {'; '.join(kills)}")
            print(
                f"[kill -9] {counts['transitions']} transitions, 0 lost, {counts['repeats']} identical repeats"
            )

        # STATE converges too: each user's last record equals the uninterrupted run's.
        def final_state() -> dict[str, Any]:
            final: dict[str, Any] = {}
            for _, _, key, value in asyncio.run(read_topic(kafka_bootstrap, settings.topic_state)):
                final[key.decode()] = orjson.loads(value) if value else None
            return final

        try:
            wait_until(
                lambda: final_state() == expected["state"], 60, "STATE to equal the model", interval=1.0
            )
        except TimeoutError:
            actual = final_state()
            differ = [u for u in expected["state"] if actual.get(u) != expected["state"][u]]
            sample = [(u, expected["state"][u], actual.get(u)) for u in differ[:3]]
            raise AssertionError(f"{len(differ)} users' final STATE differs, e.g. {sample}") from None
    finally:
        traffic.stop()
        worker.stop()


class _SteadyTraffic(threading.Thread):
    """Produces realistic RAW traffic in small paced chunks until stopped (load, not synchronisation)."""

    def __init__(self, bootstrap: str, topic: str, seed: int, start_ms: int) -> None:
        super().__init__(daemon=True)
        self._kafka = bootstrap
        self._topic = topic
        self._seed = seed
        self._start_ms = start_ms
        self._stopped = threading.Event()
        self.produced = 0

    def stop(self) -> None:
        self._stopped.set()
        if self.is_alive():
            self.join(30)

    def run(self) -> None:
        chunk = 0
        while not self._stopped.is_set():
            chunk += 1
            events = scenario(10, 1, self._seed + chunk, self._start_ms + chunk * 10_000)
            asyncio.run(produce_raw(self._kafka, self._topic, events))
            self.produced += len(events)
            self._stopped.wait(0.2)
