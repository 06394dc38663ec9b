"""Baseline (b): the worker's job written with quixstreams, the peer a user would pick instead of Faust.

Per message: the same :class:`streams.processor.Processor` (same state machine, same TRANSITIONS and STATE
payloads) over quixstreams' per-key RocksDB state with its changelog topic, outputs sent with ``to_topic``.
Records are stored as the processor encodes them (identity serializers), as in the Faust table. Quixstreams'
state is bound to the message's key, so sweeps of other users cannot run here; the benchmark's backlog spans
less event time than the retention, so the worker has none to do either. Stream time per partition lives in
memory (the worker keeps it in a second table).

``python -m bench.quix_job --bootstrap H:P --group G --raw T --transitions T --state T --state-dir D``
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Iterator, MutableMapping
from typing import Any

import orjson
from quixstreams import Application, message_context
from quixstreams.models import Serializer
from quixstreams.state import State
from quixstreams.state.rocksdb import RocksDBOptions

from streams.processor import Outgoing, Processor, is_user_key
from streams.rules import PresenceConfig

_RECORD = "record"


class StateTable(MutableMapping[str, Any]):
    """The current message's quixstreams state seen as the processor's table (one key: the message's user)."""

    def __init__(self) -> None:
        self.state: State[Any, Any] | None = None
        # The processor's per-partition keys (stream time) are no user's: kept in memory, not in a user's state.
        self.partition_keys: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        if not is_user_key(key):
            return self.partition_keys.get(key, default)
        assert self.state is not None
        return self.state.get(_RECORD, default)

    def __getitem__(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        if not is_user_key(key):
            self.partition_keys[key] = value
            return
        assert self.state is not None
        self.state.set(_RECORD, value)

    def __delitem__(self, key: str) -> None:
        assert self.state is not None
        self.state.delete(_RECORD)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


class OutgoingValue(Serializer):
    """The processor's encoded value as is (the backlog causes no deletes, hence no tombstones)."""

    def __call__(self, *args: Any, **kwargs: Any) -> str | bytes:
        outgoing: Outgoing = args[0]
        return outgoing.value if outgoing.value is not None else b""


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("bootstrap", "group", "raw", "transitions", "state", "state-dir"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--commit-interval", type=float, default=1.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    def dumps(value: Any) -> bytes:
        # Records are already encoded; keys (the state's own names) are JSON as quixstreams makes them.
        return value if isinstance(value, bytes) else orjson.dumps(value)

    def loads(value: bytes) -> Any:
        return value

    app = Application(
        broker_address=args.bootstrap, consumer_group=args.group, auto_offset_reset="earliest",
        commit_interval=args.commit_interval, state_dir=args.state_dir, loglevel="WARNING",
        rocksdb_options=RocksDBOptions(dumps=dumps, loads=loads),
        processing_guarantee="at-least-once",
    )  # fmt: skip
    raw = app.topic(args.raw, key_deserializer="bytes", value_deserializer="bytes")
    out = {
        "transitions": app.topic(args.transitions, key_serializer="bytes", value_serializer=OutgoingValue()),
        "state": app.topic(args.state, key_serializer="bytes", value_serializer=OutgoingValue()),
    }
    out["dlq"] = out["state"]
    table = StateTable()
    processor = Processor(table, PresenceConfig(), lambda _p: ())

    def handle(
        value: bytes, key: bytes, timestamp: int, headers: Any, state: State[Any, Any]
    ) -> list[Outgoing]:
        context = message_context()
        table.state = state
        return processor.on_raw(context.partition, context.offset, key, value, time.time_ns() // 1_000_000)

    sdf = app.dataframe(raw)
    sdf = sdf.apply(handle, stateful=True, expand=True, metadata=True)
    sdf.to_topic(lambda value, key, ts, headers: out[value.topic])
    app.run()


if __name__ == "__main__":
    main()
