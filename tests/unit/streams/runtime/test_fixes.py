"""The commit fix (S10) on Faust's real producer buffer: a commit waits until what it covers is acknowledged.

Faust awaits ``app.producer.flush()`` before every offset commit (``Consumer._commit_offsets``); these tests
call that same method on a real ``faust.App``'s producer, with messages whose acknowledgement the test controls.
"""

from __future__ import annotations

import asyncio
from typing import Any

import faust
import pytest
from aiokafka.errors import KafkaTimeoutError
from faust.transport.producer import ProducerBuffer
from faust.types.tuples import FutureMessage, PendingMessage

from streams.runtime import fixes


class RecordedChannel:
    """Stands in for the topic a buffered message is for: ``publish_message`` hands it to "the client"."""

    def __init__(self) -> None:
        self.published: list[FutureMessage] = []

    async def publish_message(self, fut: FutureMessage, wait: bool = False) -> FutureMessage:
        self.published.append(fut)
        return fut


def buffered(channel: RecordedChannel) -> FutureMessage:
    return FutureMessage(PendingMessage(channel, b"k", b"v", 0, None, None, "raw", "raw", None))  # type: ignore[arg-type]


def new_app(name: str) -> faust.App:
    return faust.App(name, broker="kafka://127.0.0.1:9", store="memory://", autodiscover=False)


async def settle() -> None:
    """Let every ready task run (no timing involved: the tasks here never wait on anything but futures)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_only_the_given_apps_buffer_is_patched() -> None:
    patched, other = new_app("patched"), new_app("other")
    fixes.install(patched.producer)
    assert "flush" in vars(patched.producer.buffer) and "put" in vars(patched.producer.buffer)
    assert "flush" not in vars(other.producer.buffer) and "put" not in vars(other.producer.buffer)
    assert other.producer.buffer.flush.__func__ is ProducerBuffer.flush
    assert ProducerBuffer.__dict__["flush"].__module__ == "faust.transport.producer"


async def test_stock_flush_returns_before_kafka_acknowledges() -> None:
    """Why the fix exists. If this starts failing after an upgrade, Faust may have fixed it upstream."""
    app = new_app("stock")
    buffer = app.producer.buffer
    channel = RecordedChannel()
    message = buffered(channel)
    buffer.put(message)
    # Faust's background task takes the message off the queue before handing it to the client...
    taken = buffer.pending.get_nowait()
    # ...and meanwhile the commit path flushes: nothing is queued, so it returns at once.
    await asyncio.wait_for(buffer.flush(), timeout=5)
    assert taken is message and not message.done(), "flushed although the message is not even sent"


async def test_flush_hands_queued_messages_over_and_waits_for_their_acknowledgement() -> None:
    app = new_app("fixed")
    fixes.install(app.producer)
    channel = RecordedChannel()
    message = buffered(channel)
    app.producer.buffer.put(message)

    flushing = asyncio.ensure_future(app.producer.flush())
    await settle()
    assert channel.published == [message], "flush must hand the queued message to the client itself"
    assert not flushing.done(), "the commit must wait for Kafka's acknowledgement"
    message.set_result(object())
    await asyncio.wait_for(flushing, timeout=5)


async def test_a_failed_send_fails_the_flush_so_nothing_is_committed() -> None:
    app = new_app("failing")
    fixes.install(app.producer)
    message = buffered(RecordedChannel())
    app.producer.buffer.put(message)

    flushing = asyncio.ensure_future(app.producer.flush())
    await settle()
    message.set_exception(KafkaTimeoutError())
    with pytest.raises(KafkaTimeoutError):
        await asyncio.wait_for(flushing, timeout=5)


async def test_sends_made_outside_the_buffer_are_held_against_the_commit() -> None:
    app = new_app("held")
    gate = fixes.install(app.producer)
    sent: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    gate.hold(sent)
    assert len(gate) == 1

    flushing = asyncio.ensure_future(app.producer.flush())
    await settle()
    assert not flushing.done()
    sent.set_result(object())
    await asyncio.wait_for(flushing, timeout=5)
    assert len(gate) == 0, "an acknowledged send is forgotten"
    # With nothing outstanding the flush returns at once.
    await asyncio.wait_for(app.producer.flush(), timeout=5)
