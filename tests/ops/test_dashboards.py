"""Grafana provisioning and dashboards: fixed uids, one datasource, valid PromQL over exported metrics only."""

from __future__ import annotations

from pathlib import Path

import promql_parser
import pytest
import yaml

from tests.ops.promql import (
    CADVISOR_KUBELET_METRICS,
    EXTERNAL_METRICS,
    dashboards,
    expand_grafana,
    exported_names,
    metric_names,
    panel_queries,
    panels,
    selectors,
)

pytestmark = pytest.mark.ops

ROOT = Path(__file__).resolve().parents[2]
PROVISIONING = ROOT / "grafana" / "provisioning"


def test_datasource_has_the_fixed_uid_the_dashboards_use() -> None:
    (source,) = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["uid"] == "prometheus" and source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"


def test_dashboard_provider_loads_the_directory_compose_mounts() -> None:
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "presence.yml").read_text())["providers"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


def test_the_four_dashboards_with_fixed_uids() -> None:
    uids = {name: board["uid"] for name, board in dashboards().items()}
    assert uids == {
        "gateway.json": "presence-gateway",
        "kafka-publish.json": "presence-kafka-publish",
        "stream-processing.json": "presence-streams",
        "presence.json": "presence-domain",
    }


CHOSEN_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@pytest.mark.parametrize("name", sorted(dashboards()))
def test_panels_use_the_chosen_datasource_and_rate_interval(name: str) -> None:
    board = dashboards()[name]
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == CHOSEN_DATASOURCE, panel["title"]
        assert panel.get("description"), panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == CHOSEN_DATASOURCE
            assert "[5m]" not in target["expr"] and "[1m]" not in target["expr"], "use $__rate_interval"
    variables = board["templating"]["list"]
    # A Grafana whose Prometheus has another uid (the sidecar's, a shared one) picks it; compose's is the default.
    (datasource,) = [v for v in variables if v["name"] == "datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    assert datasource["current"]["value"] == "prometheus"
    for variable in variables:
        if variable is not datasource:
            assert variable["datasource"] == CHOSEN_DATASOURCE


@pytest.mark.parametrize("name", sorted(dashboards()))
def test_every_dashboard_filters_by_namespace_and_pod(name: str) -> None:
    board = dashboards()[name]
    names = [v["name"] for v in board["templating"]["list"]]
    assert names[:2] == ["datasource", "namespace"] and names[-1] == "pod"
    for variable in board["templating"]["list"][1:]:
        assert variable["includeAll"] and variable["multi"], variable["name"]
    for _, title, expr in [q for q in panel_queries() if q[0] == name]:
        for selector in selectors(expand_grafana(expr)):
            matchers = {m.name for m in selector.matchers.matchers}
            if selector.name in EXTERNAL_METRICS:
                assert "namespace" in matchers, f"{title}: {selector}"
                continue
            assert {"namespace", "job", "pod"} <= matchers, f"{title}: {selector}"
    raw = " ".join(expr for board_name, _, expr in panel_queries() if board_name == name)
    assert '=~"$namespace"' in raw and '=~"$pod"' in raw


def test_legends_name_pods_not_addresses() -> None:
    for name, board in dashboards().items():
        for panel in panels(board):
            for target in panel.get("targets", []):
                assert "{{instance}}" not in target.get("legendFormat", ""), f"{name} / {panel['title']}"
    legends = [
        t.get("legendFormat") for b in dashboards().values() for p in panels(b) for t in p.get("targets", [])
    ]
    assert legends.count("{{pod}}") >= 8


@pytest.mark.parametrize(
    ("name", "container", "claim"),
    [("gateway.json", "gateway", "spool"), ("stream-processing.json", "streams", "state")],
)
def test_saturation_panels_for_cpu_memory_and_the_volume(name: str, container: str, claim: str) -> None:
    queries = " ".join(expr for board, _, expr in panel_queries() if board == name)
    for metric in (
        "container_cpu_usage_seconds_total",
        "container_cpu_cfs_throttled_periods_total",
        "container_memory_working_set_bytes",
        "container_spec_memory_limit_bytes",
        "kubelet_volume_stats_used_bytes",
        "kubelet_volume_stats_capacity_bytes",
    ):
        assert metric in queries, metric
    # The chart's container and volume claim template names.
    assert f'container="{container}"' in queries
    assert f'persistentvolumeclaim=~"{claim}-$pod"' in queries


@pytest.mark.parametrize(
    ("board", "title", "expr"),
    list(panel_queries()),
    ids=lambda value: str(value)[:60] if isinstance(value, str) else "",
)
def test_panel_query_parses_and_uses_exported_metrics(board: str, title: str, expr: str) -> None:
    expanded = expand_grafana(expr)
    promql_parser.parse(expanded)
    names = metric_names(expanded)
    assert names, f"{board} / {title}: no metric"
    known = exported_names() | CADVISOR_KUBELET_METRICS
    assert names <= known, f"{board} / {title}: not exported: {names - known}"


def test_the_metric_check_would_catch_a_typo() -> None:
    assert metric_names("sum(rate(presence_gateway_request_total[1m]))") - exported_names() == {
        "presence_gateway_request_total"
    }


def test_dashboards_cover_the_promised_views() -> None:
    queries = " ".join(expr for _, _, expr in panel_queries())
    for needed in (
        "presence_worker_consumer_lag_messages",
        "presence_worker_consumer_lag_seconds",
        "presence_worker_pipeline_latency_seconds_bucket",
        "presence_worker_rebalances_total",
        "presence_worker_processing_errors_total",
        "presence_worker_online_users",
        "presence_worker_online_sessions",
        "presence_worker_transitions_total",
        "presence_gateway_requests_total",
        "presence_gateway_request_duration_seconds_bucket",
        "presence_gateway_kafka_publish_duration_seconds_bucket",
        "presence_gateway_spool_bytes",
    ):
        assert needed in queries, needed
