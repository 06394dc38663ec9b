"""Two gateway replicas drain their spools after a Kafka outage longer than the ended-session retention (issue 14):
one replica's old events reach RAW after the other's new ones. The worker must not turn the old online into a
session no event will ever close (R5: ``too_late``, the user a suspect, checked with RongCloud's emulator)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from core.topics import ensure_topics
from presence.children import wait_until
from presence.emulator import ApiEmulator, GroundTruth
from streams.config import WorkerSettings
from streams.main import worker_topics
from tests.integration.streams.harness import (
    WorkerProcess,
    observations_on_raw,
    reconcile_env,
    records_of,
    transitions_by_user,
    worker_env,
)

from .support import APP_KEY, SECRET, GatewayProcess, post_events

MINUTE_MS = 60_000


def event(session: str, status: str, at: int) -> dict[str, Any]:
    return {"userid": "drained", "sessionId": session, "status": status, "time": at, "os": "Android",
            "clientIp": "10.4.5.6:7000"}  # fmt: skip


async def test_spools_drained_in_the_wrong_order_leave_no_permanent_ghost(
    kafka_broker: Any,
    settings_for: Callable[..., dict[str, Any]],
    unique: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """Gateway A takes the user's session s1 online; gateway B, later, s1's offline and a new session s2's online
    and offline, 19 minutes of upstream time later (event times are upstream's: the outage's length in stream time
    is what counts, so the broker is down for seconds, not 19 minutes). Both answer from their spools.

    Which replica drains first after the broker returns is a race between two processes; here it is made
    deterministic: A is killed (SIGKILL: its spool stays on disk, as acknowledged) before the broker comes back,
    so B drains alone; A is started again once B's spool is empty and drains its own. RAW then holds B's events,
    then A's old online: by then S6 has forgotten s1 (ended more than 15 minutes of stream time before), so
    without R5 the online would open s1 again and leave the user online for good. The worker starts after both
    drains (it reads RAW from the start), so the broker's outage does not involve it.
    """
    if not kafka_broker.restartable:
        pytest.skip("stops the broker: needs the session's own broker (unset PRESENCE_TEST_KAFKA)")
    values = settings_for()
    app_id = unique("worker")
    settings = WorkerSettings(**values, worker_app_id=app_id)
    await ensure_topics(settings, extra=worker_topics(settings))
    base_ms = time.time_ns() // 1_000_000
    s1_on, s1_off = base_ms - 20 * MINUTE_MS, base_ms - 19 * MINUTE_MS
    s2_on, s2_off = base_ms - 2 * MINUTE_MS, base_ms - MINUTE_MS
    truth = GroundTruth()  # times relative to base_ms
    for session, status, at in (
        ("s1", "0", s1_on),
        ("s1", "1", s1_off),
        ("s2", "0", s2_on),
        ("s2", "1", s2_off),
    ):
        truth.add("drained", session, status, at - base_ms)
    api = ApiEmulator(truth, app_key=APP_KEY, secret=SECRET, base_ms=base_ms)
    await api.start()
    a = GatewayProcess(values, tmp_path / "spool-a", tmp_path / "gateway-a.log")
    b = GatewayProcess(values, tmp_path / "spool-b", tmp_path / "gateway-b.log")
    worker = WorkerProcess(
        env=worker_env(values, app_id, **reconcile_env(api.url, APP_KEY, SECRET)),
        data_dir=tmp_path / "worker",
        log_path=tmp_path / "worker.log",
    )
    try:
        await asyncio.gather(asyncio.to_thread(a.start), asyncio.to_thread(b.start))
        kafka_broker.kill()
        try:
            await asyncio.to_thread(post_events, a, "a-1", [event("s1", "0", s1_on)])
            await asyncio.to_thread(post_events, b, "b-1", [event("s1", "1", s1_off)])
            await asyncio.to_thread(
                post_events, b, "b-2", [event("s2", "0", s2_on), event("s2", "1", s2_off)]
            )
            assert await asyncio.to_thread(a.spool_records) == 1
            assert await asyncio.to_thread(b.spool_records) == 3
            a.kill()
        finally:
            await asyncio.to_thread(kafka_broker.start)
        await asyncio.to_thread(b.wait_drained, 120)
        await asyncio.to_thread(a.start)
        await asyncio.to_thread(a.wait_drained, 120)

        worker.start()
        await asyncio.to_thread(worker.wait_ready)

        def checked_and_applied() -> bool:
            # The suspect check's answer (offline) agrees with the record: R4 stamps verified_at.
            return "verified_at" in records_of(worker.url, ["drained"]).get("drained", {})

        await asyncio.to_thread(
            wait_until, checked_and_applied, 45, "the suspect check's answer to be applied"
        )
        assert (
            await asyncio.to_thread(worker.metric, "presence_worker_events_total", 'outcome="too_late"') == 1
        )
        assert [userid for _, userid, _ in api.calls] == ["drained"]
        observations = await asyncio.to_thread(observations_on_raw, values["kafka_bootstrap_servers"],
                                               values["topic_raw"])  # fmt: skip
        assert [(o.userid, o.online, o.source) for o in observations] == [("drained", False, "suspect")]
        record = (await asyncio.to_thread(records_of, worker.url, ["drained"]))["drained"]
        assert (record["status"], record["sessions"]) == ("offline", [])
        shown = await asyncio.to_thread(transitions_by_user, values["kafka_bootstrap_servers"],
                                        values["topic_transitions"])  # fmt: skip
        # B's s1 offline created the user offline (nothing to send), s2 came and went; A's online sent nothing.
        assert [(t["from"], t["to"], t["cause"]["sessionId"]) for t in shown["drained"]] == [
            ("offline", "online", "s2"),
            ("online", "offline", "s2"),
        ]
    finally:
        try:
            await asyncio.to_thread(kafka_broker.start)  # a no-op unless the test failed while it was down
        finally:
            await asyncio.gather(
                asyncio.to_thread(worker.stop), asyncio.to_thread(a.stop), asyncio.to_thread(b.stop)
            )
            await api.stop()
