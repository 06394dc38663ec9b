"""A correction to faust-streaming that the processing guarantee (S10) depends on, applied to one app only.

Before committing offsets Faust flushes its producer, which calls ``ProducerBuffer.flush()``. Faust's flush
gives up after 0.1 s without progress and never waits for a message the buffer's background task has taken
but not yet handed to the Kafka client, nor for Kafka's acknowledgement. A commit could then cover a message
whose output never reached Kafka; after a crash it is lost (seen in the kill -9 test as users whose final
record missed a session, when table writes still went through the buffer).

:func:`install` replaces ``put`` and ``flush`` on one app's buffer instance (the class and every other app are
left alone): the new ``flush`` hands every queued message to the client itself and then waits until every
message put so far, and every send held with :meth:`CommitGate.hold`, is acknowledged. A failed send raises,
which aborts the commit (Faust crashes its consumer and with it the app), so the messages are processed again; it
raises even when it failed long before the commit, which a gate that merely forgot settled sends would miss.
"""

from __future__ import annotations

import asyncio
from typing import Any

from streams.runtime import internals


class CommitGate:
    """Sends the next offset commit waits for (and fails with)."""

    def __init__(self) -> None:
        self._unacked: set[asyncio.Future[Any]] = set()

    def hold(self, sent: asyncio.Future[Any]) -> None:
        """Make the next commit wait for ``sent``: a message handed to the Kafka client, not yet acknowledged.

        The client's own flush, which Faust also calls before a commit, waits for delivery but not for success;
        :meth:`wait` awaits ``sent`` and so raises if it failed.
        """
        self._unacked.add(sent)
        sent.add_done_callback(self._acknowledged)

    def _acknowledged(self, sent: asyncio.Future[Any]) -> None:
        # Only a success is forgotten. A failed (or cancelled) send stays, so every later commit raises it:
        # forgetting it would let the next commit cover a write Kafka never got.
        if not sent.cancelled() and sent.exception() is None:
            self._unacked.discard(sent)

    def __len__(self) -> int:
        return len(self._unacked)

    async def wait(self) -> None:
        """Return once every held send is acknowledged; raise if one failed (now or before)."""
        if self._unacked:
            await asyncio.gather(*list(self._unacked))


def install(producer: Any) -> CommitGate:
    """Patch the ``ProducerBuffer`` of one Faust ``producer``; return the gate its flush waits on."""
    buffer = producer.buffer
    gate = CommitGate()
    original_put = buffer.put

    def put(fut: Any) -> None:
        gate.hold(fut)
        original_put(fut)

    async def flush() -> None:
        await internals.drain_producer_buffer(buffer)
        await gate.wait()

    # Instance attributes shadow the class's methods for this buffer only; Faust calls them through the
    # instance (Producer.send_soon, Producer.flush, the buffer's on_stop).
    buffer.put = put
    buffer.flush = flush
    return gate
