"""The durable local spool (G7): fsync'd, append-only segment files that outlive the process.

A segment is a sequence of frames ``[u32 length][u32 crc32][payload]``; the payload holds one Kafka record
(topic, key, value, and the partition when the record names one: see :class:`SpoolRecord`). Segments are named
``<sequence>-<created epoch ms>.seg`` so that name order is age order.
An append is durable when :meth:`Spool.append` returns: the bytes are written and fsync'd (and the directory too
when the segment is new). A crash mid-append leaves a torn last frame, which reading stops at; nobody was told
those events were accepted.

Blocking file I/O: callers on an event loop run these methods in a worker thread. Methods are thread-safe.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

_FRAME = struct.Struct(">II")
_HEADER = struct.Struct(">Hi")
_PARTITION = struct.Struct(">i")
# Set in the header's topic length when a partition follows the header. Kafka topic names have at most 249
# characters, so the bit is never part of a length, and frames written before partitions existed read unchanged.
_HAS_PARTITION = 0x8000
_SUFFIX = ".seg"
MAX_FRAME_BYTES = 16 * 1024 * 1024


class SpoolFull(Exception):
    """The spool cannot take these records without exceeding its size limit."""


# A record's ``partition`` that asks for one copy on every partition of its topic (an intake-gap marker).
ALL_PARTITIONS: Final = -1


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    """One Kafka record. ``partition``: None for the partition of the key (Kafka's default partitioner; records
    without a key take turns), :data:`ALL_PARTITIONS` for one copy on each partition, else that partition."""

    topic: str
    key: bytes | None
    value: bytes
    partition: int | None = None

    def encode(self) -> bytes:
        topic = self.topic.encode("utf-8")
        key_length = -1 if self.key is None else len(self.key)
        if self.partition is None:
            header = _HEADER.pack(len(topic), key_length)
        else:
            header = _HEADER.pack(len(topic) | _HAS_PARTITION, key_length) + _PARTITION.pack(self.partition)
        payload = header + topic + (self.key or b"") + self.value
        return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload

    @classmethod
    def decode(cls, payload: bytes) -> SpoolRecord:
        topic_length, key_length = _HEADER.unpack_from(payload)
        start = _HEADER.size
        partition = None
        if topic_length & _HAS_PARTITION:
            topic_length &= ~_HAS_PARTITION
            (partition,) = _PARTITION.unpack_from(payload, start)
            start += _PARTITION.size
        topic = payload[start : start + topic_length].decode("utf-8")
        start += topic_length
        key = None
        if key_length >= 0:
            key = payload[start : start + key_length]
            start += key_length
        return cls(topic=topic, key=key, value=payload[start:], partition=partition)


@dataclass(slots=True)
class Segment:
    sequence: int
    created_ms: int
    path: Path
    size: int
    records: int


@dataclass(frozen=True, slots=True)
class SegmentContents:
    segment: Segment
    records: list[SpoolRecord]
    damaged: bool


def read_frames(data: bytes) -> tuple[list[SpoolRecord], int]:
    """The records of a segment's bytes, and the offset where the intact frames end."""
    records: list[SpoolRecord] = []
    offset = 0
    while offset + _FRAME.size <= len(data):
        length, crc = _FRAME.unpack_from(data, offset)
        end = offset + _FRAME.size + length
        if length > MAX_FRAME_BYTES or end > len(data):
            break
        payload = data[offset + _FRAME.size : end]
        if zlib.crc32(payload) != crc:
            break
        try:
            records.append(SpoolRecord.decode(payload))
        except (struct.error, UnicodeDecodeError):
            break
        offset = end
    return records, offset


class Spool:
    """Append-only segments in one directory, drained oldest first, bounded in total size."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        segment_bytes: int,
        clock_ms: Callable[[], int],
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._clock_ms = clock_ms
        self._lock = threading.Lock()
        self._sealed: list[Segment] = []
        self._active: Segment | None = None
        self._active_fd: int | None = None
        self._next_sequence = 1
        self._bytes = 0
        self._records = 0
        self.damaged_segments = 0

    # -- lifecycle --------------------------------------------------------------------------------------------

    def open(self) -> None:
        """Create the directory if needed and take over the segments a previous process left."""
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / ".write-probe"
            probe.write_bytes(b"")
            probe.unlink()
            found: list[Segment] = []
            for path in self.directory.iterdir():
                segment = self._parse_name(path)
                if segment is not None:
                    found.append(segment)
            found.sort(key=lambda s: s.sequence)
            for segment in found:
                records, _ = read_frames(segment.path.read_bytes())
                segment.records = len(records)
            self._sealed = found
            self._bytes = sum(s.size for s in found)
            self._records = sum(s.records for s in found)
            self._next_sequence = (found[-1].sequence + 1) if found else 1
        if found:
            log.info(
                "spool recovered",
                extra={"segments": len(found), "records": self._records, "bytes": self._bytes},
            )

    def close(self) -> None:
        with self._lock:
            self._seal_active()

    @staticmethod
    def _parse_name(path: Path) -> Segment | None:
        if path.suffix != _SUFFIX or not path.is_file():
            return None
        sequence, sep, created = path.stem.partition("-")
        if not sep or not sequence.isdigit() or not created.isdigit():
            return None
        return Segment(int(sequence), int(created), path, path.stat().st_size, 0)

    # -- state ------------------------------------------------------------------------------------------------

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def records(self) -> int:
        return self._records

    @property
    def segments(self) -> int:
        return len(self._sealed) + (1 if self._active is not None else 0)

    def has_room(self, nbytes: int = 1) -> bool:
        return self._bytes + nbytes <= self.max_bytes

    def oldest_age_ms(self) -> int:
        """How long the oldest spooled record has waited (0 when empty)."""
        with self._lock:
            oldest = self._sealed[0] if self._sealed else self._active
            if oldest is None or self._records == 0:
                return 0
            return max(0, self._clock_ms() - oldest.created_ms)

    # -- writing ----------------------------------------------------------------------------------------------

    def append(self, records: Sequence[SpoolRecord]) -> None:
        """Write the records durably, or raise :class:`SpoolFull` and write nothing."""
        if not records:
            return
        data = b"".join(record.encode() for record in records)
        with self._lock:
            if self._bytes + len(data) > self.max_bytes:
                raise SpoolFull(f"{len(data)} bytes would exceed the spool's {self.max_bytes}")
            if self._active is not None and self._active.size > 0:
                if self._active.size + len(data) > self.segment_bytes:
                    self._seal_active()
            if self._active is None:
                self._open_active()
            assert self._active is not None and self._active_fd is not None  # noqa: S101
            start = self._active.size
            try:
                written = 0
                while written < len(data):
                    written += os.write(self._active_fd, data[written:])
                os.fsync(self._active_fd)
            except OSError:
                # Leave no half-written frames behind a failure we reported.
                try:
                    os.ftruncate(self._active_fd, start)
                    os.fsync(self._active_fd)
                except OSError:
                    log.exception("spool could not roll back a failed append; sealing the segment")
                self._seal_active()
                raise
            self._active.size += len(data)
            self._active.records += len(records)
            self._bytes += len(data)
            self._records += len(records)

    def _open_active(self) -> None:
        sequence = self._next_sequence
        self._next_sequence += 1
        path = self.directory / f"{sequence:012d}-{self._clock_ms()}{_SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        self._fsync_directory()
        self._active = Segment(sequence, self._clock_ms(), path, 0, 0)
        self._active_fd = fd

    def _seal_active(self) -> None:
        if self._active_fd is not None:
            os.close(self._active_fd)
            self._active_fd = None
        if self._active is not None:
            if self._active.size == 0:
                self._active.path.unlink(missing_ok=True)
            else:
                self._sealed.append(self._active)
            self._active = None

    def _fsync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- draining ---------------------------------------------------------------------------------------------

    def oldest(self) -> SegmentContents | None:
        """The oldest segment and its records, sealing the active one if it is all there is."""
        with self._lock:
            if not self._sealed and self._active is not None and self._active.size > 0:
                self._seal_active()
            if not self._sealed:
                return None
            segment = self._sealed[0]
        data = segment.path.read_bytes()
        records, end = read_frames(data)
        damaged = end < len(data)
        if damaged:
            log.error(
                "spool segment has unreadable bytes after its last intact frame",
                extra={
                    "segment": segment.path.name,
                    "intact_records": len(records),
                    "bad_bytes": len(data) - end,
                },
            )
        return SegmentContents(segment, records, damaged)

    def remove(self, contents: SegmentContents) -> None:
        """Forget a segment whose records are all in Kafka; damaged ones are kept aside for inspection."""
        segment = contents.segment
        with self._lock:
            if segment not in self._sealed:
                return
            if contents.damaged:
                damaged_dir = self.directory / "damaged"
                damaged_dir.mkdir(exist_ok=True)
                segment.path.rename(damaged_dir / segment.path.name)
                self.damaged_segments += 1
            else:
                segment.path.unlink(missing_ok=True)
            self._fsync_directory()
            self._sealed.remove(segment)
            self._bytes -= segment.size
            self._records -= segment.records
