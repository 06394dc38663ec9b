"""Grafana provisioning and dashboards: fixed uids, one datasource, valid PromQL over exported metrics only."""

from __future__ import annotations

from pathlib import Path

import promql_parser
import pytest
import yaml

from tests.ops.promql import (
    dashboards,
    expand_grafana,
    exported_names,
    metric_names,
    panel_queries,
    panels,
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


@pytest.mark.parametrize("name", sorted(dashboards()))
def test_panels_use_the_provisioned_datasource_and_rate_interval(name: str) -> None:
    board = dashboards()[name]
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, panel["title"]
        assert panel.get("description"), panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "prometheus"
            assert "[5m]" not in target["expr"] and "[1m]" not in target["expr"], "use $__rate_interval"
    for variable in board["templating"]["list"]:
        assert variable["datasource"]["uid"] == "prometheus"


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
    assert names <= exported_names(), f"{board} / {title}: not exported: {names - exported_names()}"


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
