"""Conformance of the reference consumers (examples/java, examples/go) with the consumer contract.

docs/consuming.md is the contract. The whole pipeline runs for real: the session's broker, a gateway, a worker
process with a short user retention (S6 deletions within the run), and `presence simulate` sending signed,
realistic traffic in two phases. Both consumers start while the first phase is under way (so their bootstrap
hands over to following with messages in flight), the worker is SIGKILLed and restarted between the phases
(S10 repeats), and once the pipeline is quiet every user's status in each consumer's map is compared with the
query API (Q1): no gap, no silent change, and the two consumers agree exactly. A few users are deleted before the
consumers start, so their bootstrap reads STATE tombstones too.

What the pipeline cannot produce on demand (a late transition of an epoch that ended before the user's current
record, "Epochs" in docs/consuming.md) is checked by feeding both consumers crafted TRANSITIONS and STATE topics,
made with the worker's own payloads and headers, on the same broker.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from core.topics import ensure_topics
from gateway.config import GatewaySettings
from presence.children import wait_until
from streams import envelope, rules
from streams.config import WorkerSettings
from streams.main import worker_topics

from .gateway.conftest import APP_KEY, SECRET, GatewayServer
from .streams.harness import WorkerProcess, read_topic, worker_env

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
# Short retentions so users are deleted (S6) and come back (new epochs) within a run of seconds. Deliberately
# below upstream's lateness: late offlines then meet deleted users, which a consumer must also survive.
USER_RETENTION_SECONDS = "6"
ENDED_SESSION_RETENTION_SECONDS = "3"
# Phase B sends traffic for the first 100 users only: the others are deleted during it and stay deleted. The
# "early" population is a short burst before phase A: some of its users are deleted (a STATE tombstone) before
# the consumers bootstrap.
USERS = {"early": 20, "A": 160, "B": 100}
PHASE_SECONDS = 10
RATE = 80


@dataclass
class Consumer:
    name: str
    command: list[str]
    out: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)

    def dump(self) -> dict[str, Any] | None:
        assert self.process is not None
        if self.process.poll() is not None and self.process.returncode != 0:
            raise AssertionError(
                f"{self.name} consumer exited with {self.process.returncode}:\n{self.log_tail()}"
            )
        return self._read()

    def _read(self) -> dict[str, Any] | None:
        try:
            loaded: dict[str, Any] = json.loads(self.out.read_text())
        except (OSError, ValueError):
            return None
        return loaded

    def stop(self) -> dict[str, Any]:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"{self.name} consumer ignored SIGTERM:\n{self.log_tail()}") from None
        # The JVM exits 143 after a SIGTERM its shutdown hook handled; the Go consumer exits 0.
        assert code in (0, 143), f"{self.name} consumer exited with {code}:\n{self.log_tail()}"
        final = self._read()
        assert final is not None, f"{self.name} consumer wrote no map:\n{self.log_tail()}"
        return final

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _run(command: list[str], cwd: Path, what: str, env: dict[str, str] | None = None) -> float:
    started = time.monotonic()
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env, check=False
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{what} failed ({' '.join(command)}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
    return time.monotonic() - started


def build_go(out_dir: Path) -> tuple[list[str], float]:
    """Build examples/go (franz-go from the Go module cache after the first fetch)."""
    go = shutil.which("go")
    if go is None:
        pytest.fail("the Go consumer needs Go >= 1.26 (`./dev test` checks and says how to install it)")
    binary = out_dir / "presence-consumer-go"
    seconds = _run([go, "build", "-o", str(binary), "."], EXAMPLES / "go", "go build")
    return [str(binary)], seconds


def build_java() -> tuple[list[str], float]:
    """Build examples/java with Maven (kafka-clients and Jackson from ~/.m2 after the first fetch)."""
    mvn, java = shutil.which("mvn"), shutil.which("java")
    if mvn is None or java is None:
        pytest.fail("the Java consumer needs java and mvn (`./dev test` installs them)")
    project = EXAMPLES / "java"
    seconds = _run([mvn, "-B", "-q", "compile", "dependency:copy-dependencies"], project, "mvn compile")
    classpath = f"{project / 'target' / 'classes'}:{project / 'target' / 'lib'}/*"
    return [java, "-Xmx256m", "-cp", classpath, "io.presence.examples.PresenceConsumer"], seconds


def simulate(
    gateway: GatewayServer, phase: str, seed: int, tmp: Path, seconds: float = PHASE_SECONDS
) -> subprocess.Popen[bytes]:
    prefix = "conf-early-" if phase == "early" else "conf-"
    args = [
        sys.executable, "-m", "presence.cli", "simulate", "--url", gateway.webhook, "--app-key", APP_KEY,
        "--secret", SECRET, "--users", str(USERS[phase]), "--user-prefix", prefix, "--rate", str(RATE),
        "--duration", str(seconds), "--seed", str(seed), "--batch-max", "20", "--json", "--no-progress",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_")}
    out = (tmp / f"simulate-{seed}.json").open("wb")
    return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)


def finished(process: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"{what} did not finish within {timeout:.0f} s") from None
    assert code == 0, f"{what} exited with {code}: a request was not answered 200"


async def _lag(settings: WorkerSettings, group: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    await consumer.start()
    try:
        tps = [TopicPartition(settings.topic_raw, p) for p in range(settings.topic_partitions)]
        ends = await consumer.end_offsets(tps)
        committed = await admin.list_consumer_group_offsets(group)
        return sum(ends[tp] - max(0, committed[tp].offset if tp in committed else 0) for tp in tps)
    finally:
        await consumer.stop()
        await admin.close()


async def _end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[str, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
        return {str(tp.partition): offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


def query_all(worker_url: str, userids: list[str]) -> dict[str, dict[str, Any] | None]:
    records: dict[str, dict[str, Any] | None] = {}
    with httpx.Client(base_url=worker_url, timeout=15) as client:
        for start in range(0, len(userids), 1000):
            chunk = userids[start : start + 1000]

            def answered(chunk: list[str] = chunk) -> bool:
                response = client.post("/presence:batch", json={"userids": chunk})
                if response.status_code == 200:
                    records.update(response.json()["records"])
                    return True
                return False

            wait_until(answered, 60, "the query API to answer a batch")
    # The batch answer leaves out users it does not know (404 for Q1): unknown, i.e. offline.
    return {userid: records.get(userid) for userid in userids}


@dataclass
class Run:
    """What the conformance run produced, for the assertions."""

    dumps: dict[str, dict[str, Any]]
    api: dict[str, dict[str, Any] | None]
    tombstones: int
    numbers: dict[str, float]


def _status(record: dict[str, Any] | None) -> str:
    return "offline" if record is None else str(record["status"])


def compare(dump: dict[str, Any], api: dict[str, dict[str, Any] | None]) -> tuple[list[str], list[str]]:
    """(other differences, differences explained by a deletion the consumer could not see).

    A deletion shows on STATE (tombstone) but, until the final-transition rule lands, not on TRANSITIONS: the
    query API then answers 404, or a record of a newer epoch created by an offline (which emits nothing).
    """
    users = dump["users"]
    others: list[str] = []
    by_deletion: list[str] = []
    for userid, record in api.items():
        mine = users.get(userid)
        if _status(mine) == _status(record) and (
            record is None or record["seq"] == 0 or (mine is not None and
                                                       (mine["epoch"], mine["seq"]) == (record["epoch"], record["seq"]))
        ):  # fmt: skip
            continue
        line = f"{userid}: consumer {mine}, query API {record and {k: record[k] for k in ('status', 'epoch', 'seq')}}"
        if record is None or (mine is not None and record["seq"] == 0 and mine["epoch"] != record["epoch"]):
            by_deletion.append(line)
        else:
            others.append(line)
    return others, by_deletion


@dataclass
class Built:
    """The consumers' commands (without their options) and how long building them took."""

    commands: dict[str, list[str]]
    numbers: dict[str, float]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    tmp = tmp_path_factory.mktemp("consumer-builds")
    numbers: dict[str, float] = {}
    go_command, numbers["go build s"] = build_go(tmp)
    java_command, numbers["java build s"] = build_java()
    return Built({"go": go_command, "java": java_command}, numbers)


def _has_tombstone(bootstrap: str, topic: str) -> bool:
    return any(value is None for _, _, _, value in asyncio.run(read_topic(bootstrap, topic)))


@pytest.fixture(scope="module")
def conformance(
    built: Built, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("consumers")
    token = uuid.uuid4().hex[:10]
    values: dict[str, Any] = {
        "env": "test",
        "kafka_bootstrap_servers": kafka_bootstrap,
        "topic_raw": f"conf-{token}.raw",
        "topic_dlq": f"conf-{token}.dlq",
        "topic_transitions": f"conf-{token}.transitions",
        "topic_state": f"conf-{token}.state",
        "topic_partitions": 4,
        "topic_replication_factor": 1,
    }
    app_id = f"conf-{token}-worker"
    settings = WorkerSettings(**values, worker_app_id=app_id)
    asyncio.run(ensure_topics(settings, extra=worker_topics(settings)))
    numbers = dict(built.numbers)

    gateway = GatewayServer(
        GatewaySettings(**values, app_key=APP_KEY, app_secret=SECRET, gateway_spool_dir=tmp / "spool")
    ).start()
    worker = WorkerProcess(
        env=worker_env(
            values, app_id,
            PRESENCE_WORKER_USER_RETENTION_SECONDS=USER_RETENTION_SECONDS,
            PRESENCE_WORKER_ENDED_SESSION_RETENTION_SECONDS=ENDED_SESSION_RETENTION_SECONDS,
        ),
        data_dir=tmp / "worker", log_path=tmp / "worker.log",
    )  # fmt: skip
    consumers: list[Consumer] = []
    try:
        # A burst whose users go idle at once: those left offline are deleted (S6) one user retention later, early
        # in phase A, and the consumers wait for one of their tombstones before they bootstrap. Sent while the
        # worker starts (RAW keeps it), so the retention runs out sooner after phase A begins.
        finished(simulate(gateway, "early", seed=10, tmp=tmp, seconds=0.5), 60, "simulated traffic (early)")
        worker.start()
        worker.wait_ready()
        started = time.monotonic()
        phase_a = simulate(gateway, "A", seed=11, tmp=tmp)
        # Let STATE and TRANSITIONS fill, then bootstrap while traffic flows.
        wait_until(
            lambda: sum(asyncio.run(_end_offsets(kafka_bootstrap, settings.topic_state, 4)).values()) > 50,
            60, "STATE to hold some records before the consumers start",
        )  # fmt: skip
        wait_until(
            lambda: _has_tombstone(kafka_bootstrap, settings.topic_state), 60,
            "a STATE tombstone (an early user deleted) before the consumers start", interval=0.5,
        )  # fmt: skip
        numbers["bootstrap at s"] = time.monotonic() - started
        common = ["-bootstrap", kafka_bootstrap, "-transitions", settings.topic_transitions,
                  "-state", settings.topic_state, "-query-url", worker.url]  # fmt: skip
        for name, command in built.commands.items():
            out = tmp / f"{name}.json"
            consumer = Consumer(name, [*command, *common, "-out", str(out)], out, tmp / f"{name}.log")
            consumer.start()
            consumers.append(consumer)
        finished(phase_a, PHASE_SECONDS + 120, "simulated traffic (phase A)")
        # S10: a crash in the middle of phase B; the restarted worker re-sends what it may not have delivered.
        raw_before = sum(asyncio.run(_end_offsets(kafka_bootstrap, settings.topic_raw, 4)).values())
        phase_b = simulate(gateway, "B", seed=12, tmp=tmp)
        wait_until(
            lambda: sum(asyncio.run(_end_offsets(kafka_bootstrap, settings.topic_raw, 4)).values())
            > raw_before + 150,
            60, "phase B to be under way",
        )  # fmt: skip
        worker.kill()
        worker.start()
        worker.wait_ready()
        finished(phase_b, PHASE_SECONDS + 120, "simulated traffic (phase B)")
        wait_until(lambda: asyncio.run(_lag(settings, app_id)) == 0, 120, "the worker to process all of RAW")
        ends = asyncio.run(_end_offsets(kafka_bootstrap, settings.topic_transitions, 4))

        def caught_up(consumer: Consumer) -> bool:
            dump = consumer.dump()
            return dump is not None and all(dump["positions"].get(p, -1) >= end for p, end in ends.items())

        for consumer in consumers:
            wait_until(
                lambda c=consumer: caught_up(c), 60, f"the {consumer.name} consumer to read TRANSITIONS"
            )
        dumps = {consumer.name: consumer.stop() for consumer in consumers}
        numbers["run s"] = time.monotonic() - started
        state = asyncio.run(read_topic(kafka_bootstrap, settings.topic_state))
        tombstones = sum(1 for _, _, _, value in state if value is None)
        # Every user any source knows of: STATE holds a key for every user ever created.
        userids = sorted(
            {key.decode() for _, _, key, _ in state}.union(*(d["users"] for d in dumps.values()))
        )
        raw_users = {
            key.decode() for _, _, key, _ in asyncio.run(read_topic(kafka_bootstrap, settings.topic_raw))
        }
        assert raw_users <= set(userids), "a user seen on RAW has no STATE record and no consumer entry"
        api = query_all(worker.url, userids)
        yield Run(dumps, api, tombstones, numbers)
    finally:
        for consumer in consumers:
            if consumer.process is not None and consumer.process.poll() is None:
                consumer.process.kill()
                consumer.process.wait()
        worker.stop()
        gateway.stop()


def test_reference_consumers_match_the_query_api_with_no_gap(
    conformance: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    run = conformance
    with capsys.disabled():
        figures = ", ".join(f"{k} {v:.1f}" for k, v in run.numbers.items())
        print(f"\n[consumers] {figures}; {len(run.api)} users, {run.tombstones} STATE tombstones")
        for name, dump in run.dumps.items():
            unseen = len(compare(dump, run.api)[1])
            print(
                f"[consumers] {name}: {len(dump['users'])} users, {unseen} deletions unseen, {dump['stats']}"
            )
    # The run exercised what it claims to: deletions (S6), and users followed through TRANSITIONS.
    assert run.tombstones > 0, "no user was deleted: the S6 retention did not act within the run"
    assert sum(1 for record in run.api.values() if record is None) > 0
    for name, dump in run.dumps.items():
        stats = dump["stats"]
        assert stats["applied"] >= 30, f"{name}: too few transitions applied to mean anything: {stats}"
        assert stats["state_records"] > 0, f"{name}: the bootstrap read nothing: {stats}"
        # An early user was deleted before the bootstrap: its tombstone was read and its ce_id checked below.
        assert stats["state_tombstones"] > 0, f"{name}: the bootstrap read no tombstone: {stats}"
        # No gap: every transition followed the one before it (dedupe by (epoch, seq), docs/consuming.md).
        assert stats["gaps"] == 0, f"{name}: gaps {dump['gaps'][:10]}"
        # Every STATE record, tombstone and transition read from the broker carries a ce_id header naming what its
        # value says (streams/envelope.py; docs/consuming.md, "Headers").
        read = stats["state_records"] + stats["state_tombstones"] + stats["applied"]
        assert stats["ids_checked"] >= read, f"{name}: {stats}"
        assert stats["id_mismatches"] == 0, f"{name}: {stats}"
        others, _ = compare(dump, run.api)
        assert not others, f"{name}: {len(others)} users differ from the query API, e.g.\n" + "\n".join(
            others[:10]
        )
    # They started at different instants (different handover points), yet end with the same map.
    assert run.dumps["java"]["users"] == run.dumps["go"]["users"], "the Java and Go consumers disagree"


def test_deletions_are_visible_on_transitions(conformance: Run) -> None:
    for name, dump in conformance.dumps.items():
        _, by_deletion = compare(dump, conformance.api)
        assert dump["stats"]["deletions"] > 0, f"{name}: no transition with cause `deleted` was seen"
        assert not by_deletion, f"{name}: {len(by_deletion)} deletions went unseen, e.g.\n" + "\n".join(
            by_deletion[:10]
        )


# A crafted history (docs/consuming.md, "Epochs"). Epochs are the times of the events that created the records;
# the ones of a user are deliberately not in creation order, as after a late event or a replay: a new record may
# have a smaller epoch than an ended one, so the consumers compare epochs for equality only.
# "again": created, deleted, three times. "back": deleted before the bootstrap, re-created by a late offline.
E1, E2, E3 = 1_700_000_010_000, 1_700_000_030_000, 1_700_000_020_000
OLD, NEW = 1_700_000_200_000, 1_700_000_100_000
SOURCE = "crafted-worker"
Message = tuple[str, bytes | None, envelope.Headers]


def _transition(userid: str, epoch: int, seq: int, to: rules.UserStatus, event: rules.CauseEvent) -> Message:
    """A TRANSITIONS message as the worker sends it: its payload and CloudEvents headers."""
    # A record starts offline (its first transition is from offline); every later one here follows an online.
    from_: rules.UserStatus = "offline" if seq == 1 or to == "online" else "online"
    online = to == "online"
    cause = rules.Cause("-" if event == "deleted" else "s1", event, "iOS" if online else None, None)
    transition = rules.Transition(
        userid, from_, to, epoch + seq * 1000, cause, ("iOS",) if online else (), int(online), epoch, seq
    )
    value = transition.to_payload() | {"emitted_at": transition.at}
    return userid, json.dumps(value).encode(), envelope.transition_headers(SOURCE, transition)


def _record(userid: str, epoch: int, seq: int, status: rules.UserStatus) -> rules.UserRecord:
    return rules.UserRecord(userid, {}, epoch, seq, epoch + seq * 1000, None, False, status, None, ())


def _state(record: rules.UserRecord) -> Message:
    value = json.dumps(rules.state_payload(record)).encode()
    return record.userid, value, envelope.state_headers(SOURCE, record, value)


def _tombstone(record: rules.UserRecord) -> Message:
    return record.userid, None, envelope.tombstone_headers(SOURCE, record, record.last_seen)


async def _create(bootstrap: str, *topics: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, num_partitions=1, replication_factor=1) for topic in topics]
        )
    finally:
        await admin.close()


async def _produce(bootstrap: str, topic: str, messages: list[Message]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for key, value, headers in messages:  # one by one: their order in the partition is the point
            await producer.send_and_wait(topic, value, key=key.encode(), headers=headers)
    finally:
        await producer.stop()


def test_consumers_drop_every_ended_epoch(
    built: Built, kafka_bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ended epochs are a set per user, kept when the user comes back (docs/consuming.md, step 4 and "Epochs").

    "again" is deleted twice and back each time; then a repeat of its current record's transition, a repeat of
    its second deletion and a late transition of its first record arrive, as a worker restart (S10) or a late
    delivery would send them. "back" was deleted before the bootstrap (a tombstone) and re-created with a smaller
    epoch; a repeat of its deletion arrives after it. A consumer that remembers only the last ended epoch, or
    forgets it when the user comes back, takes the repeats for gaps and ends with "again" online in its first
    epoch. The pipeline cannot be made to send this on demand, so the messages are made here with the worker's
    own payloads and headers (streams/envelope.py) and put on a real broker.
    """
    token = uuid.uuid4().hex[:10]
    transitions_topic, state_topic = f"epochs-{token}.transitions", f"epochs-{token}.state"
    asyncio.run(_create(kafka_bootstrap, transitions_topic, state_topic))
    asyncio.run(
        _produce(
            kafka_bootstrap, state_topic,
            [_state(_record("back", OLD, 2, "online")), _tombstone(_record("back", OLD, 3, "offline")),
             _state(_record("back", NEW, 0, "offline"))],
        )
    )  # fmt: skip
    # Nothing is in flight between the topics here, so no settle time is needed.
    options = ["-bootstrap", kafka_bootstrap, "-transitions", transitions_topic, "-state", state_topic,
               "-settle", "0"]  # fmt: skip
    consumers = []
    for name, command in built.commands.items():
        out = tmp_path / f"{name}.json"
        consumers.append(
            Consumer(name, [*command, *options, "-out", str(out)], out, tmp_path / f"{name}.log")
        )
    try:
        for consumer in consumers:
            consumer.start()
        # A consumer writes its map once it has bootstrapped and follows TRANSITIONS from the (empty) topic's end.
        for consumer in consumers:
            wait_until(lambda c=consumer: c.dump() is not None, 60, f"{consumer.name} to bootstrap")
        history = [
            _transition("again", E1, 1, "online", "online"),
            _transition("again", E1, 2, "offline", "deleted"),
            _transition("again", E2, 1, "online", "online"),
            _transition("again", E2, 2, "offline", "deleted"),
            _transition("again", E3, 1, "logged_out", "logout"),
            _transition("back", OLD, 3, "offline", "deleted"),  # a repeat: STATE's tombstone ended OLD
            _transition("back", NEW, 1, "online", "online"),
            # A repeat of the current record's transition, a repeat of the second deletion, and a late transition
            # of the first record.
            _transition("again", E3, 1, "logged_out", "logout"),
            _transition("again", E2, 2, "offline", "deleted"),
            _transition("again", E1, 1, "online", "online"),
        ]
        asyncio.run(_produce(kafka_bootstrap, transitions_topic, history))
        for consumer in consumers:
            wait_until(
                lambda c=consumer: (c.dump() or {}).get("positions", {}).get("0", 0) >= len(history), 30,
                f"the {consumer.name} consumer to read the crafted transitions",
            )  # fmt: skip
        dumps = {consumer.name: consumer.stop() for consumer in consumers}
    finally:
        for consumer in consumers:
            if consumer.process is not None and consumer.process.poll() is None:
                consumer.process.kill()
                consumer.process.wait()
    expected_users = {
        "again": {"status": "logged_out", "epoch": E3, "seq": 1},
        "back": {"status": "online", "epoch": NEW, "seq": 1},
    }
    expected_stats = {
        "state_records": 2, "state_tombstones": 1, "applied": 6, "new_epochs": 3, "deletions": 2,
        "stale_of_deleted": 3, "repeats": 1, "gaps": 0, "ids_checked": 3 + len(history), "id_mismatches": 0,
    }  # fmt: skip
    for name, dump in dumps.items():
        with capsys.disabled():
            print(f"\n[consumers] crafted epochs, {name}: {dump['users']} {dump['stats']}")
        assert dump["users"] == expected_users, f"{name}: {dump['gaps']}"
        assert {k: dump["stats"][k] for k in expected_stats} == expected_stats, f"{name}: {dump['gaps']}"


def test_consumer_dump_shape_is_documented() -> None:
    """The README of examples/ documents the dump both consumers write; keep them in step."""
    readme = (EXAMPLES / "README.md").read_text()
    for field in (
        "users",
        "positions",
        "stats",
        "gaps",
        "state_records",
        "repeats",
        "new_epochs",
        "deletions",
        "ids_checked",
        "id_mismatches",
    ):
        assert re.search(rf"`{field}`", readme), f"examples/README.md does not describe `{field}`"
