"""Readiness and consumer lag, as this worker sees them (M2).

Ready means partitions are assigned and recovered and processing goes on; every rebalance makes the worker
unready until then, and the time it took is observed as the recovery time. Lag per owned RAW partition is the
consumer's high-water mark minus the next offset to process (the last processed one + 1, or the committed one
before anything was processed since the assignment).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

from streams.metrics import WorkerMetrics


class Progress:
    """Readiness, the last processed RAW offset per partition and the lag gauges derived from them."""

    def __init__(self, metrics: WorkerMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.ready = False
        self._clock = clock
        self._rebalance_started: float | None = None
        self.last_processed: dict[int, tuple[int, float]] = {}

    def processed(self, partition: int, offset: int, timestamp: float) -> None:
        """A RAW message (``timestamp`` in epoch seconds) was processed and its outputs sent."""
        self.last_processed[partition] = (offset, timestamp)
        if not self.ready:
            self.mark_ready()

    def mark_ready(self) -> None:
        self.ready = True
        self.metrics.ready.set(1)
        if self._rebalance_started is not None:
            took = self._clock() - self._rebalance_started
            self.metrics.recovery_seconds.observe(took)
            self.metrics.last_recovery_seconds.set(took)
            self._rebalance_started = None

    def revoked(self) -> None:
        """A rebalance began: unready until partitions are assigned and recovered again."""
        self.ready = False
        self._rebalance_started = self._clock()
        self.metrics.ready.set(0)
        self.metrics.rebalances.inc()

    def assigned(self, owned: Iterable[int]) -> None:
        """The RAW partitions now owned: gauges of the others go away."""
        owned = set(owned)
        self.metrics.assigned_partitions.set(len(owned))
        for partition in list(self.last_processed):
            if partition not in owned:
                del self.last_processed[partition]
                self.metrics.consumer_lag_messages.remove(str(partition))
                self.metrics.consumer_lag_seconds.remove(str(partition))

    def measure_lag(
        self,
        assigned: Iterable[Any],
        highwater: Callable[[Any], int | None],
        committed: Callable[[Any], int | None],
        now: float | None = None,
    ) -> None:
        """Set the lag gauges of the ``assigned`` topic-partitions.

        ``highwater(tp)`` is the next offset Kafka will write, ``committed(tp)`` the last committed one.
        """
        now = time.time() if now is None else now
        for tp in assigned:
            # The consumer's bookkeeping can be mid-rebalance; a missed measurement is taken again next tick.
            with contextlib.suppress(Exception):
                high = highwater(tp)
                if high is None:
                    continue
                processed = self.last_processed.get(tp.partition)
                if processed is not None:
                    next_offset = processed[0] + 1
                else:
                    last_committed = committed(tp)
                    next_offset = 0 if last_committed is None else last_committed + 1
                lag = max(0, high - next_offset)
                label = str(tp.partition)
                self.metrics.consumer_lag_messages.labels(label).set(lag)
                # Upper bound of the oldest unprocessed message's age: it was produced after the last processed.
                age = now - processed[1] if (processed and lag) else 0.0
                self.metrics.consumer_lag_seconds.labels(label).set(max(0.0, age))
