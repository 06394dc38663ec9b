"""The alert rules: promtool check and promtool test rules, and what every alert must carry."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.ops.promql import (
    ALERTS,
    EXTERNAL_METRICS,
    alert_rules,
    exported_names,
    metric_names,
    selectors,
)

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
    "PresenceGatewayDeadLettersHigh",
    "PresenceWorkerDeadLettersHigh",
    "PresenceWorkerPartitionsUnassigned",  # assigned partitions < partitions
    # Targets that fail or are missing: without these, every other rule goes quiet with them.
    "PresenceTargetDown",
    "PresenceGatewayTargetsAbsent",
    "PresenceWorkerTargetsAbsent",
    "PresenceConsumerGroupWithoutWorkers",
    "PresenceKafkaExporterAbsent",
    # Lag measured at the broker: keeps firing when the workers' series are gone.
    "PresenceConsumerGroupLagHigh",
    "PresenceConsumerGroupStalled",
    "PresenceGatewaySpoolVolumeWithoutPod",
    # Reconciliation (RongCloud checkOnline): lost callbacks, the API failing or throttling, a backlog.
    "PresenceReconcileCorrectionsHigh",
    "PresenceReconcileApiFailing",
    "PresenceReconcileThrottled",
    "PresenceReconcileQueueBacklog",
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
    known = exported_names() | EXTERNAL_METRICS
    assert names <= known, names - known


def test_the_metric_check_knows_no_product_name_it_does_not_export() -> None:
    # The external list must not hide a typo in a product metric: none of its names is one of ours.
    assert not {name for name in EXTERNAL_METRICS if name.startswith("presence_")}


def _matchers(selector: object) -> dict[str, str]:
    found = {}
    for matcher in getattr(getattr(selector, "matchers", None), "matchers", None) or ():
        found[matcher.name] = matcher.value
    return found


def test_external_series_are_picked_by_the_component_label_the_scrape_configs_set() -> None:
    """`up` and kafka-exporter series are selected by `component`, which the compose Prometheus and the chart's
    ServiceMonitors set; a rule on `up` without it would also watch unrelated targets."""
    compose = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    set_by_compose = {
        labels["component"]
        for job in compose["scrape_configs"]
        for static in job["static_configs"]
        for labels in [static.get("labels", {})]
        if "component" in labels
    }
    assert set_by_compose == {"gateway", "streams", "kafka-exporter"}
    for rule in alert_rules():
        for selector in selectors(str(rule["expr"])):
            if selector.name == "up" or selector.name.startswith("kafka_"):
                component = _matchers(selector).get("component")
                assert component, f"{rule['alert']}: {selector} has no component matcher"
                assert set(component.split("|")) <= set_by_compose, (rule["alert"], component)


def test_the_5xx_alert_counts_every_outcome_that_is_not_a_success_or_a_4xx() -> None:
    """A new outcome the gateway counts (an unhandled exception, say) is a 5xx for the alert unless it is listed
    as a success or 4xx here and in the rule; an outcome the rule excludes must be one the gateway has."""
    from gateway.metrics import OUTCOMES

    (rule,) = [r for r in alert_rules() if r["alert"] == "PresenceGatewayErrorRatioHigh"]
    numerator = next(s for s in selectors(str(rule["expr"])) if "outcome" in _matchers(s))
    excluded = set(_matchers(numerator)["outcome"].split("|"))
    assert excluded <= set(OUTCOMES)
    assert set(OUTCOMES) - excluded == {"unavailable", "error"}
