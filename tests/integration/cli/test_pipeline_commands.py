"""simulate, query, tail, topics and replay against a pipeline that ``presence up`` runs, as subprocesses."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import orjson

from presence.children import wait_until
from tests.integration.streams.harness import read_topic, validator

from .conftest import SECRET, Up, presence


def _last_records(raw: list[tuple[int, int, bytes, bytes | None]]) -> dict[bytes, bytes | None]:
    last: dict[bytes, bytes | None] = {}
    for _, _, key, value in raw:
        last[key] = value
    return last


def test_simulate_sends_signed_traffic_and_counts_the_gateways_answers(pipeline: Up, tmp_path: Path) -> None:
    result = presence(
        "simulate", "--url", pipeline.webhook, "--seed", "11", "--users", "50", "--count", "1500",
        "--flat-out", "--json", env=pipeline.env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert summary["failed"] == 0 and summary["ok"] == summary["requests"] > 0
    # Every event is valid, so every one sent (retries included) is accepted.
    assert summary["accepted"] == summary["events_sent"] >= 1500
    assert summary["rejected"] == 0
    assert summary["scenarios"]["late_offline"] > 0 and summary["scenarios"]["kick"] > 0
    assert (
        summary["events_per_second"] > 0 and summary["latency_ms"]["p99"] >= summary["latency_ms"]["p50"] > 0
    )


def test_simulate_writes_a_deterministic_trace_and_replays_it(pipeline: Up, tmp_path: Path) -> None:
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path in (first, second):
        result = presence("simulate", "--seed", "5", "--count", "300", "--trace-out", str(path), "--no-send",
                          env=pipeline.env)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert f"to {path}" in result.stdout
    assert first.read_bytes() == second.read_bytes()
    events = sum(len(orjson.loads(line)["events"]) for line in first.read_bytes().splitlines()[1:])
    result = presence("simulate", "--url", pipeline.webhook, "--replay", str(first), "--flat-out", "--json",
                      env=pipeline.env)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["accepted"] == events


def test_simulate_with_the_wrong_secret_fails_and_says_why(pipeline: Up) -> None:
    result = presence("simulate", "--url", pipeline.webhook, "--secret", "not-the-secret", "--count", "100",
                      "--flat-out", env=pipeline.env)  # fmt: skip
    assert result.returncode == 1
    assert "HTTP 401" in result.stdout and "--secret" in result.stdout
    assert "0 events accepted" in result.stdout


def test_simulate_against_no_gateway_says_how_to_start_one(pipeline: Up) -> None:
    result = presence("simulate", "--url", "http://127.0.0.1:9/rongcloud/online-status", "--count", "5",
                      env=pipeline.env)  # fmt: skip
    assert result.returncode == 1
    assert "cannot reach the gateway" in result.stderr and "presence gateway" in result.stderr


def _demo_users(pipeline: Up) -> list[str]:
    raw = asyncio.run(read_topic(pipeline.bootstrap, pipeline.env["PRESENCE_TOPIC_STATE"]))
    return [key.decode() for key in sorted(_last_records(raw))[:3]]


def test_query_shows_known_users_and_exits_3_for_unknown_ones(pipeline: Up) -> None:
    users = _demo_users(pipeline)
    result = presence("query", "--url", pipeline.worker, *users, env=pipeline.env)
    assert result.returncode == 0, result.stdout + result.stderr
    for user in users:
        assert user in result.stdout
    assert any(word in result.stdout for word in ("online", "offline", "logged_out"))
    result = presence(
        "query", "--url", pipeline.worker, "--json", users[0], "nobody-like-this", env=pipeline.env
    )
    assert result.returncode == 3
    records = json.loads(result.stdout)
    assert records["nobody-like-this"] is None
    validator("state.v1.schema.json").validate(records[users[0]])


def test_query_without_a_worker_says_what_to_do(pipeline: Up) -> None:
    result = presence("query", "--url", "http://127.0.0.1:9", "u1", env=pipeline.env)
    assert result.returncode == 1
    assert "cannot reach the worker's query API" in result.stderr


def test_tail_shows_the_newest_transitions_and_one_users_state(pipeline: Up) -> None:
    env = pipeline.env
    result = presence("tail", "--no-follow", "-n", "4", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and all("→" in line and "seq" in line for line in lines)
    result = presence("tail", "--no-follow", "--from-beginning", "--json", env=env)
    transitions = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(transitions) > 10
    for payload in transitions:
        validator("transitions.v1.schema.json").validate(payload)
    user = transitions[-1]["userid"]
    result = presence("tail", "--user", user, "--state", "--no-follow", "--json", env=env)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert records and {r["userid"] for r in records} == {user}
    assert records[-1]["seq"] == max(t["seq"] for t in transitions if t["userid"] == user)


def test_tail_follows_new_transitions_until_count(pipeline: Up) -> None:
    env = pipeline.env
    import subprocess
    import sys

    follower = subprocess.Popen(
        [sys.executable, "-m", "presence.cli", "tail", "-n", "0", "--count", "3", "--idle-timeout", "60"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        attempt = iter(range(1000))

        # New traffic while it follows, from users never seen before, so each login is a transition. Until the
        # follower has reached the topic's end, what is sent may land before it: send again.
        def send() -> bool:
            prefix = f"follow-{next(attempt)}-"
            result = presence("simulate", "--url", pipeline.webhook, "--count", "30", "--user-prefix", prefix,
                              "--flat-out", env={**env, "PRESENCE_APP_SECRET": SECRET})  # fmt: skip
            assert result.returncode == 0, result.stdout
            return follower.poll() is not None

        wait_until(send, 60, "presence tail to exit after 3 new transitions", interval=1)
        out, err = follower.communicate(timeout=10)
    finally:
        if follower.poll() is None:
            follower.kill()
    assert follower.returncode == 0, err
    assert len(out.splitlines()) == 3


def test_tail_and_topics_fail_clearly_without_a_broker_or_a_topic(pipeline: Up) -> None:
    nowhere = {**pipeline.env, "PRESENCE_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9"}
    for command in (["tail", "--no-follow"], ["topics"], ["replay", "--app-id", "x"]):
        result = presence(*command, env=nowhere, timeout=60)
        assert result.returncode == 1, command
        assert (
            "cannot reach Kafka at 127.0.0.1:9" in result.stderr and "presence kafka start" in result.stderr
        )
        assert "Traceback" not in result.stderr
    missing = {**pipeline.env, "PRESENCE_TOPIC_TRANSITIONS": "no-such-topic-here"}
    result = presence("tail", "--no-follow", env=missing)
    assert result.returncode == 1
    assert "no-such-topic-here does not exist" in result.stderr and "presence create-topics" in result.stderr
    result = presence("topics", env=missing)
    assert result.returncode == 3
    assert "missing" in result.stdout


def test_topics_describes_partitions_configs_and_the_workers_lag(pipeline: Up) -> None:
    env = pipeline.env
    result = presence("topics", "--json", env=env)
    assert result.returncode == 0, result.stderr
    infos = {info["name"]: info for info in json.loads(result.stdout)}
    raw = infos[env["PRESENCE_TOPIC_RAW"]]
    assert raw["partitions"] == 4 and raw["messages"] > 0
    assert raw["config"]["cleanup.policy"] == "delete"
    state = infos[env["PRESENCE_TOPIC_STATE"]]["config"]
    # D2: STATE's compaction tuning as the settings' defaults put it (docs/consuming.md#retention).
    assert {key: state.get(key) for key in ("cleanup.policy", "segment.ms", "min.cleanable.dirty.ratio",
                                            "delete.retention.ms")} == {
        "cleanup.policy": "compact",
        "segment.ms": "3600000",
        "min.cleanable.dirty.ratio": "0.1",
        "delete.retention.ms": "86400000",
    }  # fmt: skip
    group = env["PRESENCE_WORKER_APP_ID"]
    assert group in raw["lag"]
    wait_until(lambda: json.loads(presence("topics", "--json", env=env).stdout)[0]["lag"][group] == 0, 60,
               "the worker's lag on RAW to reach 0")  # fmt: skip
    result = presence("topics", "--partitions", env=env)
    assert result.returncode == 0
    assert (
        env["PRESENCE_TOPIC_RAW"] in result.stdout
        and f"{group}: 0" in result.stdout
        and "p3=0" in result.stdout
        and all(part in result.stdout for part in ("segment 1 h", "dirty ratio 0.1", "tombstones 1 d"))
    )


def test_replay_rebuilds_the_same_state_without_touching_live_transitions(
    pipeline: Up, tmp_path: Path
) -> None:
    env = pipeline.env
    bootstrap = env["PRESENCE_KAFKA_BOOTSTRAP_SERVERS"]
    group = env["PRESENCE_WORKER_APP_ID"]
    # The live worker has processed all of RAW: its STATE is complete to compare with.
    wait_until(lambda: json.loads(presence("topics", "--json", env=env).stdout)[0]["lag"][group] == 0, 60,
               "the live worker to catch up")  # fmt: skip
    live_transitions = asyncio.run(read_topic(bootstrap, env["PRESENCE_TOPIC_TRANSITIONS"]))
    app_id = f"{group}-rebuild"
    result = presence("replay", "--app-id", app_id, "--run-dir", str(tmp_path), "--timeout", "150", env=env,
                      timeout=200)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "caught up" in result.stdout and f"PRESENCE_WORKER_APP_ID={app_id}" in result.stdout
    assert "100%" in result.stderr
    rebuilt = _last_records(asyncio.run(read_topic(bootstrap, f"{app_id}.state")))
    live = _last_records(asyncio.run(read_topic(bootstrap, env["PRESENCE_TOPIC_STATE"])))
    assert rebuilt and rebuilt == live
    replayed = asyncio.run(read_topic(bootstrap, f"{app_id}.transitions"))
    assert len(replayed) >= len(live_transitions) > 0
    # S11: nothing was added to the live TRANSITIONS topic.
    assert asyncio.run(read_topic(bootstrap, env["PRESENCE_TOPIC_TRANSITIONS"])) == live_transitions
    # Running it again with the same id resumes: nothing left to do.
    again = presence("replay", "--app-id", app_id, "--run-dir", str(tmp_path), env=env)
    assert again.returncode == 0 and "caught up" in again.stdout


def test_replay_refuses_to_write_where_live_workers_do(pipeline: Up) -> None:
    env = pipeline.env
    result = presence("replay", "--transitions-topic", env["PRESENCE_TOPIC_TRANSITIONS"], env=env)
    assert result.returncode == 1 and "never writes there" in result.stderr
    result = presence("replay", "--state-topic", env["PRESENCE_TOPIC_STATE"], env=env)
    assert result.returncode == 1 and "--into-live-state" in result.stderr
    result = presence("replay", "--app-id", env["PRESENCE_WORKER_APP_ID"], env=env)
    assert result.returncode == 1 and "live workers" in result.stderr
