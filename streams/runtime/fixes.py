"""A correction to faust-streaming that the processing guarantee (S10) depends on.

Table writes reach Kafka through Faust's ``ProducerBuffer``: ``table[key] = value`` only queues the changelog
message, and a background task hands it to the Kafka client later. Before committing offsets Faust calls
``ProducerBuffer.flush()``, which gives up after 0.1 s without progress and never waits for a message the
background task has taken but not yet handed over. A commit can then cover a message whose table write never
reached the changelog; after a crash the restored table silently lacks that write (seen in our kill -9 test as
users whose final record missed a session).

The replacement ``flush`` hands every queued message to the client itself and then waits until every changelog
message queued so far is acknowledged by Kafka, so a commit only ever covers durable table writes. A failed
send raises, which aborts the commit and lets the messages be processed again.
"""

from __future__ import annotations

import asyncio
from typing import Any

from faust.transport.producer import ProducerBuffer

_UNACKED = "_presence_unacked"


def install() -> None:
    """Patch ``ProducerBuffer`` once per process (idempotent)."""
    if getattr(ProducerBuffer, "_presence_fixed", False):
        return
    original_put = ProducerBuffer.put

    def put(self: Any, fut: Any) -> None:
        unacked: set[Any] = self.__dict__.setdefault(_UNACKED, set())
        unacked.add(fut)
        fut.add_done_callback(unacked.discard)
        original_put(self, fut)

    async def flush(self: Any) -> None:
        while not self.pending.empty():
            await self._send_pending(self.pending.get_nowait())
            self.message_sent.set()
        unacked = list(self.__dict__.get(_UNACKED, ()))
        if unacked:
            await asyncio.gather(*unacked)

    ProducerBuffer.put = put  # type: ignore[method-assign]
    ProducerBuffer.flush = flush  # type: ignore[method-assign]
    ProducerBuffer._presence_fixed = True  # type: ignore[attr-defined]


def hold_commit_until_acked(producer: Any, sent: asyncio.Future[Any]) -> None:
    """Make the next offset commit wait for ``sent`` (a message handed to the Kafka client directly).

    The client's own flush, which Faust also calls before a commit, waits for delivery but not for success; the
    patched ``flush`` awaits ``sent`` and so raises if it failed.
    """
    unacked: set[Any] = producer.buffer.__dict__.setdefault(_UNACKED, set())
    unacked.add(sent)
    sent.add_done_callback(unacked.discard)
