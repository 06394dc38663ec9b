"""Intake gaps (G10): the windows in which this gateway may have lost callbacks, marked on every RAW partition.

Upstream gives up on a callback attempt after 5 s, tries twice more, and then drops the callback for good. A
lost offline leaves a ghost, so the gateway tells the workers when it may have lost one
(:class:`core.contract.GapMarker`), and they check the users concerned with RongCloud's server API:

- **unclean_stop** — a heartbeat file beside the spool holds the last moment this replica was alive and whether
  it stopped cleanly. A start that finds no clean-stop mark (SIGKILL, OOM, node loss) marks the window from the
  last heartbeat to the moment it serves again.
- **error_answer** — a callback answered with anything but 200, except 401 and 403 (:func:`answer_gap_reason`).
- **slow_answer** — a callback answered later than upstream's timeout (:data:`core.contract.UPSTREAM_TIMEOUT_MS`).

Failed answers are coalesced (:class:`GapTracker`): one window per reason while they keep coming less than the
quiet time apart, published when they stop, or every ``max`` while they do not. Markers waiting to be published
are merged per reason (:class:`Outbox`), so however long Kafka and the spool refuse them, a handful wait. A marker
is a RAW record without a key for every partition (:data:`gateway.spool.ALL_PARTITIONS`), handed to the
:class:`gateway.publisher.Publisher` like a request's records: to Kafka, or into the spool if Kafka does not
acknowledge it within the publish budget. It is published by a background task, never on a request's path.

The tracker and the outbox are pure (times are parameters); :class:`HeartbeatFile` does the file I/O and
:class:`GapReporter` the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from core.contract import (
    SCHEMA_VERSION,
    UPSTREAM_TIMEOUT_MS,
    GapMarker,
    GapReason,
    encode_gap_marker,
)
from gateway.config import GatewaySettings
from gateway.metrics import GatewayMetrics
from gateway.publisher import Publisher, Unavailable
from gateway.spool import ALL_PARTITIONS, SpoolRecord

log = logging.getLogger(__name__)

HEARTBEAT_FILE = "heartbeat.json"
# After a marker could be neither published nor spooled, wait this long before the next attempt.
RETRY_SECONDS = 1.0
# Answers that never make a gap: the sender has not proved it is upstream (403: not in the allow-list; 401: no
# valid signature, or a replayed nonce). Marking them would let anyone on the internet spend the deployment's
# checkOnline budget; a misconfiguration that refuses upstream itself shows on the auth-failure alert instead.
UNAUTHENTICATED_STATUSES = frozenset((401, 403))


def answer_gap_reason(status: int, duration_ms: float) -> GapReason | None:
    """Whether a webhook answer may have lost callbacks, and why.

    Any answer but 200 to a signed request may: upstream retries it twice and drops it (a 503 when neither Kafka
    nor the spool took the events, a 500, a 408 for a body that did not arrive in time, a 400 or 413 for a body
    that cannot be used — its retries get the same answer). So may any answer upstream waited longer than its
    timeout for: it counts the attempt as failed whatever the status, and many such failures pause its callbacks.
    """
    if status in UNAUTHENTICATED_STATUSES:
        return None
    if status != 200:
        return "error_answer"
    if duration_ms >= UPSTREAM_TIMEOUT_MS:
        return "slow_answer"
    return None


class Window(NamedTuple):
    """A window ``[start, end]`` (epoch ms, wall clock) in which callbacks may have been lost, and why."""

    reason: str
    start: int
    end: int

    def merged(self, other: Window) -> Window:
        return Window(self.reason, min(self.start, other.start), max(self.end, other.end))


def marker_of(window: Window, gateway: str) -> GapMarker:
    """The marker of a window; its id is the same wherever it is sent (every partition, a republication)."""
    return GapMarker(
        f"{gateway}:{window.reason}:{window.start}-{window.end}",
        gateway,
        window.reason,
        window.start,
        window.end,
    )


@dataclass(slots=True)
class _Open:
    start: int
    end: int
    first_at: int
    last_at: int


class GapTracker:
    """Coalesces failed answers into windows: one open window per reason, extended by every failure that comes
    within ``quiet_ms`` of the previous one; due once ``quiet_ms`` pass without one, or ``max_ms`` after it opened
    (a new window opens with the next failure). Pure: every time is a parameter."""

    def __init__(self, *, quiet_ms: int, max_ms: int) -> None:
        self._quiet_ms = quiet_ms
        self._max_ms = max_ms
        self._open: dict[str, _Open] = {}

    def failed(self, reason: str, start_ms: int, end_ms: int, now_ms: int) -> bool:
        """A request that may have lost callbacks ran from ``start_ms`` to ``end_ms``; True if it opened a window."""
        window = self._open.get(reason)
        if window is None:
            self._open[reason] = _Open(start_ms, end_ms, now_ms, now_ms)
            return True
        window.start = min(window.start, start_ms)
        window.end = max(window.end, end_ms)
        window.last_at = max(window.last_at, now_ms)
        return False

    def due(self, now_ms: int) -> list[Window]:
        """The windows to publish now (closed and forgotten)."""
        closed = [
            reason
            for reason, window in self._open.items()
            if now_ms - window.last_at >= self._quiet_ms or now_ms - window.first_at >= self._max_ms
        ]
        return [self._close(reason) for reason in closed]

    def next_due_ms(self) -> int | None:
        """When the earliest open window becomes due if no failure extends it (None: none open)."""
        return min(
            (
                min(window.last_at + self._quiet_ms, window.first_at + self._max_ms)
                for window in self._open.values()
            ),
            default=None,
        )

    def open_windows(self) -> list[Window]:
        """The windows still open, as they stand (for the heartbeat file)."""
        return [Window(reason, window.start, window.end) for reason, window in self._open.items()]

    def flush(self) -> list[Window]:
        """Close every open window (a shutdown)."""
        return [self._close(reason) for reason in list(self._open)]

    def _close(self, reason: str) -> Window:
        window = self._open.pop(reason)
        return Window(reason, window.start, window.end)


class Outbox:
    """Windows waiting to be published, oldest first: at most one waiting per reason (a new window of a reason
    already waiting is merged into it), plus the one being handed off. Pure."""

    def __init__(self) -> None:
        self._waiting: dict[str, Window] = {}
        self.in_flight: Window | None = None

    def add(self, window: Window) -> None:
        waiting = self._waiting.get(window.reason)
        self._waiting[window.reason] = window if waiting is None else waiting.merged(window)

    def take(self) -> Window | None:
        """The next window to hand off (it is in flight until :meth:`done`), or None."""
        if self.in_flight is not None or not self._waiting:
            return None
        reason = min(self._waiting, key=lambda r: self._waiting[r].start)
        self.in_flight = self._waiting.pop(reason)
        return self.in_flight

    def done(self, handed_off: bool) -> None:
        """The window in flight was published or spooled, or (False) neither: it waits again."""
        window, self.in_flight = self.in_flight, None
        if window is not None and not handed_off:
            self.add(window)

    def windows(self) -> list[Window]:
        """Everything not yet published or spooled."""
        return [*([self.in_flight] if self.in_flight else []), *self._waiting.values()]

    def __len__(self) -> int:
        return len(self._waiting) + (1 if self.in_flight else 0)


# --- the heartbeat file ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """What the heartbeat file says: the last moment the process was alive (epoch ms), whether it stopped
    cleanly then, and the windows it had not published yet."""

    alive_at: int
    clean: bool
    pending: tuple[Window, ...] = ()


def recovered(previous: Heartbeat | None, now_ms: int) -> list[Window]:
    """The windows a start owes: what the previous process left unpublished and, if it did not stop cleanly,
    the window from its last heartbeat to ``now_ms``."""
    if previous is None:
        return []
    windows = list(previous.pending)
    if not previous.clean:
        windows.append(Window("unclean_stop", min(previous.alive_at, now_ms), now_ms))
    return windows


class HeartbeatFile:
    """The heartbeat file: rewritten whole (a temporary file renamed over it), so a reader sees one complete
    version, never a torn one.

    A beat is not fsync'd: a process killed outright (SIGKILL, OOM) leaves the page cache to the kernel, which
    still writes it, so the next start reads the latest beat. Only a node that loses power can lose recent beats,
    and then an older beat is read, which widens the window (more users checked), never narrows it. The first
    beat of a start and the clean-stop mark are fsync'd (file and directory): losing the first would let a
    clean-stop mark from before survive a crash after it, and a crash would then go unmarked.
    """

    def __init__(self, directory: Path, gateway: str) -> None:
        self.directory = directory
        self.path = directory / HEARTBEAT_FILE
        self._temporary = directory / f"{HEARTBEAT_FILE}.tmp"
        self._gateway = gateway

    def read(self) -> Heartbeat | None:
        """What the previous process left (None: no file). A file that cannot be understood (a node crash can
        leave an empty one) counts as an unclean stop at the file's modification time."""
        try:
            data = self.path.read_bytes()
            modified_ms = self.path.stat().st_mtime_ns // 1_000_000
        except FileNotFoundError:
            return None
        try:
            raw = orjson.loads(data)
            alive_at, clean = raw["alive_at"], raw["clean"]
            if not isinstance(alive_at, int) or isinstance(alive_at, bool) or not isinstance(clean, bool):
                raise TypeError("alive_at or clean of the wrong type")
            pending = tuple(
                Window(str(item["reason"]), int(item["start"]), int(item["end"])) for item in raw["pending"]
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log.warning(
                "heartbeat file unreadable; taking it for an unclean stop at its modification time",
                extra={"path": str(self.path), "error": repr(exc)},
            )
            return Heartbeat(modified_ms, clean=False)
        return Heartbeat(alive_at, clean, pending)

    def write(self, beat: Heartbeat, *, sync: bool) -> None:
        document: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "gateway": self._gateway,
            "alive_at": beat.alive_at,
            "clean": beat.clean,
            "pending": [window._asdict() for window in beat.pending],
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, orjson.dumps(document))
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self._temporary, self.path)
        if sync:
            directory = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)


# --- the reporter ---------------------------------------------------------------------------------------------


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class GapReporter:
    """Keeps the heartbeat, hears every webhook answer, and publishes the markers in a background task.

    Its life follows the app's: :meth:`recover` first thing at start, :meth:`start` once the publisher runs,
    :meth:`answered` for every webhook answer, :meth:`stop` before the publisher stops (what is still open is
    published or spooled while it can be), :meth:`stopped` after the publisher's drain (the clean-stop mark).
    """

    def __init__(
        self,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        *,
        clock_ms: Callable[[], int] = _wall_ms,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.gateway = settings.instance_name()
        self._metrics = metrics
        self._topic = settings.topic_raw
        self._budget = settings.gateway_publish_budget_seconds
        self._interval = settings.gateway_heartbeat_seconds
        self._clock_ms = clock_ms
        self._monotonic = monotonic
        self.file = (
            HeartbeatFile(settings.gateway_spool_dir, self.gateway)
            if settings.gateway_heartbeat_seconds
            else None
        )
        self.tracker = GapTracker(
            quiet_ms=int(settings.gateway_gap_quiet_seconds * 1000),
            max_ms=int(settings.gateway_gap_max_seconds * 1000),
        )
        self.outbox = Outbox()
        self._unclean: Window | None = None
        self._publisher: Publisher | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._next_beat = 0.0
        self._retry_at = 0.0

    # -- lifecycle --------------------------------------------------------------------------------------------

    def recover(self) -> None:
        """Read what the previous process left and write this one's first heartbeat (fsync'd), which keeps what
        is owed: a crash before it is published leaves it in the file for the next start."""
        if self.file is None:
            return
        now = self._clock_ms()
        try:
            previous = self.file.read()
        except OSError as exc:
            log.error(
                "cannot read the heartbeat file; unclean stops go unmarked",
                extra={"path": str(self.file.path), "error": repr(exc)},
            )
            self.file = None
            return
        for window in recovered(previous, now):
            if window.reason == "unclean_stop":
                self._unclean = window
                log.warning(
                    "the previous run did not stop cleanly; marking an intake gap from its last heartbeat",
                    extra={"gateway": self.gateway, "last_heartbeat": window.start},
                )
            else:
                self.outbox.add(window)
        if not self._beat(now, sync=True):
            self.file = None

    def start(self, publisher: Publisher) -> None:
        """The gateway serves from now on: an unclean stop's window ends here; start publishing and beating."""
        self._publisher = publisher
        if self._unclean is not None:
            self.outbox.add(self._unclean._replace(end=max(self._unclean.start, self._clock_ms())))
            self._unclean = None
        self._task = asyncio.create_task(self._run(), name="gateway-gaps")

    async def stop(self) -> None:
        """Close the open windows and publish (or spool) what is owed, one attempt each within the publish
        budget; the publisher is still running."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for closed in self.tracker.flush():
            self.outbox.add(closed)
        while (window := self.outbox.take()) is not None:
            handed_off = await self._hand_off(window)
            self.outbox.done(handed_off)
            if not handed_off:
                break

    def stopped(self) -> None:
        """After the publisher's drain: the clean-stop mark, with what could not be published for the next
        start."""
        if self.file is not None:
            pending = tuple(self.outbox.windows())
            try:
                self.file.write(Heartbeat(self._clock_ms(), clean=True, pending=pending), sync=True)
            except OSError as exc:
                log.error("cannot write the clean-stop mark", extra={"error": repr(exc)})

    # -- the request path -------------------------------------------------------------------------------------

    def answered(self, status: int, seconds: float) -> None:
        """A webhook request was answered ``status`` after ``seconds``."""
        if status == 200 and seconds * 1000 < UPSTREAM_TIMEOUT_MS:
            return
        duration_ms = seconds * 1000
        reason = answer_gap_reason(status, duration_ms)
        if reason is None:
            return
        now = self._clock_ms()
        if self.tracker.failed(reason, now - int(duration_ms), now, now):
            # The background task learns the new window's quiet deadline.
            self._wake.set()

    # -- the background task ----------------------------------------------------------------------------------

    async def _run(self) -> None:
        self._next_beat = self._monotonic() + self._interval
        self._retry_at = 0.0
        while not self._stopping:
            # Cleared before the step, so a wake-up during the step is not lost.
            self._wake.clear()
            try:
                delay = await self._step()
            except Exception:  # noqa: BLE001 - the task must outlive any one bad step
                log.exception("intake-gap task step failed")
                self.outbox.done(handed_off=False)
                delay = RETRY_SECONDS
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)

    async def _step(self) -> float:
        """Publish what is due, beat if it is time; how long to wait before the next step."""
        for closed in self.tracker.due(self._clock_ms()):
            self.outbox.add(closed)
        if len(self.outbox) and self._monotonic() >= self._retry_at:
            window = self.outbox.take()
            if window is not None:
                handed_off = await self._hand_off(window)
                self.outbox.done(handed_off)
                if handed_off:
                    return 0.0
                self._retry_at = self._monotonic() + RETRY_SECONDS
        now = self._monotonic()
        if self.file is not None and now >= self._next_beat:
            await asyncio.to_thread(self._beat, self._clock_ms(), sync=False)
            self._next_beat = now + self._interval
        delay = (self._next_beat - now) if self.file is not None else 60.0
        if len(self.outbox):
            delay = min(delay, self._retry_at - now)
        due_ms = self.tracker.next_due_ms()
        if due_ms is not None:
            delay = min(delay, (due_ms - self._clock_ms()) / 1000)
        return max(0.01, delay)

    def _beat(self, now_ms: int, *, sync: bool) -> bool:
        assert self.file is not None  # noqa: S101 - only called with a file
        pending = [*self.outbox.windows(), *self.tracker.open_windows()]
        if self._unclean is not None:
            pending.append(self._unclean._replace(end=now_ms))
        try:
            self.file.write(Heartbeat(now_ms, clean=False, pending=tuple(pending)), sync=sync)
        except OSError as exc:
            log.error(
                "cannot write the heartbeat file; unclean stops may go unmarked",
                extra={"path": str(self.file.path), "error": repr(exc)},
            )
            return False
        return True

    async def _hand_off(self, window: Window) -> bool:
        """Publish one marker to every RAW partition, or spool it; False if neither could be done."""
        publisher = self._publisher
        if publisher is None:
            return False
        marker = marker_of(window, self.gateway)
        record = SpoolRecord(self._topic, None, encode_gap_marker(marker), ALL_PARTITIONS)
        publication = publisher.begin([record], deadline=self._monotonic() + self._budget)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._budget):
                await publication.acknowledged()
        try:
            delivery = await publisher.finish(publication)
        except Unavailable as exc:
            log.error(
                "cannot publish an intake-gap marker: kafka unavailable and spool unusable; retrying",
                extra={"gap": marker.id, "error": str(exc)},
            )
            return False
        counter = self._metrics.gap_markers_by_reason.get(marker.reason)
        if counter is not None:  # a reason from an older heartbeat file the metric does not know
            counter.inc()
        log.warning(
            "intake gap marked",
            extra={
                "gap": marker.id,
                "reason": marker.reason,
                "start": marker.start,
                "end": marker.end,
                "delivery": delivery.value,
            },
        )
        return True
