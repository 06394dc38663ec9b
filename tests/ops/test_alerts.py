"""The alert rules: promtool check and promtool test rules, and what every alert must carry."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.ops.promql import ALERTS, alert_rules, exported_names, metric_names

pytestmark = pytest.mark.ops

ROOT = Path(__file__).resolve().parents[2]
ALERT_TESTS = ROOT / "prometheus" / "alerts.test.yml"
OPERATIONS_DOC = ROOT / "docs" / "operations.md"

# The symptoms the product promises to alert on, and the alert that covers each.
EXPECTED = {
    "PresenceGatewayErrorRatioHigh",  # gateway 5xx ratio
    "PresenceGatewaySignatureFailuresSpiking",
    "PresenceGatewaySpoolGrowing",
    "PresenceGatewaySpoolNearlyFull",
    "PresenceGatewaySpoolStale",
    "PresenceGatewayKafkaBreakerOpen",
    "PresenceGatewayNotReady",
    "PresenceNoWebhookEvents",  # no events for too long (upstream)
    "PresenceConsumerLagRising",
    "PresenceConsumerLagHigh",  # messages
    "PresenceConsumerLagSecondsHigh",  # seconds
    "PresenceWorkerNoEvents",  # no events processed while the gateway publishes
    "PresenceWorkerNotReady",
    "PresenceWorkerRebalancingOften",
    "PresenceWorkerProcessingErrors",
    "PresencePipelineLatencyHigh",  # p99 over budget
}


def test_promtool_check_rules(promtool: Path) -> None:
    done = subprocess.run([str(promtool), "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(EXPECTED)} rules found" in done.stdout


def test_promtool_test_rules(promtool: Path) -> None:
    done = subprocess.run(
        [str(promtool), "test", "rules", ALERT_TESTS.name],
        cwd=ALERT_TESTS.parent,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_test_rules_catches_a_wrong_expectation(promtool: Path, tmp_path: Path) -> None:
    # The harness can fail: the same tests against rules whose 5xx threshold was raised tenfold do fail.
    (tmp_path / "alerts.yml").write_text(ALERTS.read_text().replace("> 0.01", "> 0.5"))
    (tmp_path / "alerts.test.yml").write_text(ALERT_TESTS.read_text())
    done = subprocess.run(
        [str(promtool), "test", "rules", "alerts.test.yml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode != 0
    assert "PresenceGatewayErrorRatioHigh" in done.stdout + done.stderr


def test_every_symptom_has_its_alert() -> None:
    assert {rule["alert"] for rule in alert_rules()} == EXPECTED


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_is_complete(rule: dict[str, object]) -> None:
    assert rule.get("for"), "every alert waits before firing"
    labels = rule["labels"]
    assert isinstance(labels, dict) and labels["severity"] in ("warning", "critical")
    annotations = rule["annotations"]
    assert isinstance(annotations, dict)
    for key in ("summary", "description", "runbook"):
        assert len(str(annotations.get(key, ""))) > 20, f"{key} missing or empty"
    assert f"### {rule['alert']}" in OPERATIONS_DOC.read_text(), "runbook section in docs/operations.md"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_is_tested_firing_and_quiet(rule: dict[str, object]) -> None:
    cases = [
        case
        for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case["alertname"] == rule["alert"]
    ]
    assert any(case["exp_alerts"] for case in cases), "no case where it fires"
    assert any(not case["exp_alerts"] for case in cases), "no case where it stays quiet"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_uses_only_exported_metrics(rule: dict[str, object]) -> None:
    names = metric_names(str(rule["expr"]))
    assert names
    assert names <= exported_names(), names - exported_names()
