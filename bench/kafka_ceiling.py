"""The Kafka ceiling: a bare aiokafka producer with the gateway's settings, publishing request-sized batches.

``concurrency`` tasks each send a batch of ``events`` RAW records (idempotent, acks=all, the gateway's linger)
and wait for every acknowledgement, as a request does, then start the next one. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import orjson
import uvloop
from aiokafka import AIOKafkaProducer

from bench.traffic import raw_event


async def run(
    bootstrap: str, topic: str, events: int, concurrency: int, seconds: float, linger_ms: int
) -> dict[str, object]:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=linger_ms,
        retry_backoff_ms=100, client_id="bench-kafka-ceiling",
    )  # fmt: skip
    await producer.start()
    now = time.time_ns() // 1_000_000
    batches = [
        [
            (
                f"user-{(b * events + i) % 1_000_000:07d}".encode(),
                orjson.dumps(
                    raw_event(
                        f"user-{(b * events + i) % 1_000_000:07d}", f"s-{b}-{i}", 0, now, "iOS", f"k:{b}:{i}"
                    )
                ),
            )  # fmt: skip
            for i in range(events)
        ]
        for b in range(64)
    ]
    latencies: list[float] = []
    sent = 0
    stop_at = time.monotonic() + seconds

    async def loop(n: int) -> None:
        nonlocal sent
        b = n
        while time.monotonic() < stop_at:
            started = time.monotonic()
            futures = [await producer.send(topic, key=k, value=v) for k, v in batches[b % len(batches)]]
            await asyncio.gather(*futures)
            latencies.append(time.monotonic() - started)
            sent += len(futures)
            b += concurrency

    started, cpu_started = time.monotonic(), time.process_time()
    await asyncio.gather(*(loop(n) for n in range(concurrency)))
    elapsed, cpu = time.monotonic() - started, time.process_time() - cpu_started
    await producer.stop()
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q / 100 * len(latencies)))] * 1000 if latencies else 0.0

    return {"events": sent, "batches": len(latencies), "seconds": elapsed, "cpu_seconds": cpu,
            "latency_ms": {"p50": pct(50), "p99": pct(99), "p999": pct(99.9)}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--events", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--linger-ms", type=int, default=2)
    args = parser.parse_args()
    result = uvloop.run(
        run(args.bootstrap, args.topic, args.events, args.concurrency, args.seconds, args.linger_ms)
    )
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
