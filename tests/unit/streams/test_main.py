"""``presence worker`` start-up: which failures are waited out, and how long each wait is."""

from __future__ import annotations

import logging

import pytest
from aiokafka.errors import KafkaConnectionError

from core.topics import KafkaUnreachable, TopicError
from streams.config import WorkerSettings
from streams.main import ensure_topics_when_reachable


class Script:
    """``ensure`` failing with the given errors in turn, then succeeding; ``sleep`` recording each wait."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.calls = 0
        self.waits: list[float] = []

    async def ensure(self) -> list[str]:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return ["created-topic"]

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)


async def test_unreachable_kafka_is_waited_out_with_doubling_capped_waits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures = [KafkaUnreachable("no broker"), KafkaConnectionError(), OSError("refused"), TimeoutError()] * 2
    script = Script(*failures)
    with caplog.at_level(logging.INFO, logger="streams.main"):
        created = await ensure_topics_when_reachable(
            WorkerSettings(), ensure=script.ensure, sleep=script.sleep, first_delay=1.0, max_delay=10.0
        )
    assert created == ["created-topic"] and script.calls == 9
    assert script.waits == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0, 10.0]
    retries = [r for r in caplog.records if r.getMessage() == "kafka not reachable yet; retrying"]
    assert [r.attempt for r in retries] == list(range(1, 9))  # type: ignore[attr-defined]
    assert retries[0].error == "no broker"  # type: ignore[attr-defined]
    (done,) = [r for r in caplog.records if r.getMessage() == "topics ready"]
    assert done.attempts == 9 and done.topics_created == ["created-topic"]  # type: ignore[attr-defined]


async def test_a_topic_layout_error_is_not_retried() -> None:
    script = Script(TopicError("topic raw has 2 partitions but PRESENCE_TOPIC_PARTITIONS is 4"))
    with pytest.raises(TopicError, match="2 partitions"):
        await ensure_topics_when_reachable(WorkerSettings(), ensure=script.ensure, sleep=script.sleep)
    assert script.calls == 1 and script.waits == []
