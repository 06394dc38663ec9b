"""Readiness and lag (M2) as the worker's ticker and rebalance handlers drive them."""

from __future__ import annotations

from typing import NamedTuple

from streams.metrics import WorkerMetrics
from streams.runtime.progress import Progress


class TP(NamedTuple):
    topic: str
    partition: int


def value(metrics: WorkerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_a_rebalance_makes_the_worker_unready_until_it_processes_again_and_times_the_recovery() -> None:
    clock = iter([10.0, 12.5])
    metrics = WorkerMetrics()
    progress = Progress(metrics, clock=lambda: next(clock))
    progress.revoked()
    assert not progress.ready and value(metrics, "presence_worker_ready") == 0
    assert value(metrics, "presence_worker_rebalances_total") == 1
    progress.processed(0, 5, 1000.0)
    assert progress.ready and value(metrics, "presence_worker_ready") == 1
    assert value(metrics, "presence_worker_recovery_seconds_sum") == 2.5
    assert value(metrics, "presence_worker_recovery_seconds_count") == 1


def test_lag_counts_from_the_last_processed_offset_or_else_the_committed_one() -> None:
    metrics = WorkerMetrics()
    progress = Progress(metrics)
    progress.processed(0, 99, 1000.0)  # offset 99 processed: 100 is next
    highwater = {TP("raw", 0): 110, TP("raw", 1): 50, TP("raw", 2): None}
    committed = {TP("raw", 1): 44}  # last committed 44: 45 is next
    progress.measure_lag(list(highwater), highwater.get, committed.get, now=1030.0)
    assert value(metrics, "presence_worker_consumer_lag_messages", partition="0") == 10
    assert value(metrics, "presence_worker_consumer_lag_seconds", partition="0") == 30.0
    assert value(metrics, "presence_worker_consumer_lag_messages", partition="1") == 5
    assert value(metrics, "presence_worker_consumer_lag_seconds", partition="1") == 0.0
    assert value(metrics, "presence_worker_consumer_lag_messages", partition="2") is None


def test_nothing_committed_means_lag_from_the_start_and_a_failing_reading_is_skipped() -> None:
    metrics = WorkerMetrics()
    progress = Progress(metrics)

    def highwater(tp: TP) -> int:
        if tp.partition == 1:
            raise RuntimeError("mid-rebalance")
        return 7

    progress.measure_lag([TP("raw", 0), TP("raw", 1)], highwater, lambda tp: None, now=0.0)
    assert value(metrics, "presence_worker_consumer_lag_messages", partition="0") == 7
    assert value(metrics, "presence_worker_consumer_lag_messages", partition="1") is None


def test_partitions_no_longer_owned_lose_their_gauges() -> None:
    metrics = WorkerMetrics()
    progress = Progress(metrics)
    for partition in (0, 1):
        progress.processed(partition, 1, 0.0)
    progress.measure_lag([TP("raw", 0), TP("raw", 1)], lambda tp: 5, lambda tp: None, now=0.0)
    progress.assigned([1])
    assert value(metrics, "presence_worker_assigned_partitions") == 1
    assert value(metrics, "presence_worker_consumer_lag_messages", partition="0") is None
    assert value(metrics, "presence_worker_consumer_lag_messages", partition="1") == 3
    assert list(progress.last_processed) == [1]
