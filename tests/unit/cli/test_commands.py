"""Commands that need no broker: check-signature, argument errors, and the pure helpers behind the others."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from core.settings import CommonSettings
from presence import replay
from presence.cli import _duration, main
from presence.live import histogram_quantile, parse_metrics

VECTOR = ["--secret", "Y1W2MeFwwwRxa0", "--nonce", "14314", "--timestamp", "1408710653000"]
EXPECTED = "30be0bbca9c9b2e27578701e9fda2358a814c88f"


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=env)
    return result.exit_code, result.output


def test_check_signature_computes_the_official_test_vector() -> None:
    code, output = run("check-signature", *VECTOR)
    assert code == 0
    assert f"expected   {EXPECTED}" in output
    assert "OUTSIDE the ±600 s window" in output  # a 2014 timestamp


def test_check_signature_verifies_case_insensitively_and_reports_a_mismatch() -> None:
    assert run("check-signature", *VECTOR, "--signature", EXPECTED.upper())[0] == 0
    code, output = run("check-signature", *VECTOR, "--signature", "0" * 40)
    assert code == 1
    assert "does NOT match" in output


def test_check_signature_names_common_mistakes() -> None:
    code, output = run(
        "check-signature", *VECTOR[:1], "Y1W2MeFwwwRxa0\n", *VECTOR[2:], "--signature", EXPECTED
    )
    assert code == 1 and "whitespace" in output
    from core.contract import compute_signature

    in_seconds = compute_signature("Y1W2MeFwwwRxa0", "14314", "1408710653")
    code, output = run("check-signature", *VECTOR, "--signature", in_seconds)
    assert code == 1 and "in seconds" in output


def test_check_signature_reads_a_captured_url_with_old_parameter_names() -> None:
    url = f"https://example.com/cb?appKey=k&rc-nonce=14314&rc-timestamp=1408710653000&rc-signature={EXPECTED}"
    code, output = run("check-signature", "--secret", "Y1W2MeFwwwRxa0", "--url", url)
    assert code == 0, output
    assert "appKey     k" in output and "signature matches" in output


def test_check_signature_takes_the_secret_from_the_environment_and_says_what_is_missing() -> None:
    assert run("check-signature", *VECTOR[2:], env={"PRESENCE_APP_SECRET": "Y1W2MeFwwwRxa0"})[0] == 0
    code, output = run("check-signature", *VECTOR[2:], env={"PRESENCE_APP_SECRET": ""})
    assert code == 2 and "--secret" in output
    code, output = run("check-signature", "--secret", "s", "--nonce", "1")
    assert code == 2 and "--timestamp" in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["simulate", "--secret", "s", "--duration", "1", "--count", "2"], "not both"),
        (["simulate", "--count", "5"], "no app secret"),
        (["simulate", "--count", "5", "--no-send"], "--trace-out"),
        (["simulate", "--rate", "-1", "--secret", "s"], "--rate"),
        (["query"], "Missing argument"),
        (["tail", "--lines", "-1"], "--lines"),
        (["up", "--rate", "0"], "--rate"),
        (["replay", "--into-live-state", "--state-topic", "elsewhere"], "give one of them"),
    ],
)
def test_wrong_arguments_exit_2_with_a_message_naming_the_option(args: list[str], message: str) -> None:
    code, output = run(*args, env={"PRESENCE_APP_SECRET": ""})
    assert code == 2, output
    assert message in output


def test_simulate_replays_only_real_trace_files(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.jsonl"
    bogus.write_text('{"not": "a trace"}\n')
    code, output = run("simulate", "--secret", "s", "--replay", str(bogus))
    assert code == 1 and "is not a trace file" in output


def test_every_command_has_help_a_newcomer_can_read() -> None:
    for command in ("simulate", "up", "tail", "query", "topics", "replay", "check-signature"):
        code, output = run(command, "--help")
        assert code == 0
        assert "Usage: main " + command in output or f"Usage: main {command}" in output
        assert len(output.splitlines()) > 8, command


def test_the_replay_plan_never_touches_what_live_workers_own() -> None:
    settings = CommonSettings(topic_transitions="live.tr", topic_state="live.state")
    ok = replay.ReplayPlan.named("rebuild-1", Path(".run"), None, None)
    replay.check_plan(ok, settings, "presence-worker", into_live_state=False)
    assert (ok.state_topic, ok.transitions_topic, ok.dlq_topic) == (
        "rebuild-1.state",
        "rebuild-1.transitions",
        "rebuild-1.dlq",
    )
    bad = [
        (replay.ReplayPlan.named("presence-worker", Path(".run"), None, None), False, "live workers"),
        (replay.ReplayPlan.named("r", Path(".run"), None, "live.tr"), False, "never writes there"),
        (replay.ReplayPlan.named("r", Path(".run"), "live.state", None), False, "--into-live-state"),
    ]
    for plan, into_live, message in bad:
        with pytest.raises(RuntimeError, match=message):
            replay.check_plan(plan, settings, "presence-worker", into_live)
    replay.check_plan(
        replay.ReplayPlan.named("r", Path(".run"), "live.state", None), settings, "presence-worker", True
    )


def test_replay_progress_counts_only_the_part_of_raw_it_covers() -> None:
    from aiokafka import TopicPartition

    extent = {
        TopicPartition("raw", 0): (10, 20),
        TopicPartition("raw", 1): (0, 0),
        TopicPartition("raw", 2): (0, 5),
    }
    assert replay.measure(extent, {}).fraction == 0
    progress = replay.measure(extent, {TopicPartition("raw", 0): 15, TopicPartition("raw", 2): 9})
    assert (progress.total, progress.done, progress.remaining) == (15, 10, 5)


def test_metrics_are_read_into_the_live_view() -> None:
    worker = (
        "presence_worker_online_users 3.0\n"
        'presence_worker_events_total{outcome="applied"} 10.0\n'
        'presence_worker_events_total{outcome="stale"} 2.0\n'
        'presence_worker_transitions_total{from_status="offline",to_status="online"} 4.0\n'
        'presence_worker_consumer_lag_messages{partition="0"} 5.0\n'
        'presence_worker_consumer_lag_messages{partition="1"} 1.0\n'
        'presence_worker_pipeline_latency_seconds_bucket{le="0.1"} 1.0\n'
        'presence_worker_pipeline_latency_seconds_bucket{le="1.0"} 4.0\n'
        'presence_worker_pipeline_latency_seconds_bucket{le="+Inf"} 4.0\n'
    )
    gateway = 'presence_gateway_requests_total{outcome="accepted"} 7.0\n'
    snap = parse_metrics(worker, gateway)
    assert (snap.online_users, snap.processed, snap.transitions, snap.lag) == (3, 12, 4, 6)
    assert snap.gateway_requests == {"accepted": 7}
    assert histogram_quantile(0.5, snap.latency_buckets, {}) == 1.0
    assert histogram_quantile(0.25, snap.latency_buckets, {}) == 0.1
    assert histogram_quantile(0.5, snap.latency_buckets, snap.latency_buckets) is None


def test_retention_is_shown_in_words() -> None:
    assert [_duration(ms) for ms in (-1, 604_800_000, 3_600_000, 90_000, 1500)] == [
        "kept forever", "7 d", "1 h", "90 s", "1500 ms",
    ]  # fmt: skip
