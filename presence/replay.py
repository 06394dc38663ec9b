"""Rebuild the table and a STATE topic from RAW (rule S11), e.g. after a fix to the presence logic.

A replay is a worker under its own app id (so its own consumer group, table, changelogs and data directory)
reading RAW from the beginning. Its transitions go to a topic of their own, never the live TRANSITIONS topic;
its STATE goes to a topic the operator names (a new one by default, the live one only when asked for); its dead
letters and ticks go to topics of their own, so the live DLQ does not get every bad event a second time. It stops
once it has caught up with the RAW offsets that existed when it started.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import TopicPartition

from core.contract import DEFAULT_WORKER_APP_ID
from core.settings import CommonSettings
from presence.children import Child, ChildFailed, presence_command
from presence.localkafka import free_port
from presence.observe import InspectError, admin_client, consumer_client, partitions_of

LIVE_APP_ID = DEFAULT_WORKER_APP_ID


@dataclass(frozen=True)
class ReplayPlan:
    app_id: str
    state_topic: str
    transitions_topic: str
    dlq_topic: str
    ticks_topic: str
    data_dir: Path
    log_path: Path

    @classmethod
    def named(
        cls, app_id: str, run_dir: Path, state_topic: str | None, transitions_topic: str | None
    ) -> ReplayPlan:
        return cls(
            app_id=app_id,
            state_topic=state_topic or f"{app_id}.state",
            transitions_topic=transitions_topic or f"{app_id}.transitions",
            dlq_topic=f"{app_id}.dlq",
            ticks_topic=f"{app_id}.ticks",
            data_dir=run_dir / "replay" / app_id,
            log_path=run_dir / "logs" / f"replay-{app_id}.log",
        )

    def env(self, base: dict[str, str], settings: CommonSettings, port: int) -> dict[str, str]:
        return {
            **base,
            "PRESENCE_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
            "PRESENCE_WORKER_APP_ID": self.app_id,
            "PRESENCE_TOPIC_STATE": self.state_topic,
            "PRESENCE_TOPIC_REPLAY_TRANSITIONS": self.transitions_topic,
            "PRESENCE_TOPIC_DLQ": self.dlq_topic,
            "PRESENCE_TOPIC_TICKS": self.ticks_topic,
            "PRESENCE_WORKER_DATA_DIR": str(self.data_dir),
            "PRESENCE_WORKER_WEB_BIND": "127.0.0.1",
            "PRESENCE_WORKER_WEB_PORT": str(port),
            "PRESENCE_WORKER_CANONICAL_URL": f"http://127.0.0.1:{port}",
            "PRESENCE_WORKER_COMMIT_INTERVAL_SECONDS": "0.5",
        }


def check_plan(plan: ReplayPlan, settings: CommonSettings, live_app_id: str, into_live_state: bool) -> None:
    """Refuse replays that would touch what live workers own (S11); the message says what to change."""
    if plan.app_id == live_app_id:
        raise InspectError(
            f"app id {plan.app_id!r} is the live workers' (PRESENCE_WORKER_APP_ID): a replay needs its own "
            "consumer group and table; choose another --app-id"
        )
    if plan.transitions_topic == settings.topic_transitions:
        raise InspectError(
            f"{plan.transitions_topic} is the live TRANSITIONS topic; a replay never writes there (S11). "
            "Choose another --transitions-topic"
        )
    if plan.state_topic == settings.topic_state and not into_live_state:
        raise InspectError(
            f"{plan.state_topic} is the live STATE topic; pass --into-live-state to rebuild it in place "
            "(stop the live workers first), or choose another --state-topic"
        )


@dataclass
class Progress:
    total: int = 0  # RAW messages to replay (end offsets at start minus beginning offsets)
    done: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def fraction(self) -> float:
        return 1.0 if self.total == 0 else min(1.0, self.done / self.total)

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.done)


async def raw_extent(settings: CommonSettings) -> dict[TopicPartition, tuple[int, int]]:
    """Each RAW partition's (beginning, end) offsets now: the part of RAW a replay covers."""
    async with consumer_client(settings) as consumer:
        partitions = await partitions_of(consumer, settings.topic_raw)
        begins = await consumer.beginning_offsets(partitions)
        ends = await consumer.end_offsets(partitions)
        return {tp: (begins[tp], ends[tp]) for tp in partitions}


async def _committed(settings: CommonSettings, group: str) -> dict[TopicPartition, int]:
    async with admin_client(settings) as admin:
        offsets = await admin.list_consumer_group_offsets(group)
        return {tp: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}


def measure(extent: dict[TopicPartition, tuple[int, int]], committed: dict[TopicPartition, int]) -> Progress:
    progress = Progress(total=sum(end - begin for begin, end in extent.values()))
    progress.done = sum(
        max(0, min(committed.get(tp, begin), end) - begin) for tp, (begin, end) in extent.items()
    )
    return progress


def run(
    plan: ReplayPlan,
    settings: CommonSettings,
    base_env: dict[str, str],
    *,
    on_progress: Callable[[Progress], None],
    timeout: float,
) -> Progress:
    """Run the replay worker until it has committed RAW's end offsets as of now; stop it; return the totals."""
    extent = asyncio.run(raw_extent(settings))
    progress = measure(extent, asyncio.run(_committed(settings, plan.app_id)))
    on_progress(progress)
    if progress.remaining == 0:
        return progress
    port = free_port()
    plan.data_dir.mkdir(parents=True, exist_ok=True)
    child = Child(
        "replay worker", presence_command("worker"), plan.env(base_env, settings, port), plan.log_path
    )
    child.start()
    deadline = time.monotonic() + timeout if timeout else None
    try:
        while progress.remaining:
            if not child.alive():
                raise ChildFailed(
                    f"the replay worker exited with code {child.exit_code()}; last lines of "
                    f"{plan.log_path}:\n{child.log_tail()}"
                )
            if deadline is not None and time.monotonic() > deadline:
                raise ChildFailed(
                    f"the replay did not catch up within {timeout:.0f} s ({progress.remaining} messages left); "
                    f"it resumes where it stopped if run again with --app-id {plan.app_id}"
                )
            time.sleep(0.5)
            progress.done = measure(extent, asyncio.run(_committed(settings, plan.app_id))).done
            on_progress(progress)
    finally:
        # SIGTERM: the worker flushes its producer, so every STATE record of what it committed is written.
        child.stop(grace=30)
    return progress
