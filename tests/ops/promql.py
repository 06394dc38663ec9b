"""PromQL helpers for the operations tests: the metric selectors inside an expression, and the metric names the
services export (read from their own registries, so a renamed metric breaks the dashboards' and alerts' tests)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import yaml
from prometheus_client import CollectorRegistry

from gateway.metrics import GatewayMetrics
from streams.checkonline import ReconcileMetrics
from streams.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "prometheus" / "alerts.yml"
DASHBOARDS = ROOT / "grafana" / "dashboards"

# Grafana's variables, replaced by what they stand for on a live dashboard.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$gateway_job": ".+",
    "$streams_job": ".+",
    # "All" of these matches series without the label too (docker-compose has no namespace).
    "$namespace": ".*",
    "$pod": ".*",
}


def expand_grafana(expr: str, rate_interval: str = "1m") -> str:
    values = dict(GRAFANA_VARIABLES, **{"$__rate_interval": rate_interval})
    # Longest names first: $__rate_interval before $__interval.
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace(name, values[name])
    leftover = re.search(r"\$\w+", expr)
    if leftover:
        raise ValueError(f"unknown Grafana variable {leftover.group()} in {expr!r}")
    return expr


def selectors(expr: str) -> list[promql_parser.VectorSelector]:
    """Every vector selector in the expression (range selectors reduced to their instant selector)."""
    found: list[promql_parser.VectorSelector] = []

    def walk(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)
            return
        if isinstance(node, promql_parser.MatrixSelector):
            walk(node.vector_selector)
            return
        for attr in ("expr", "lhs", "rhs", "param"):
            child = getattr(node, attr, None)
            if child is not None:
                walk(child)
        for arg in getattr(node, "args", None) or ():
            walk(arg)

    walk(promql_parser.parse(expr))
    return found


def metric_names(expr: str) -> set[str]:
    names = set()
    for selector in selectors(expr):
        if not selector.name:
            raise ValueError(f"selector without a metric name in {expr!r}")
        names.add(selector.name)
    return names


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def panel_queries() -> Iterator[tuple[str, str, str]]:
    """(dashboard file, panel title, raw expression) for every query of every panel."""
    for name, dashboard in dashboards().items():
        for panel in panels(dashboard):
            for target in panel.get("targets", []):
                yield name, panel["title"], target["expr"]


# Series the rules and dashboards read that the services do not export, each with where it comes from. The
# kafka-exporter names are the ones danielqsj/kafka_exporter v1.9.0 defines (kafka_exporter.go, its NewDesc
# calls); kube-state-metrics and cAdvisor/kubelet names are their standard ones (docs/operations.md lists what
# each rule and panel needs).
KAFKA_EXPORTER_METRICS = frozenset(
    {
        "kafka_brokers",
        "kafka_broker_info",
        "kafka_topic_partitions",
        "kafka_topic_partition_current_offset",
        "kafka_topic_partition_oldest_offset",
        "kafka_topic_partition_leader",
        "kafka_topic_partition_replicas",
        "kafka_topic_partition_in_sync_replica",
        "kafka_topic_partition_leader_is_preferred",
        "kafka_topic_partition_under_replicated_partition",
        "kafka_consumergroup_current_offset",
        "kafka_consumergroup_current_offset_sum",
        "kafka_consumergroup_lag",
        "kafka_consumergroup_lag_sum",
        "kafka_consumergroup_members",
    }
)
KUBE_STATE_METRICS = frozenset(
    {"kube_persistentvolumeclaim_info", "kube_pod_spec_volumes_persistentvolumeclaims_info"}
)
CADVISOR_KUBELET_METRICS = frozenset(
    {
        "container_cpu_usage_seconds_total",
        "container_cpu_cfs_throttled_periods_total",
        "container_cpu_cfs_periods_total",
        "container_memory_working_set_bytes",
        "container_spec_memory_limit_bytes",
        "kubelet_volume_stats_used_bytes",
        "kubelet_volume_stats_capacity_bytes",
    }
)
# `up` is Prometheus's own series for every target.
EXTERNAL_METRICS = frozenset({"up"}) | KAFKA_EXPORTER_METRICS | KUBE_STATE_METRICS | CADVISOR_KUBELET_METRICS


#: The prefix of the series a worker exports only while it reconciles (PRESENCE_RECONCILE_ENABLED).
RECONCILE_PREFIX = "presence_worker_reconcile_"


def exported_names() -> set[str]:
    """Every series name the gateway and the worker expose, as Prometheus stores them.

    The worker's reconciliation metrics (``presence_worker_reconcile_*``) are defined by ``ReconcileMetrics``, the
    contract the worker registers in its registry when it reconciles; they are read from that class, like the
    others, so a renamed one breaks the dashboards' and alerts' tests.
    """
    names: set[str] = set()
    registries: list[CollectorRegistry] = [
        GatewayMetrics(process_metrics=False).registry,
        WorkerMetrics().registry,
        ReconcileMetrics().registry,
    ]
    for registry in registries:
        for family in registry.collect():
            if family.type == "counter":
                names.update({f"{family.name}_total", f"{family.name}_created"})
            elif family.type == "histogram":
                names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count", "_created"))
            else:
                names.add(family.name)
    return names
