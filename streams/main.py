"""``presence worker``: create the topics, build the Faust app and run it until SIGTERM/SIGINT.

Kafka may not be reachable yet when a worker starts (a cluster starting beside it, a network not ready): the
worker then waits for it with back-off, saying so in one log line per attempt, instead of crashing with a
traceback and being restarted in a loop. A topic layout it cannot work with stops it at once, with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable

from aiokafka.errors import KafkaError

from core.contract import changelog_topic
from core.logs import configure_logging
from core.topics import KafkaUnreachable, TopicError, TopicSpec, ensure_topics, min_insync_replicas
from streams.config import WorkerSettings
from streams.runtime.app import create_app
from streams.runtime.versions import VersionMismatch
from streams.runtime.worker import run_worker, use_uvloop

log = logging.getLogger(__name__)

#: Start-up back-off: the first wait, and the longest (each wait doubles until then).
FIRST_RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 30.0


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


async def ensure_topics_when_reachable(
    settings: WorkerSettings,
    *,
    ensure: Callable[[], Awaitable[list[str]]] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    first_delay: float = FIRST_RETRY_SECONDS,
    max_delay: float = MAX_RETRY_SECONDS,
) -> list[str]:
    """Create the worker's topics, trying again with back-off while Kafka is unreachable; the names created.

    Only unreachability is retried: a :class:`TopicError` about the topics themselves is raised at once.
    """

    async def ensure_all() -> list[str]:
        return await ensure_topics(settings, extra=worker_topics(settings), timeout=10.0)

    attempt = 0
    delay = first_delay
    while True:
        attempt += 1
        try:
            created = await (ensure or ensure_all)()
        except (KafkaUnreachable, KafkaError, OSError, TimeoutError) as exc:
            log.warning(
                "kafka not reachable yet; retrying",
                extra={
                    "attempt": attempt,
                    "retry_in_seconds": delay,
                    "kafka": settings.kafka_bootstrap_servers,
                    "error": str(exc) or repr(exc),
                },
            )
            await sleep(delay)
            delay = min(max_delay, delay * 2)
            continue
        if attempt > 1 or created:
            log.info("topics ready", extra={"attempts": attempt, "topics_created": created})
        return created


def run(settings: WorkerSettings | None = None) -> None:
    """Run one worker in the foreground."""
    settings = settings or WorkerSettings()
    use_uvloop()
    # Logging first, so that whatever happens before Faust takes over is a log line like everything after.
    configure_logging(settings.log_level, settings.log_format)
    settings.worker_data_dir.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(ensure_topics_when_reachable(settings))
        worker = create_app(settings)
    except (TopicError, VersionMismatch) as exc:
        log.error("worker cannot start", extra={"error": str(exc)})
        sys.exit(2)
    run_worker(worker.app, settings)
