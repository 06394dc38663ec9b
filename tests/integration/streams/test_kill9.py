"""S10: SIGKILL the worker at random instants — mid-stream, during start-up, rebalance and table recovery —
restart it, and compare TRANSITIONS with the uninterrupted run: nothing lost, no gap, repeats only identical.

Retention and damping are short (a user idle for a minute of stream time is deleted, an offline is held 15 s),
and the steady traffic rotates through a pool of users, so sweep releases (S8) and deletions (S6) happen all
along, kills land between them and their acknowledgement, and deleted users come back in new epochs.

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
    raw_event,
    read_topic,
    scenario,
    validator,
    wait_until,
    worker_env,
)

KILLS = int(os.environ.get("PRESENCE_CHAOS_KILLS", "5"))
# In stream time: the steady traffic's chunks are 10 s apart, so a pool user missing from 6 chunks is deleted, and
# an offline is released unless the user is back in the next chunk.
SHORT_RETENTION = {
    "worker_user_retention_seconds": 60,
    "worker_ended_session_retention_seconds": 20,
    "worker_offline_grace_seconds": 15,
}


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

    values = settings_for(**SHORT_RETENTION)
    app_id = unique("worker")
    settings = WorkerSettings(**values, worker_app_id=app_id)
    asyncio.run(ensure_topics(settings, extra=worker_topics(settings)))
    start_ms = int(time.time() * 1000) - 3_600_000

    # A backlog first, then steady traffic for the whole kill phase, so kills land mid-stream.
    asyncio.run(produce_raw(kafka_bootstrap, settings.topic_raw, scenario(80, 12, seed, start_ms)))
    traffic = _SteadyTraffic(kafka_bootstrap, settings.topic_raw, seed, start_ms + 3_000_000)
    traffic.start()
    # Output waits up to 1 s for its batch: a kill while processing then always finds sends not yet
    # acknowledged, some of them releases and deletions whose table writes are already in the local store.
    # No ticks: a tick releases a hold after wall time (S8), the one decision a re-run after a crash may take
    # otherwise, so the uninterrupted run could not be its reference. Releases here come with stream time; the
    # re-send of tick releases is covered by tests/unit/streams/test_processor_properties.py.
    # A user's transitions are re-sent from its memory; the worker waits for acknowledgements rather than send a
    # user more than it remembers (S10), so the product's default memory holds even with a 1 s linger.
    env = worker_env(values, app_id, PRESENCE_WORKER_PRODUCER_LINGER_MS="1000",
                     PRESENCE_WORKER_TICK_INTERVAL_SECONDS="86400")  # fmt: skip
    worker = WorkerProcess(env=env, data_dir=tmp_path / "w", log_path=tmp_path / "w.log")
    kills: list[str] = []
    try:
        for kill in range(KILLS):
            if rng.random() < 0.3 and worker.data_dir.exists():
                # A wiped state dir: the restart restores the whole table from the changelog.
                shutil.rmtree(worker.data_dir)
                kills.append("wiped")
            worker.start()
            if rng.random() < 0.5:
                # Half the kills land while processing steady traffic, the rest anywhere from start-up on.
                worker.wait_ready(120)
                delay = rng.uniform(0.2, 4.0)
            else:
                delay = rng.uniform(0.3, 9.0)
            deadline = time.monotonic() + delay
            # The kill instant is the fault being injected, not a synchronisation point.
            wait_until(lambda d=deadline: time.monotonic() >= d, delay + 5, "the kill instant", interval=0.05)
            phase = "processing" if worker.ready() else "starting/rebalancing/recovering"
            worker.kill()
            kills.append(f"kill {kill + 1} after {delay:.1f} s ({phase})")
        traffic.stop()

        raw = asyncio.run(read_topic(kafka_bootstrap, settings.topic_raw))
        expected = model_run(raw, settings.presence_config())  # the memory size changes no output
        everything = [p for ps in expected["transitions"].values() for p in ps]
        wanted = {(p["userid"], p["epoch"], p["seq"]) for p in everything}
        deletions = sum(p["cause"]["event"] == "deleted" for p in everything)
        releases = sum(p["from"] == "online" for p in everything)  # every drop is held first (S8)
        reborn = sum(len({p["epoch"] for p in ps}) - 1 for ps in expected["transitions"].values())
        assert deletions > 20 and releases > 100 and reborn > 5, (deletions, releases, reborn)

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
        schema = validator("transitions.v1.schema.json")
        for value in transitions():
            schema.validate(orjson.loads(value))
        # Every repeat was identical (check_s10 asserts it); the count is reported, not bounded.
        with capsys.disabled():
            print(f"[kill -9] {'; '.join(kills)}")
            print(
                f"[kill -9] {counts['transitions']} transitions ({deletions} deletions, {releases} releases, "
                f"{reborn} users back in a new epoch), 0 lost, {counts['repeats']} identical repeats"
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


def pool_chunk(rng: random.Random, chunk: int, at: int) -> list[dict[str, Any]]:
    """Ten users of a pool of 30 connect and disconnect (a third of them by logging out), some ends late."""
    events: list[dict[str, Any]] = []
    for u in sorted(rng.sample(range(30), 10)):
        userid = f"pool-{u}"
        for d in range(rng.randint(1, 2)):
            at += rng.randint(1, 20)
            session = f"{userid}-c{chunk}-d{d}"
            os_name = ("iOS", "Android", "PC")[(u + d) % 3]
            events.append(raw_event(userid, session, 0, at, os_name))
            end = raw_event(
                userid, session, 2 if rng.random() < 0.3 else 1, at + rng.randint(5, 500), os_name
            )
            # Now and then the end arrives before the online (S4) or after later traffic.
            events.insert(len(events) - rng.randint(0, min(3, len(events))), end)
    return events


class _SteadyTraffic(threading.Thread):
    """Produces RAW traffic in small paced chunks until stopped (load, not synchronisation): a rotating pool
    of users, 10 s of event time apart, so users go idle, are deleted and come back."""

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
        rng = random.Random(self._seed)
        while not self._stopped.is_set():
            chunk += 1
            events = pool_chunk(rng, chunk, self._start_ms + chunk * 10_000)
            asyncio.run(produce_raw(self._kafka, self._topic, events))
            self.produced += len(events)
            self._stopped.wait(0.2)
