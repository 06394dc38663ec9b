"""Reconciliation through the real pipeline: the RongCloud emulator's callbacks over real HTTP into a real gateway
process, Kafka, and a real worker process that checks doubted users with the emulator's ``checkOnline`` API.

The emulator holds the ground truth; callbacks are lost on purpose; the worker must bring what TRANSITIONS and
the query API show back to the truth (R2, R3) without correcting anyone who was right, and must never let an
event too old to judge open a session (R5).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.contract import GapMarker, Observation, decode_raw_record
from core.topics import ensure_topics
from presence.children import wait_until
from presence.emulator import ApiEmulator, CallbackPolicy, CallbackSender, GroundTruth
from presence.simulate import Target
from presence.trace import Delivery, Trace, TraceSpec
from streams.config import WorkerSettings
from streams.main import worker_topics
from tests.chaos.support import APP_KEY, SECRET, GatewayProcess, post_events
from tests.integration.streams.harness import (
    WorkerProcess,
    observations_on_raw,
    read_topic,
    reconcile_env,
    records_of,
    transitions_by_user,
    worker_env,
)

MINUTE_MS = 60_000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def event(userid: str, session: str, status: str, at: int) -> dict[str, Any]:
    """A webhook event; ``at`` relative to the truth's time 0 (the emulator adds its base)."""
    return {"userid": userid, "sessionId": session, "status": status, "time": at, "os": "iOS",
            "clientIp": "10.1.2.3:4000"}  # fmt: skip


def absolute(base_ms: int, *events: dict[str, Any]) -> list[dict[str, Any]]:
    """Events with times relative to the truth's time 0 as a request body."""
    return [{**e, "time": base_ms + e["time"]} for e in events]


def trace_of(deliveries: Iterable[Delivery]) -> Trace:
    return Trace(TraceSpec(), list(deliveries))


@dataclass
class Pipeline:
    values: dict[str, Any]
    api: ApiEmulator
    gateway: GatewayProcess
    worker: WorkerProcess

    @property
    def bootstrap(self) -> str:
        return str(self.values["kafka_bootstrap_servers"])

    def transitions(self) -> dict[str, list[dict[str, Any]]]:
        return transitions_by_user(self.bootstrap, self.values["topic_transitions"])

    def reconciled(self) -> dict[str, list[tuple[str, str]]]:
        """Each user's transitions caused by an observation: (from, to)."""
        return {
            userid: found
            for userid, ts in self.transitions().items()
            if (found := [(t["from"], t["to"]) for t in ts if t["cause"]["event"] == "reconcile"])
        }

    def observations(self) -> list[Observation]:
        return observations_on_raw(self.bootstrap, self.values["topic_raw"])

    def gap_markers(self) -> list[tuple[int, GapMarker]]:
        """The intake-gap markers on RAW now: (partition, marker)."""
        return [
            (partition, marker)
            for partition, offset, key, value in asyncio.run(
                read_topic(self.bootstrap, self.values["topic_raw"])
            )
            if value is not None
            and isinstance(marker := decode_raw_record(key, value, f"{partition}@{offset}"), GapMarker)
        ]

    def disagreements(self, truth: GroundTruth, base_ms: int, userids: Iterable[str]) -> dict[str, str]:
        """Users whom TRANSITIONS (the last one) or the query API show otherwise than the truth now."""
        at = now_ms() - base_ms
        shown = self.transitions()
        records = records_of(self.worker.url, userids)
        wrong = {}
        for userid in userids:
            really = truth.online_at(userid, at)
            last = shown.get(userid, [])
            on_transitions = bool(last) and last[-1]["to"] == "online"
            on_query = records.get(userid, {}).get("status") == "online"
            if on_transitions != really or on_query != really:
                wrong[userid] = f"truth {really}, TRANSITIONS {on_transitions}, query API {on_query}"
        return wrong


@contextlib.asynccontextmanager
async def pipeline(
    settings_for: Callable[..., dict[str, Any]],
    unique: Callable[[str], str],
    tmp_path: Path,
    truth: GroundTruth,
    **reconcile: float,
) -> AsyncIterator[Pipeline]:
    """The emulator's API (answering from ``truth``), a gateway process and a worker process reconciling
    against it, on this test's topics."""
    values = settings_for()
    app_id = unique("worker")
    settings = WorkerSettings(**values, worker_app_id=app_id)
    await ensure_topics(settings, extra=worker_topics(settings))
    api = ApiEmulator(truth, app_key=APP_KEY, secret=SECRET)
    await api.start()
    gateway = GatewayProcess(values, tmp_path / "spool", tmp_path / "gateway.log")
    env = worker_env(values, app_id, **reconcile_env(api.url, APP_KEY, SECRET, **reconcile))
    worker = WorkerProcess(env=env, data_dir=tmp_path / "worker", log_path=tmp_path / "worker.log")
    try:
        worker.start()
        await asyncio.gather(asyncio.to_thread(gateway.start), asyncio.to_thread(worker.wait_ready))
        yield Pipeline(values, api, gateway, worker)
    finally:
        await asyncio.gather(asyncio.to_thread(worker.stop), asyncio.to_thread(gateway.stop))
        await api.stop()


async def test_callbacks_lost_on_purpose_leave_ghosts_that_reconciliation_clears(
    settings_for: Callable[..., dict[str, Any]], unique: Callable[[str], str], tmp_path: Path
) -> None:
    """Ghost online (a user's final offline lost outright: R2 after ``max_silence``) and ghost offline (a new
    session's online dropped by upstream while the gateway was down: R3 after the intake gap) are both cleared;
    users whose callbacks all arrived are never corrected; no API call is made before anyone is silent."""
    max_silence = 4.0
    truth = GroundTruth()
    stay, left = ["stay-0", "stay-1"], ["left-0", "left-1"]
    ghosts = [f"ghost-{n}" for n in range(4)]  # final offline lost: shown online, really offline
    missed = [f"missed-{n}" for n in range(3)]  # a later online dropped: shown offline, really online
    users = stay + left + ghosts + missed
    delivered: list[Delivery] = []
    for n, userid in enumerate(users):
        online, offline = event(userid, "s1", "0", 0), event(userid, "s1", "1", 200)
        for e in (online, offline) if userid not in stay else (online,):
            truth.add(userid, "s1", e["status"], e["time"])
        delivered.append(Delivery(0, f"on-{n}", (online,)))
        if userid in left + missed:
            delivered.append(Delivery(300, f"off-{n}", (offline,)))
    async with pipeline(settings_for, unique, tmp_path, truth, max_silence=max_silence, recheck_interval=10.0,
                        margin=1.0, gap_lookback=300.0) as p:  # fmt: skip
        # The truth's time 0, a whole second: the sender's base (seconds, a float) is then exactly base_ms.
        base_ms = (now_ms() // 1000 + 1) * 1000
        p.api.base_ms = base_ms
        target = Target(p.gateway.webhook, APP_KEY, SECRET)
        stats = await CallbackSender(trace_of(delivered), target).run(base_ms / 1000)
        assert (stats.delivered, stats.dropped) == (len(delivered), 0)

        # Ghost online: the age check after max_silence finds them offline; R2 ends their sessions.
        await asyncio.to_thread(wait_until, lambda: set(p.reconciled()) >= set(ghosts), 45,
                                "reconcile corrections of the ghosts online")  # fmt: skip
        # No check before anyone could be silent: nothing was suspect, no gap, nobody silent for max_silence.
        assert p.api.calls, "no checkOnline call at all"
        assert min(t for t, _, _ in p.api.calls) >= base_ms / 1000 + max_silence

        # Ghost offline: the gateway dies (SIGKILL); upstream's three attempts at each new online fail and it
        # drops them. Started again, the gateway finds its heartbeat file without a clean-stop mark and publishes
        # an intake-gap marker (unclean stop: from its last heartbeat to its start, G10) to every RAW partition.
        p.gateway.kill()
        gap_start = now_ms()
        dropped: list[Delivery] = []
        for n, userid in enumerate(missed):
            online = event(userid, "s2", "0", now_ms() - base_ms)
            truth.add(userid, "s2", "0", online["time"])
            dropped.append(Delivery(online["time"], f"lost-{n}", (online,)))
        stats = await CallbackSender(
            trace_of(dropped), target, policy=CallbackPolicy(attempt_timeout=2.0)
        ).run(base_ms / 1000)
        assert (stats.dropped, stats.delivered) == (len(missed), 0)
        await asyncio.to_thread(p.gateway.start)
        markers = await asyncio.to_thread(p.gap_markers)
        assert sorted(partition for partition, _ in markers) == list(range(p.values["topic_partitions"]))
        assert {(m.reason, m.start <= gap_start) for _, m in markers} == {("unclean_stop", True)}

        def settled() -> bool:
            return not p.disagreements(truth, base_ms, users)

        try:
            await asyncio.to_thread(wait_until, settled, 45, "TRANSITIONS and the query API to match the truth",
                                    interval=0.5)  # fmt: skip
        except TimeoutError as exc:
            raise AssertionError(f"{exc}: {p.disagreements(truth, base_ms, users)}") from None

        # Exactly the users who were wrong were corrected, once each, in the right direction (and a correction is
        # visible on TRANSITIONS as cause.event "reconcile"); users whose callbacks all arrived were checked too
        # (age, gap) and left alone.
        assert await asyncio.to_thread(p.reconciled) == {
            **{u: [("online", "offline")] for u in ghosts},
            **{u: [("offline", "online")] for u in missed},
        }
        checked = {userid for _, userid, _ in p.api.calls}
        assert checked >= set(users) - set(left), "the gap and age checks reached the correct users as well"
        # The first answer of each kind per user names the trigger that found it (later checks only verify).
        sources: dict[tuple[str, bool], str] = {}
        for o in await asyncio.to_thread(p.observations):
            sources.setdefault((o.userid, o.online), o.source)
        assert all(sources[(u, False)] == "age" for u in ghosts)
        assert all(sources[(u, True)] == "intake_gap" for u in missed)
        kinds = ("session_ended", "synthetic_opened")
        corrections = {k: await asyncio.to_thread(p.worker.metric, "presence_worker_reconcile_corrections_total", f'kind="{k}"')
                       for k in kinds}  # fmt: skip
        assert corrections == {"session_ended": len(ghosts), "synthetic_opened": len(missed)}
        verified = await asyncio.to_thread(p.worker.metric, "presence_worker_reconcile_corrections_total",
                                           'kind="verified"')  # fmt: skip
        assert verified >= len(stay)
        assert {status for _, _, status in p.api.calls} == {200}, "within the budget: never throttled"


async def test_r5_an_online_redelivered_16_minutes_later_opens_nothing_and_makes_the_user_a_suspect(
    settings_for: Callable[..., dict[str, Any]], unique: Callable[[str], str], tmp_path: Path
) -> None:
    """The request re-delivered ~16 minutes after the original (issue 14): its online is for a session whose end
    the worker has forgotten (S6, 15 minutes of stream time). Without R5 it would open a session no event ever
    closes. Event times are upstream's, so stream time is moved on by the user's later session, not by waiting."""
    truth = GroundTruth()
    first_on, first_off = -20 * MINUTE_MS, -19 * MINUTE_MS
    later_on, later_off = -2 * MINUTE_MS, -MINUTE_MS
    for session, status, at in (("s1", "0", first_on), ("s1", "1", first_off), ("s2", "0", later_on),
                                ("s2", "1", later_off)):  # fmt: skip
        truth.add("late", session, status, at)
    async with pipeline(settings_for, unique, tmp_path, truth) as p:
        base_ms = now_ms()
        p.api.base_ms = base_ms

        original = event("late", "s1", "0", first_on)
        await asyncio.to_thread(
            post_events, p.gateway, "n1", absolute(base_ms, original, event("late", "s1", "1", first_off))
        )
        await asyncio.to_thread(post_events, p.gateway, "n2", absolute(base_ms, event("late", "s2", "0", later_on),
                                event("late", "s2", "1", later_off)))  # fmt: skip
        await asyncio.to_thread(wait_until, lambda: len(p.transitions().get("late", [])) == 4, 30,
                                "the user's four transitions")  # fmt: skip
        assert p.api.calls == [], "nothing suspect, nobody silent: no check"
        # The original online again, 16+ minutes on (signed anew, as upstream signs every attempt).
        await asyncio.to_thread(post_events, p.gateway, "n3", absolute(base_ms, original))

        def verified() -> bool:
            return "verified_at" in records_of(p.worker.url, ["late"]).get("late", {})

        # The suspect check's answer (offline) agrees with what the record shows: R4 stamps verified_at.
        await asyncio.to_thread(wait_until, verified, 30, "the suspect check's answer to be applied")
        assert [userid for _, userid, _ in p.api.calls] == ["late"]
        observations = await asyncio.to_thread(p.observations)
        assert [(o.userid, o.online, o.source) for o in observations] == [("late", False, "suspect")]
        too_late = await asyncio.to_thread(
            p.worker.metric, "presence_worker_events_total", 'outcome="too_late"'
        )
        assert too_late == 1
        assert (await asyncio.to_thread(records_of, p.worker.url, ["late"]))["late"]["status"] == "offline"
        shown = [(t["from"], t["to"]) for t in (await asyncio.to_thread(p.transitions))["late"]]
        assert shown == [("offline", "online"), ("online", "offline")] * 2, "the late online sent nothing"
