"""Every benchmark runs end to end at tiny sizes and writes well-formed results. Nothing here asserts on time:
these machines are noisy, and the numbers only mean something as ratios in a full run (bench/README.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.bench_smoke, pytest.mark.timeout(900)]


def _load(out: Path, name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((out / f"{name}.smoke.json").read_text())
    assert document["benchmark"] == name
    assert document["smoke"] is True
    machine = document["machine"]
    assert machine["nproc"] >= 1 and machine["ram_gib"] > 0 and machine["cpu_model"]
    for target in document.get("targets", {}).values():
        assert set(target) == {"target", "value", "met"}
    return document


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_gateway(tmp_path: Path) -> None:
    from bench import gateway

    gateway.run(smoke=True, out_dir=tmp_path)
    doc = _load(tmp_path, "gateway")
    for system in ("gateway", "framework"):
        for row in doc[system]:
            assert _positive(row["max"]["requests_per_second"])
            assert row["max"]["errors"] == 0, f"{system} answered errors under load"
            assert row["at_rate"] and all(_positive(r["latency_ms"]["p99"]) for r in row["at_rate"])
    assert all(_positive(k["events_per_second"]) for k in doc["kafka"])
    assert all(_positive(s["ratio_to_framework"]) for s in doc["summary"])


def test_worker(tmp_path: Path) -> None:
    from bench import worker

    worker.run(smoke=True, out_dir=tmp_path)
    doc = _load(tmp_path, "worker")
    systems = doc["systems"]
    assert set(systems) == {"worker", "bare_loop", "quixstreams"}
    for result in systems.values():
        assert _positive(result["events_per_second"]) and _positive(result["events_per_cpu_second"])
    # The same processor over the same backlog: every system must emit the same transitions and STATE updates.
    assert len({s["transitions"] for s in systems.values()}) == 1
    assert len({s["state_updates"] for s in systems.values()}) == 1
    assert all(_positive(v) for v in doc["ratios"].values())


def test_e2e(tmp_path: Path) -> None:
    from bench import e2e

    e2e.run(smoke=True, out_dir=tmp_path)
    doc = _load(tmp_path, "e2e")
    row = doc["rates"][0]
    assert row["transitions_seen"] == row["transitions_expected"] > 0
    assert row["statuses"] == {"200": row["requests"]}
    assert _positive(row["latency_ms"]["p50"])


def test_recovery(tmp_path: Path) -> None:
    from bench import recovery

    recovery.run(smoke=True, out_dir=tmp_path)
    doc = _load(tmp_path, "recovery")
    starts = doc["starts"]
    assert starts["cold"]["restored_user_status"] == 200
    assert starts["warm"]["restored_user_status"] == 200
    assert all(_positive(s["ready_seconds"]) for s in starts.values())


def test_memory(tmp_path: Path) -> None:
    from bench import memory

    memory.run(smoke=True, out_dir=tmp_path)
    doc = _load(tmp_path, "memory")
    assert _positive(doc["memory"]["rss_mib_loaded"])
    assert _positive(doc["memory"]["state_dir_mib"])


def test_ghosts(tmp_path: Path) -> None:
    from bench import ghosts

    ghosts.run(smoke=True, out_dir=tmp_path)
    doc = _load(tmp_path, "ghosts")
    assert doc["settings"]["users"] > 0 and doc["settings"]["events"] > 0
    assert set(doc["targets"]) == {
        "wrong_time_on_vs_off",
        "longest_ghost_on_s",
        "outage_ghosts_cleared_s",
        "api_peak_vs_budget",
        "api_calls_while_nothing_to_check",
        "wrong_corrections",
    }
    off = doc["modes"]["off"]
    # Callbacks were lost (1 %) and the outage dropped some: the run did what it says.
    assert off["callbacks"]["delivered"] > 0 and off["callbacks"]["lost"] + off["callbacks"]["dropped"] > 0
    assert off["outage"]["seconds"] >= doc["settings"]["outage_seconds"]
    assert off["transitions"] > 0
    assert off["api"]["calls"] == 0, "reconciliation off, yet the worker called the API"
    for mode in doc["modes"].values():
        if "skipped" in mode:
            continue
        score = mode["score"]
        assert 0 <= score["ghost_online_share"] <= 1 and 0 <= score["ghost_offline_share"] <= 1
        assert score["wrong_share"] == pytest.approx(
            score["ghost_online_share"] + score["ghost_offline_share"]
        )
        assert score["users"] == doc["settings"]["users"] or score["users"] > 0
        assert score["wrong_corrections"] >= 0 and score["ghosts"]["count"] >= score["ghosts"]["open_at_end"]
    on = doc["modes"]["on"]
    if "skipped" in on:
        # Until the worker runs reconciliation, the on run says why it did not run and no target is judged.
        assert all(t["met"] is None for t in doc["targets"].values())
    else:
        assert on["reconciliation_wired"] is True
        assert all(isinstance(t["met"], bool) for t in doc["targets"].values())
        # Reconciliation did its work: it asked RongCloud (the emulator), corrected users the lost callbacks left
        # wrong, and asked nothing before anyone could be silent or suspect.
        assert on["api"]["calls"] > 0
        assert sum(on["score"]["corrections"].values()) > 0
        assert doc["targets"]["api_calls_while_nothing_to_check"]["met"] is True
