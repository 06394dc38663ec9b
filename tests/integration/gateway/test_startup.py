"""Start-up against the real broker (D2): topics that exist with another partition count refuse the start.

The other side, Kafka not ready at start leading to spooling rather than refusal, is
``test_spool_outage.py::test_g7_gateway_started_while_kafka_is_down_creates_topics_and_drains_later`` (broker
stopped) and ``tests/unit/gateway/test_startup.py`` (a slow leader election).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from core.topics import TopicError, ensure_topics
from gateway.config import GatewaySettings
from gateway.main import create_app


async def test_d2_existing_topics_with_another_partition_count_refuse_the_start(
    gateway_settings: Callable[..., GatewaySettings],
) -> None:
    existing = gateway_settings()
    await ensure_topics(existing)
    wrong = gateway_settings(topic_partitions=existing.topic_partitions + 2)
    app = create_app(wrong)
    with pytest.raises(TopicError, match=f"PRESENCE_TOPIC_PARTITIONS={existing.topic_partitions}"):
        async with app.router.lifespan_context(app):
            raise AssertionError("the gateway started on topics it would misroute users in")
