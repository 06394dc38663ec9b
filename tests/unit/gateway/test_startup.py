"""Start-up (D2, G7): ensuring the topics decides between spooling and refusing by the kind of failure.

Kafka that is not ready yet (unreachable, or partitions without a leader while an election is slow) must not
keep the gateway from starting: it answers through the spool and publishes once the topics are ready. Topics
that exist with a layout the product cannot use are a configuration error: the gateway refuses to start. The
real ``core.topics.ensure_topics`` runs against an in-memory admin client standing in for the broker's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka.admin import NewTopic
from aiokafka.errors import KafkaConnectionError, RequestTimedOutError

import core.topics
import gateway.main
from core.topics import TopicError

from .conftest import signed_url
from .fakes import MemoryKafka
from .test_app import ev, topic

Harness = Callable[..., Any]


@dataclass
class Cluster:
    """What the admin client sees: whether the broker answers, its topics, whether partitions have leaders."""

    reachable: bool = True
    # False: the broker stops answering after the admin client connected.
    answering: bool = True
    leaders: bool = True
    partitions: dict[str, int] = field(default_factory=dict)

    def admin(self, **_options: Any) -> Admin:
        return Admin(self)


class Admin:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    async def start(self) -> None:
        if not self.cluster.reachable:
            raise KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 9)]")

    async def close(self) -> None:
        return None

    async def list_topics(self) -> list[str]:
        if not self.cluster.answering:
            raise RequestTimedOutError()
        return list(self.cluster.partitions)

    async def create_topics(self, new_topics: list[NewTopic], timeout_ms: int) -> None:
        for spec in new_topics:
            self.cluster.partitions[spec.name] = spec.num_partitions

    async def describe_topics(self, names: list[str]) -> list[dict[str, Any]]:
        leader = 1 if self.cluster.leaders else -1
        return [
            {
                "topic": name,
                "error_code": 0,
                "partitions": [
                    {"partition": p, "leader": leader} for p in range(self.cluster.partitions.get(name, 0))
                ],
            }
            for name in names
        ]


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Cluster:
    cluster = Cluster()
    monkeypatch.setattr(core.topics, "AIOKafkaAdminClient", cluster.admin)
    # One attempt at ensuring the topics gives up after this long (10 s in production).
    monkeypatch.setattr(gateway.main, "ENSURE_TOPICS_TIMEOUT_SECONDS", 0.3)
    return cluster


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("trouble", ["slow_leader_election", "broker_unreachable", "broker_stops_answering"])
async def test_d2_g7_kafka_not_ready_at_start_spools_then_publishes(
    harness_factory: Harness, cluster: Cluster, trouble: str
) -> None:
    if trouble == "slow_leader_election":
        cluster.leaders = False
    elif trouble == "broker_unreachable":
        cluster.reachable = False
    else:
        cluster.answering = False
    kafka = MemoryKafka()
    async with harness_factory(kafka=kafka, gateway_ensure_topics=True) as h:
        assert (await h.client.get("/readyz")).status_code == 200
        r = await h.client.post(signed_url(nonce="early"), json=[ev("early")])
        assert r.status_code == 200
        assert h.sample("presence_gateway_requests_total", outcome="spooled") == 1
        # The producer waits for the topics: nothing may be produced into a topic that is not ready.
        assert kafka.producers_started == 0

        cluster.leaders = cluster.reachable = cluster.answering = True
        await wait_for(lambda: h.app.state.gateway.publisher.spool.records == 0)
        assert kafka.producers_started == 1
        assert [key for key, _ in topic(h, "raw")] == [b"early"]
        settings = h.app.state.gateway.settings
        assert cluster.partitions[settings.topic_raw] == settings.topic_partitions


async def test_d2_topics_with_another_partition_count_refuse_the_start(
    harness_factory: Harness, gateway_settings: Callable[..., Any], cluster: Cluster
) -> None:
    settings = gateway_settings()
    cluster.partitions[settings.topic_raw] = settings.topic_partitions + 2
    with pytest.raises(TopicError, match=f"PRESENCE_TOPIC_PARTITIONS={settings.topic_partitions + 2}"):
        async with harness_factory(gateway_ensure_topics=True):
            raise AssertionError("the gateway started on topics it would misroute users in")
