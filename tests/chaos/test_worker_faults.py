"""Worker faults (S10): two workers share the partitions under steady traffic while a schedule SIGKILLs and
SIGTERMs them — mid-stream, right after a restart (during the rebalance) and after wiping a worker's state
directory (during table recovery from the changelog). Afterwards TRANSITIONS must equal the uninterrupted run's
under S10 and every user's last STATE record must equal the reference model's.

The seed is printed in the report; ``PRESENCE_CHAOS_SEED=<seed>`` replays the same schedule.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.topics import ensure_topics
from streams.config import WorkerSettings
from streams.main import worker_topics
from tests.integration.streams.harness import (
    WorkerProcess,
    check_s10,
    model_run,
    produce_raw,
    read_topic,
    scenario,
    wait_until,
    worker_env,
)
from tests.integration.streams.test_kill9 import _SteadyTraffic

from .conftest import knob
from .report import Report


def _pause(seconds: float) -> None:
    """Let the fault schedule's chosen interval pass (fault timing, not synchronisation)."""
    deadline = time.monotonic() + seconds
    wait_until(lambda: time.monotonic() >= deadline, seconds + 5, "the next fault instant", interval=0.05)


def s10_figures(expected: dict[str, list[dict[str, Any]]], actual: list[bytes]) -> dict[str, int]:
    """Lost, extra, repeated and gap counts of TRANSITIONS against the uninterrupted run."""
    seen: Counter[tuple[str, int, int]] = Counter()
    for value in actual:
        payload = orjson.loads(value)
        seen[(payload["userid"], payload["epoch"], payload["seq"])] += 1
    wanted = {(p["userid"], p["epoch"], p["seq"]) for ps in expected.values() for p in ps}
    by_epoch: dict[tuple[str, int], list[int]] = {}
    for userid, epoch, seq in seen:
        by_epoch.setdefault((userid, epoch), []).append(seq)
    gaps = sum(max(seqs) - len(seqs) for seqs in by_epoch.values())  # seq starts at 1 in each epoch
    return {
        "transitions": len(wanted),
        "lost": len(wanted - seen.keys()),
        "extra": len(seen.keys() - wanted),
        "repeats": sum(n - 1 for n in seen.values()),
        "gaps": gaps,
    }


def test_workers_killed_and_terminated_repeatedly_match_the_uninterrupted_run(
    kafka_bootstrap: str,
    settings_for: Callable[..., dict[str, Any]],
    unique: Callable[[str], str],
    tmp_path: Path,
    pytestconfig: pytest.Config,
    reliability: Report,
) -> None:
    faults_wanted = int(knob(pytestconfig, "WORKER_FAULTS", short=4, long=24))
    seed = int(os.environ.get("PRESENCE_CHAOS_SEED", str(time.time_ns() % 1_000_000)))
    rng = random.Random(seed)
    values = settings_for(topic_partitions=6)
    app_id = unique("worker")
    settings = WorkerSettings(**values, worker_app_id=app_id)
    asyncio.run(ensure_topics(settings, extra=worker_topics(settings)))
    start_ms = int(time.time() * 1000) - 3_600_000
    asyncio.run(produce_raw(kafka_bootstrap, settings.topic_raw, scenario(60, 6, seed, start_ms)))
    traffic = _SteadyTraffic(kafka_bootstrap, settings.topic_raw, seed, start_ms + 3_000_000)
    workers = [
        WorkerProcess(
            env=worker_env(values, app_id), data_dir=tmp_path / f"w{n}", log_path=tmp_path / f"w{n}.log"
        )
        for n in range(2)
    ]
    schedule: list[str] = []
    kinds: Counter[str] = Counter()
    started = time.monotonic()
    try:
        traffic.start()
        for worker in workers:
            worker.start()
        workers[0].wait_ready(120)
        for fault in range(faults_wanted):
            victim_no = rng.randrange(2)
            victim, other = workers[victim_no], workers[1 - victim_no]
            kind = rng.choice(("sigkill", "sigterm", "sigkill-in-rebalance", "sigkill-in-recovery"))
            _pause(rng.uniform(1.0, 6.0))
            if victim.process is None:
                victim.start()
            if kind == "sigterm":
                victim.stop(60)
            elif kind == "sigkill":
                victim.kill()
            elif kind == "sigkill-in-rebalance":
                # Kill the other worker while the victim's restart makes the group rebalance.
                victim.kill()
                victim.start()
                _pause(rng.uniform(0.5, 4.0))
                other.kill()
                other.start()
            else:
                victim.kill()
                shutil.rmtree(victim.data_dir, ignore_errors=True)
                victim.start()  # restores its partitions' table from the changelog
                _pause(rng.uniform(1.0, 5.0))
                victim.kill()
            kinds[kind] += 1
            schedule.append(f"{fault + 1}: {kind} w{victim_no}")
            _pause(rng.uniform(0.5, 3.0))
            for worker in workers:
                if worker.process is None:
                    worker.start()
        traffic.stop()
        raw = asyncio.run(read_topic(kafka_bootstrap, settings.topic_raw))
        expected = model_run(raw)
        wanted = {(p["userid"], p["epoch"], p["seq"]) for ps in expected["transitions"].values() for p in ps}
        for worker in workers:
            worker.wait_ready(180)

        def transitions() -> list[bytes]:
            return [v for *_, v in asyncio.run(read_topic(kafka_bootstrap, settings.topic_transitions)) if v]

        def complete() -> bool:
            return wanted <= {(p["userid"], p["epoch"], p["seq"]) for p in map(orjson.loads, transitions())}

        def final_state() -> dict[str, Any]:
            final: dict[str, Any] = {}
            for _, _, key, value in asyncio.run(read_topic(kafka_bootstrap, settings.topic_state)):
                final[key.decode()] = orjson.loads(value) if value else None
            return final

        try:
            wait_until(complete, 240, f"{len(wanted)} transitions after the faults", interval=1.0)
            wait_until(
                lambda: final_state() == expected["state"], 120, "STATE to equal the model", interval=1.0
            )
        except TimeoutError:
            pass  # the report gets the figures; the assertions below fail with a sample of the difference
        finally:
            actual = transitions()
            figures = s10_figures(expected["transitions"], actual)
            state = final_state()
            differ = [u for u in expected["state"] if state.get(u) != expected["state"][u]]
            reliability.record(
                "test_worker_faults",
                f"2 workers, {faults_wanted} SIGKILL/SIGTERM faults under traffic (rebalance, recovery)",
                faults=sum(kinds.values()) + kinds["sigkill-in-rebalance"],
                events_lost=figures["lost"],
                duplicates=figures["repeats"],
                seq_gaps=figures["gaps"],
                details={
                    "seed": seed,
                    "fault kinds": dict(sorted(kinds.items())),
                    "schedule": "; ".join(schedule),
                    "RAW events (backlog + steady traffic)": len(raw),
                    "transitions of the uninterrupted run": figures["transitions"],
                    "transitions the uninterrupted run does not have": figures["extra"],
                    "identical repeats on TRANSITIONS": figures["repeats"],
                    "users whose final STATE differs from the model": f"{len(differ)} of {len(expected['state'])}",
                    "fault phase (s)": round(time.monotonic() - started),
                },
            )
        counts = check_s10(expected["transitions"], actual)
        assert counts["transitions"] > 0
        assert figures["gaps"] == 0
        sample = [(u, expected["state"][u], state.get(u)) for u in differ[:2]]
        assert not differ, f"{len(differ)} users' final STATE differs from the model, e.g. {sample}"
    finally:
        traffic.stop()
        for worker in workers:
            worker.stop()
