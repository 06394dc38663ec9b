"""The durable spool (G7): fsync'd segments, oldest first, bounded, surviving a restart."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.spool import Spool, SpoolFull, SpoolRecord, read_frames


class Clock:
    def __init__(self) -> None:
        self.now = 1_000

    def __call__(self) -> int:
        return self.now


def make(
    directory: Path, *, max_bytes: int = 1 << 20, segment_bytes: int = 4096, clock: Clock | None = None
) -> Spool:
    spool = Spool(directory, max_bytes=max_bytes, segment_bytes=segment_bytes, clock_ms=clock or Clock())
    spool.open()
    return spool


def rec(i: int, key: bytes | None = b"u") -> SpoolRecord:
    return SpoolRecord("raw", key, f'{{"i":{i}}}'.encode())


def drain(spool: Spool) -> list[SpoolRecord]:
    out: list[SpoolRecord] = []
    while (contents := spool.oldest()) is not None:
        out.extend(contents.records)
        spool.remove(contents)
    return out


def test_g7_roundtrip_in_order_across_segments(tmp_path: Path) -> None:
    spool = make(tmp_path, segment_bytes=200)
    records = [rec(i) for i in range(50)]
    for r in records:
        spool.append([r])
    assert spool.records == 50
    assert spool.segments > 3
    assert drain(spool) == records
    assert (spool.records, spool.bytes) == (0, 0)
    assert list(tmp_path.glob("*.seg")) == []


def test_g7_record_fields_survive(tmp_path: Path) -> None:
    spool = make(tmp_path)
    records = [
        SpoolRecord("dlq", None, b""),
        SpoolRecord("t\u00e9", b"", b"\x00\xff"),
        rec(1, key="é".encode()),
    ]
    spool.append(records)
    assert drain(spool) == records


def test_g7_survives_a_restart(tmp_path: Path) -> None:
    spool = make(tmp_path, segment_bytes=100)
    for i in range(10):
        spool.append([rec(i)])
    # no close(): a crash leaves the active segment open
    again = make(tmp_path)
    assert again.records == 10
    again.append([rec(10)])
    assert drain(again) == [rec(i) for i in range(11)]


def test_g7_torn_tail_is_ignored_and_set_aside(tmp_path: Path) -> None:
    spool = make(tmp_path)
    spool.append([rec(1), rec(2)])
    spool.close()
    (segment,) = tmp_path.glob("*.seg")
    with segment.open("ab") as f:
        f.write(rec(3).encode()[:-2])
    again = make(tmp_path)
    assert again.records == 2
    contents = again.oldest()
    assert contents is not None
    assert contents.records == [rec(1), rec(2)]
    assert contents.damaged
    again.remove(contents)
    assert again.records == 0
    assert len(list((tmp_path / "damaged").iterdir())) == 1


def test_g7_corrupt_frame_stops_reading() -> None:
    data = bytearray(rec(1).encode() + rec(2).encode())
    data[-1] ^= 0xFF
    records, end = read_frames(bytes(data))
    assert records == [rec(1)]
    assert end == len(rec(1).encode())


def test_g7_full_spool_refuses_and_writes_nothing(tmp_path: Path) -> None:
    one = len(rec(1).encode())
    spool = make(tmp_path, max_bytes=64 * 1024, segment_bytes=64 * 1024)
    count = (64 * 1024) // one
    spool.append([rec(1)] * count)
    before = spool.bytes
    with pytest.raises(SpoolFull):
        spool.append([rec(0), rec(1)])
    assert spool.bytes == before
    assert sum(p.stat().st_size for p in tmp_path.glob("*.seg")) == before
    assert not spool.has_room(one * 2)


def test_g7_oldest_age(tmp_path: Path) -> None:
    clock = Clock()
    spool = make(tmp_path, clock=clock)
    assert spool.oldest_age_ms() == 0
    spool.append([rec(1)])
    clock.now += 2500
    assert spool.oldest_age_ms() == 2500


def test_g7_segment_names_sort_by_age_after_restart(tmp_path: Path) -> None:
    spool = make(tmp_path, segment_bytes=10)
    for i in range(3):
        spool.append([rec(i)])
    again = make(tmp_path, segment_bytes=10)
    again.append([rec(3)])
    names = sorted(p.name for p in tmp_path.glob("*.seg"))
    assert len(names) == 4
    assert drain(again) == [rec(i) for i in range(4)]


def test_g7_files_are_private(tmp_path: Path) -> None:
    spool = make(tmp_path)
    spool.append([rec(1)])
    (segment,) = tmp_path.glob("*.seg")
    assert os.stat(segment).st_mode & 0o077 == 0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.binary(max_size=300), min_size=1, max_size=5), max_size=20))
def test_g7_any_sequence_of_appends_drains_in_order(
    tmp_path_factory: pytest.TempPathFactory, batches: list[list[bytes]]
) -> None:
    spool = make(tmp_path_factory.mktemp("spool"), segment_bytes=512)
    expected = []
    for batch in batches:
        records = [SpoolRecord("raw", b"k", value) for value in batch]
        spool.append(records)
        expected.extend(records)
    assert drain(spool) == expected
