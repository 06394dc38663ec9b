"""Baseline (a): the worker's job as a bare aiokafka consume -> apply -> produce loop, without Faust.

The same :class:`streams.processor.Processor` (so the same pure state machine and the same TRANSITIONS and STATE
payloads), and an equivalent changelog write: every table write is sent to a compacted changelog topic, in the
partition of the source message, as Faust does. The table itself is a dict (no RocksDB), so this is the upper
bound for Python on this broker. Offsets are committed every ``--commit-interval`` seconds after the producer
has flushed (at-least-once, as the worker).

``python -m bench.bare_loop --bootstrap H:P --group G --raw T --transitions T --state T --changelog T``
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from collections.abc import Iterator, MutableMapping
from typing import Any

import uvloop
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from streams.processor import Processor
from streams.rules import PresenceConfig


class ChangelogTable(MutableMapping[str, Any]):
    """A dict whose every write is also sent to a changelog topic (the Faust table's contract)."""

    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self._data: dict[str, Any] = {}
        self._producer = producer
        self._topic = topic
        self.partition = 0
        self.pending: list[tuple[bytes, bytes | None, int]] = []

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    def __setitem__(self, key: str, value: Any) -> None:
        self._data[key] = value
        self.pending.append((key.encode(), value if isinstance(value, bytes) else str(value).encode(),
                             self.partition))  # fmt: skip

    def __delitem__(self, key: str) -> None:
        del self._data[key]
        self.pending.append((key.encode(), None, self.partition))

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


async def run(args: argparse.Namespace) -> None:
    consumer = AIOKafkaConsumer(
        args.raw, bootstrap_servers=args.bootstrap, group_id=args.group, enable_auto_commit=False,
        auto_offset_reset="earliest", max_poll_records=10_000, fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )  # fmt: skip
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap, acks="all", linger_ms=args.linger_ms,
                                max_batch_size=256 * 1024)  # fmt: skip
    await producer.start()
    await consumer.start()
    table = ChangelogTable(producer, args.changelog)
    processor = Processor(table, PresenceConfig(), lambda _p: ())
    topics = {"transitions": args.transitions, "state": args.state, "dlq": args.state}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    next_commit = time.monotonic() + args.commit_interval
    send = producer.send
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=100, max_records=5000)
            for tp, messages in batch.items():
                partition = tp.partition
                table.partition = partition
                for message in messages:
                    now = time.time_ns() // 1_000_000
                    outgoing = processor.on_raw(partition, message.offset, message.key, message.value, now)
                    for key, value, part in table.pending:
                        await send(args.changelog, key=key, value=value, partition=part)
                    table.pending.clear()
                    for out in outgoing:
                        await send(topics[out.topic], key=out.key, value=out.value)
            if time.monotonic() >= next_commit:
                await producer.flush()
                await consumer.commit()
                next_commit = time.monotonic() + args.commit_interval
    finally:
        await producer.flush()
        await consumer.commit()
        await consumer.stop()
        await producer.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("bootstrap", "group", "raw", "transitions", "state", "changelog"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--commit-interval", type=float, default=1.0)
    parser.add_argument("--linger-ms", type=int, default=5)
    uvloop.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
