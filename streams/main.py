"""``presence worker``: create the topics, build the Faust app and run it until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio

from core.contract import changelog_topic
from core.topics import TopicSpec, ensure_topics, min_insync_replicas
from streams.config import WorkerSettings
from streams.runtime.app import create_app
from streams.runtime.worker import run_worker


def worker_topics(settings: WorkerSettings) -> list[TopicSpec]:
    """Topics only the worker uses, beside the product's four (D2)."""
    rf = settings.topic_replication_factor
    specs = [
        # Ticks only drive idle-partition releases (S8); an hour of them is plenty.
        TopicSpec(
            settings.ticks_topic,
            settings.topic_partitions,
            rf,
            {"cleanup.policy": "delete", "retention.ms": str(3600 * 1000),
             "min.insync.replicas": str(min_insync_replicas(rf))},
        ),
    ]  # fmt: skip
    # The table's changelog and Faust's leader-election topic, created up front with explicit configs:
    # Faust would declare them itself, but a worker can then start before their metadata is visible and
    # crash its agent on a partition-count mismatch.
    specs.append(
        TopicSpec(
            changelog_topic(settings.worker_app_id),
            settings.topic_partitions,
            rf,
            {"cleanup.policy": "compact", "min.insync.replicas": str(min_insync_replicas(rf))},
        )
    )
    specs.append(
        TopicSpec(f"{settings.worker_app_id}-__assignor-__leader", 1, rf, {"cleanup.policy": "compact"})
    )
    if settings.topic_replay_transitions:
        specs.append(
            TopicSpec(
                settings.topic_replay_transitions,
                settings.topic_partitions,
                rf,
                {"cleanup.policy": "delete", "retention.ms": str(settings.topic_transitions_retention_ms),
                 "min.insync.replicas": str(min_insync_replicas(rf))},
            )
        )  # fmt: skip
    return specs


def run(settings: WorkerSettings | None = None) -> None:
    """Run one worker in the foreground."""
    settings = settings or WorkerSettings()
    settings.worker_data_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(ensure_topics(settings, extra=worker_topics(settings)))
    run_worker(create_app(settings).app, settings)
