"""Reconciliation's real parts together: the checkOnline client against the RongCloud emulator over real HTTP
(signature, rate limit and back-off, fail-over, budget), callbacks over real HTTP, and observations (R1)
published to a real broker's RAW topic."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from core import contract
from core.settings import CommonSettings
from core.topics import ensure_topics
from presence.emulator import ApiEmulator, CallbackPolicy, CallbackSender, GroundTruth
from presence.localkafka import free_port
from presence.simulate import Target
from presence.trace import Delivery, Trace, TraceSpec
from streams.checkonline import Budget, CheckOnlineClient, CheckOnlineError, Reconciler, publish_observation
from streams.reconcile import CheckQueue
from tests.schemas import writer_validator

APP_KEY, SECRET = "emulated-app", "emulated-secret"
# The closed (writer) form: the worker publishes nothing the schema does not declare.
RAW_SCHEMA = writer_validator("raw.v1.schema.json")


def truth(online: int = 10, offline: int = 10) -> GroundTruth:
    t = GroundTruth()
    for n in range(online):
        t.add(f"on-{n}", "s", "0", -1000)
    for n in range(offline):
        t.add(f"off-{n}", "s", "0", -2000)
        t.add(f"off-{n}", "s", "1", -1000)
    return t


def client_for(*urls: str, per_second: float = 1000, **kwargs: Any) -> CheckOnlineClient:
    return CheckOnlineClient(
        app_key=kwargs.pop("app_key", APP_KEY), secret=kwargs.pop("secret", SECRET), budget=Budget(per_second),
        base_urls=urls, timeout=kwargs.pop("timeout", 2.0), backoff=0.05, **kwargs,
    )  # fmt: skip


async def emulator(t: GroundTruth | None = None, **kwargs: Any) -> ApiEmulator:
    api = ApiEmulator(t or truth(), app_key=APP_KEY, secret=SECRET, base_ms=int(time.time() * 1000), **kwargs)
    await api.start()
    return api


async def test_answers_come_from_the_ground_truth() -> None:
    api = await emulator()
    try:
        async with client_for(api.url) as client:
            answers = await asyncio.gather(*(client.check(u) for u in ("on-1", "off-1", "never-seen")))
    finally:
        await api.stop()
    assert [(a.userid, a.online) for a in answers] == [
        ("on-1", True),
        ("off-1", False),
        ("never-seen", False),
    ]
    assert all(status == 200 for _, _, status in api.calls)


async def test_a_wrong_secret_is_refused_with_rongclouds_code() -> None:
    api = await emulator()
    try:
        async with client_for(api.url, secret="not-the-secret") as client:
            with pytest.raises(CheckOnlineError) as caught:
                await client.check("on-1")
    finally:
        await api.stop()
    assert (caught.value.code, caught.value.http_status) == (1004, 401)
    assert len(api.calls) == 1  # not retried


async def test_the_rate_limit_is_answered_429_and_the_client_backs_off_until_all_are_answered() -> None:
    api = await emulator(rate_limit=5)
    try:
        async with client_for(api.url, attempts=8) as client:
            client.budget = Budget(1000, throttle_initial=0.3, throttle_max=1.0)
            answers = await asyncio.gather(*(client.check(f"on-{n % 10}") for n in range(15)))
    finally:
        await api.stop()
    assert all(a.online for a in answers)
    statuses = [status for _, _, status in api.calls]
    assert statuses.count(429) > 0 and statuses.count(200) == 15
    # Backing off, the client never had more than the limit answered in any one second of the emulator's.
    assert api.max_calls_in_a_second(answered_only=True) <= 5 + 1


async def test_fail_over_to_the_backup_host() -> None:
    primary = await emulator()
    backup = await emulator(primary.truth)
    primary.fail_with = 503
    try:
        async with client_for(primary.url, backup.url) as client:
            first = await client.check("on-1")
            second = await client.check("off-1")
    finally:
        await primary.stop()
        await backup.stop()
    assert (first.online, first.base_url, first.attempts) == (True, backup.url, 2)
    assert (second.online, second.base_url, second.attempts) == (False, backup.url, 1)
    assert len(primary.calls) == 1 and len(backup.calls) == 2


async def test_fail_over_when_the_primary_host_is_unreachable_or_slow() -> None:
    backup = await emulator()
    slow = await emulator(backup.truth)
    slow.delay = 1.0
    dead = f"http://127.0.0.1:{free_port()}"
    try:
        async with client_for(dead, backup.url) as client:
            assert (await client.check("on-2")).base_url == backup.url
        async with client_for(slow.url, backup.url, timeout=0.3) as client:
            assert (await client.check("on-2")).base_url == backup.url
    finally:
        await backup.stop()
        await slow.stop()


async def test_calls_never_exceed_the_budget() -> None:
    api = await emulator(rate_limit=1000)
    try:
        async with client_for(api.url, per_second=20) as client:
            started = time.monotonic()
            await asyncio.gather(*(client.check(f"on-{n % 10}") for n in range(30)))
            elapsed = time.monotonic() - started
    finally:
        await api.stop()
    # 30 calls at 20/s with a burst of 2: about 1.4 s at least, never more than ~22 in a second.
    assert elapsed >= 1.3
    assert api.max_calls_in_a_second() <= 20 * 1.1 + 1


async def test_callbacks_over_real_http_are_signed_and_retried() -> None:
    received: list[bytes] = []
    failures = {"left": 1}

    async def webhook(request: web.Request) -> web.Response:
        query = request.query
        assert query["signature"] == contract.compute_signature(SECRET, query["nonce"], query["timestamp"])
        if failures["left"]:
            failures["left"] -= 1
            return web.Response(status=503)
        received.append(await request.read())
        return web.json_response({"accepted": 1, "rejected": 0})

    app = web.Application()
    app.router.add_post("/hook", webhook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    events = ({"userid": "u", "sessionId": "a", "status": "0", "time": 0, "os": "iOS"},)
    trace = Trace(TraceSpec(), [Delivery(0, "n1", events), Delivery(100, "n2", events)])
    try:
        stats = await CallbackSender(
            trace, Target(f"http://127.0.0.1:{port}/hook", APP_KEY, SECRET),
            policy=CallbackPolicy(attempt_timeout=2.0),
        ).run()  # fmt: skip
    finally:
        await runner.cleanup()
    assert (stats.delivered, stats.attempts, stats.dropped) == (2, 3, 0)
    assert len(received) == 2


async def consume_raw(settings: CommonSettings, until: Callable[[list[Any]], bool]) -> list[Any]:
    consumer = AIOKafkaConsumer(
        settings.topic_raw, auto_offset_reset="earliest", enable_auto_commit=False, group_id=None,
        **settings.aiokafka_options(),
    )  # fmt: skip
    await consumer.start()
    records: list[Any] = []
    try:
        deadline = time.monotonic() + 60
        while not until(records):
            assert time.monotonic() < deadline, f"only {len(records)} records on RAW"
            for messages in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(messages)
    finally:
        await consumer.stop()
    return records


async def test_r1_observations_are_published_to_raw_in_the_users_partition(
    common_settings: CommonSettings,
) -> None:
    await ensure_topics(common_settings)
    producer = AIOKafkaProducer(acks="all", **common_settings.aiokafka_options())
    await producer.start()
    observation = contract.Observation("someone", True, 1_700_000_000_000, "on_demand", 1_700_000_000_050)
    try:
        await publish_observation(producer, common_settings.topic_raw, observation)
    finally:
        await producer.stop()
    (record,) = await consume_raw(common_settings, lambda rs: len(rs) >= 1)
    assert record.key == b"someone"
    assert record.partition == contract.partition_of(b"someone", common_settings.topic_partitions)
    RAW_SCHEMA.validate(orjson.loads(record.value))
    decoded = contract.decode_observation(record.key, record.value, f"{record.partition}@{record.offset}")
    assert decoded == observation._replace(delivery_id=f"{record.partition}@{record.offset}")


async def test_the_checker_turns_doubts_into_observations_on_raw(common_settings: CommonSettings) -> None:
    """Queue -> budget -> emulated API -> RAW: every doubted user gets one observation matching the truth."""
    await ensure_topics(common_settings)
    api = await emulator(rate_limit=50)
    producer = AIOKafkaProducer(acks="all", **common_settings.aiokafka_options())
    await producer.start()
    client = client_for(api.url, per_second=40)

    async def publish(observation: contract.Observation) -> None:
        await publish_observation(producer, common_settings.topic_raw, observation)

    reconciler = Reconciler(CheckQueue(recheck_interval_ms=60_000), client, publish, concurrency=4)
    doubted = [f"on-{n}" for n in range(10)] + [f"off-{n}" for n in range(10)]
    for n, userid in enumerate(doubted):
        reconciler.offer(userid, "age" if n % 2 else "intake_gap", gap="gap-1" if n % 2 == 0 else None)
    task = asyncio.create_task(reconciler.run())
    try:
        records = await consume_raw(common_settings, lambda rs: len(rs) >= len(doubted))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await producer.stop()
        await client.aclose()
        await api.stop()
    observations = {o.userid: o for o in (contract.decode_observation(r.key, r.value, "") for r in records)}
    assert set(observations) == set(doubted)
    assert all(o.online == o.userid.startswith("on-") for o in observations.values())
    assert {o.source for o in observations.values()} == {"age", "intake_gap"}
    assert all(o.at <= o.answered_at for o in observations.values())
    assert len(api.calls) == len(doubted)  # nothing checked twice


async def test_presence_reconcile_prints_rongclouds_answers(tmp_path: Path) -> None:
    primary = await emulator()
    backup = await emulator(primary.truth)
    primary.fail_with = 502
    env = {
        **os.environ, "PRESENCE_APP_KEY": APP_KEY, "PRESENCE_APP_SECRET": SECRET,
        "PRESENCE_RECONCILE_API_URLS": f"{primary.url},{backup.url}",
    }  # fmt: skip
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "presence.cli", "reconcile", "--json", "on-1", "off-1", cwd=tmp_path, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, err.decode()
        answers = {a["userid"]: a for a in map(orjson.loads, out.splitlines())}
        assert {u: a["online"] for u, a in answers.items()} == {"on-1": True, "off-1": False}
        assert {a["api"] for a in answers.values()} == {backup.url}

        env["PRESENCE_APP_SECRET"] = "wrong-secret"
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "presence.cli", "reconcile", "on-1", cwd=tmp_path, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 1
        assert "code 1004" in out.decode()
    finally:
        await primary.stop()
        await backup.stop()
