"""The Helm chart: helm lint and helm template for every ci/*-values.yaml scenario, the rendered manifests checked
against the Kubernetes schemas (kubernetes-validate, offline) and the prometheus-operator CRDs, and the chart's
promises (probes, security context, volumes, secrets, limits) asserted on the rendered objects."""

from __future__ import annotations

import http.server
import json
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.ops.conftest import tool_file
from tests.ops.promql import ALERTS, DASHBOARDS

pytestmark = pytest.mark.ops

CHART = Path(__file__).resolve().parents[2] / "charts" / "presence"
SCENARIOS = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest kubernetes-validate knows.
KUBE_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
MINIMAL = {"app.key": "k", "app.secret": "a-secret-value", "kafka.bootstrapServers": "kafka:9092"}

Manifests = list[dict[str, Any]]


def render(helm: Path, *args: str, values: dict[str, str] | None = None, check: bool = True) -> Manifests:
    command = [str(helm), "template", "rel", str(CHART), "--namespace", "presence", *args]
    for key, value in (values or {}).items():
        command += ["--set", f"{key}={value}"]
    done = subprocess.run(command, capture_output=True, text=True)
    if check and done.returncode != 0:
        pytest.fail(f"helm template failed: {done.stderr}")
    if done.returncode != 0:
        raise RenderError(done.stderr)
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


class RenderError(Exception):
    pass


def find(manifests: Manifests, kind: str, component: str | None = None) -> list[dict[str, Any]]:
    return [
        m
        for m in manifests
        if m["kind"] == kind
        and (component is None or m["metadata"]["labels"].get("app.kubernetes.io/component") == component)
    ]


def one(manifests: Manifests, kind: str, component: str | None = None) -> dict[str, Any]:
    found = find(manifests, kind, component)
    assert len(found) == 1, f"expected one {kind} {component or ''}, got {len(found)}"
    return found[0]


@cache
def crd_schemas() -> dict[str, dict[str, Any]]:
    """The custom resources' schemas by apiVersion and kind: prometheus-operator's, and Strimzi's KafkaTopic and
    KafkaUser (kafka.strimzi.io/v1beta2, generated from Strimzi's artefacts by scripts/install-tools)."""
    schemas = {}
    for file, version_name in (
        ("monitoring.coreos.com_servicemonitors", "v1"),
        ("monitoring.coreos.com_prometheusrules", "v1"),
        ("kafka.strimzi.io_kafkatopics", "v1beta2"),
        ("kafka.strimzi.io_kafkausers", "v1beta2"),
    ):
        crd = yaml.safe_load(tool_file(f"crds/{file}.yaml").read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == version_name)
        api_version = f"{crd['spec']['group']}/{version_name}"
        schemas[f"{api_version} {crd['spec']['names']['kind']}"] = version["schema"]["openAPIV3Schema"]
    return schemas


def crd_schema(manifest: dict[str, Any]) -> dict[str, Any] | None:
    schema = crd_schemas().get(f"{manifest['apiVersion']} {manifest['kind']}")
    group = manifest["apiVersion"].split("/")[0]
    if schema is None and group in ("monitoring.coreos.com", "kafka.strimzi.io"):
        pytest.fail(f"no CRD schema for {manifest['apiVersion']} {manifest['kind']}")
    return schema


@pytest.fixture(scope="module")
def rendered(helm: Path) -> Callable[[str], Manifests]:
    cache_: dict[str, Manifests] = {}

    def get(scenario: str) -> Manifests:
        if scenario not in cache_:
            cache_[scenario] = render(helm, "-f", str(CHART / "ci" / scenario))
        return cache_[scenario]

    return get


def test_every_scenario_is_present() -> None:
    assert SCENARIOS == [
        "external-kafka-values.yaml",
        "minimal-values.yaml",
        "production-values.yaml",
        "strimzi-values.yaml",
    ]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_passes(helm: Path, scenario: str) -> None:
    done = subprocess.run(
        [str(helm), "lint", "--strict", str(CHART), "-f", str(CHART / "ci" / scenario)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_rendered_manifests_match_the_kubernetes_schemas(
    rendered: Callable[[str], Manifests], scenario: str, kube_version: str
) -> None:
    manifests = rendered(scenario)
    assert len(manifests) >= 10
    for manifest in manifests:
        where = f"{manifest['kind']} {manifest['metadata']['name']}"
        schema = crd_schema(manifest)
        if schema is not None:
            errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(manifest), key=str)
            assert not errors, f"{where}: {errors[0].message} at {list(errors[0].absolute_path)}"
            continue
        try:
            kubernetes_validate.validate(manifest, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(
                f"{where} is invalid for Kubernetes {kube_version}: {exc.message} at {list(exc.path)}"
            )


def test_the_crd_check_rejects_a_bad_prometheus_rule() -> None:
    bad = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "x"},
        "spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "for": "often"}]}]},
    }
    assert list(
        jsonschema.Draft7Validator(crd_schemas()["monitoring.coreos.com/v1 PrometheusRule"]).iter_errors(bad)
    )


def test_the_kubernetes_check_rejects_an_unknown_field() -> None:
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"portz": []}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSIONS[0], strict=True)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pods_run_non_root_read_only_with_probes_and_resources(
    rendered: Callable[[str], Manifests], scenario: str
) -> None:
    workloads = [m for m in rendered(scenario) if m["kind"] in ("Deployment", "StatefulSet")]
    assert {m["metadata"]["labels"]["app.kubernetes.io/component"] for m in workloads} - {
        "kafka-exporter"
    } == {
        "gateway",
        "streams",
    }
    for workload in workloads:
        if workload["metadata"]["labels"]["app.kubernetes.io/component"] == "kafka-exporter":
            continue  # checked in test_kafka_exporter_*
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        (container,) = pod["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["resources"]["requests"]["cpu"]
        assert container["resources"]["limits"]["memory"]
        assert "tmp" in {m["name"] for m in container["volumeMounts"]}, "a writable /tmp on a read-only root"
        component = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        assert container["args"] == ["gateway" if component == "gateway" else "worker"]


def test_gateway_spool_is_on_a_persistent_volume_per_replica(rendered: Callable[[str], Manifests]) -> None:
    manifests = rendered("production-values.yaml")
    gateway = one(manifests, "StatefulSet", "gateway")
    (claim,) = gateway["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "spool"
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    assert gateway["spec"]["persistentVolumeClaimRetentionPolicy"] == {
        "whenScaled": "Retain",
        "whenDeleted": "Retain",
    }
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    assert {"name": "spool", "mountPath": "/var/lib/presence/spool"} in container["volumeMounts"]
    # The pod outlives the preStop pause, the in-flight requests and the spool drain.
    config = one([m for m in manifests if m["metadata"]["name"] == "rel-presence-gateway"], "ConfigMap")[
        "data"
    ]
    grace = gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # Autoscaled: the preStop hook first waits for the spool to empty (at most 300 s after a 10 s pause).
    script = container["lifecycle"]["preStop"]["exec"]["command"][2]
    assert "time.sleep(10)" in script and "+ 300" in script
    drain = int(config["PRESENCE_GATEWAY_SHUTDOWN_GRACE_SECONDS"]) + int(
        config["PRESENCE_GATEWAY_SHUTDOWN_DRAIN_SECONDS"]
    )
    assert grace > 10 + 300 + drain
    assert config["PRESENCE_GATEWAY_SPOOL_DIR"] == "/var/lib/presence/spool"
    hpa = one(manifests, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"
    assert "replicas" not in gateway["spec"]


def test_without_persistence_the_gateway_is_a_deployment(rendered: Callable[[str], Manifests]) -> None:
    manifests = rendered("external-kafka-values.yaml")
    gateway = one(manifests, "Deployment", "gateway")
    volumes = {v["name"]: v for v in gateway["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["spool"]
    assert not find(manifests, "StatefulSet", "gateway")


def test_streams_statefulset_keeps_rocksdb_state_and_routes_through_a_headless_service(
    rendered: Callable[[str], Manifests],
) -> None:
    manifests = rendered("minimal-values.yaml")
    streams = one(manifests, "StatefulSet", "streams")
    assert streams["spec"]["replicas"] <= 12
    (claim,) = streams["spec"]["volumeClaimTemplates"]
    (container,) = streams["spec"]["template"]["spec"]["containers"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/var/lib/presence/streams"} in container[
        "volumeMounts"
    ]
    headless = next(s for s in find(manifests, "Service", "streams") if s["spec"].get("clusterIP") == "None")
    assert streams["spec"]["serviceName"] == headless["metadata"]["name"]
    assert headless["spec"]["publishNotReadyAddresses"] is True
    env = {e["name"]: e for e in container["env"]}
    assert env["PRESENCE_WORKER_CANONICAL_URL"]["value"] == (
        f"http://$(POD_NAME).{headless['metadata']['name']}.presence.svc.cluster.local:6066"
    )
    names = [e["name"] for e in container["env"]]
    assert names.index("POD_NAME") < names.index("PRESENCE_WORKER_CANONICAL_URL")


def test_settings_reach_the_containers_as_presence_variables(rendered: Callable[[str], Manifests]) -> None:
    manifests = rendered("production-values.yaml")
    common = next(
        m for m in manifests if m["kind"] == "ConfigMap" and m["metadata"]["name"] == "rel-presence"
    )
    assert common["data"]["PRESENCE_APP_KEY"] == "prod-app-key"
    assert common["data"]["PRESENCE_TOPIC_PARTITIONS"] == "24"
    assert common["data"]["PRESENCE_TOPIC_RAW_RETENTION_MS"] == "1209600000"
    assert common["data"]["PRESENCE_ENV"] == "prod"
    streams_config = next(
        m for m in manifests if m["metadata"]["name"] == "rel-presence-streams" and m["kind"] == "ConfigMap"
    )
    assert streams_config["data"]["PRESENCE_WORKER_OFFLINE_GRACE_SECONDS"] == "30"
    gateway_config = next(
        m for m in manifests if m["metadata"]["name"] == "rel-presence-gateway" and m["kind"] == "ConfigMap"
    )
    assert gateway_config["data"]["PRESENCE_GATEWAY_ALLOW_CIDRS"] == "203.0.113.0/24,198.51.100.0/24"
    # Every variable the chart sets is one the services read.
    from gateway.config import GatewaySettings
    from streams.config import WorkerSettings

    known = {
        f"PRESENCE_{name.upper()}" for name in (*GatewaySettings.model_fields, *WorkerSettings.model_fields)
    }
    for config_map in find(manifests, "ConfigMap"):
        if config_map["metadata"]["name"].endswith("-dashboards"):
            continue
        assert set(config_map["data"]) <= known, set(config_map["data"]) - known


def test_app_secret_comes_from_an_existing_secret_with_the_previous_one_optional(
    rendered: Callable[[str], Manifests],
) -> None:
    manifests = rendered("production-values.yaml")
    (container,) = one(manifests, "StatefulSet", "gateway")["spec"]["template"]["spec"]["containers"]
    env = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container["env"]
        if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]
    }
    assert env["PRESENCE_APP_SECRET"] == {"name": "presence-app-credentials", "key": "app-secret"}
    assert env["PRESENCE_APP_SECRET_PREVIOUS"] == {
        "name": "presence-app-credentials",
        "key": "app-secret-previous",
        "optional": True,
    }
    secret = one(manifests, "Secret")
    assert set(secret["data"]) == {"query-token"}


def test_sasl_and_tls_settings_for_an_external_kafka(rendered: Callable[[str], Manifests]) -> None:
    manifests = rendered("external-kafka-values.yaml")
    common = next(
        m for m in manifests if m["kind"] == "ConfigMap" and m["metadata"]["name"] == "rel-presence"
    )
    assert common["data"]["PRESENCE_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert common["data"]["PRESENCE_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert common["data"]["PRESENCE_KAFKA_SASL_USERNAME"] == "presence"
    secret = one(manifests, "Secret")
    assert set(secret["data"]) == {"app-secret", "app-secret-previous"}
    for workload in (one(manifests, "Deployment", "gateway"), one(manifests, "StatefulSet", "streams")):
        pod = workload["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["PRESENCE_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "kafka-credentials",
            "key": "password",
        }
        assert env["PRESENCE_KAFKA_SSL_CAFILE"]["value"] == "/etc/presence/kafka-tls/ca.crt"
        assert env["PRESENCE_KAFKA_SSL_CERTFILE"]["value"] == "/etc/presence/kafka-tls/tls.crt"
        assert env["PRESENCE_KAFKA_SSL_KEYFILE"]["value"] == "/etc/presence/kafka-tls/tls.key"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["kafka-tls"]["secret"]["secretName"] == "kafka-client-tls"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"app.key": ""}, "app.key is required"),
        ({"app.secret": "short"}, "app.secret (at least 8 characters) or app.existingSecret is required"),
        ({"kafka.bootstrapServers": ""}, "kafka.bootstrapServers is required"),
        ({"streams.replicaCount": "13"}, "streams.replicaCount (13) exceeds topics.partitions (12)"),
        (
            {"gateway.terminationGracePeriodSeconds": "20"},
            "gateway.terminationGracePeriodSeconds (20) must be at least 50",
        ),
        ({"kafka.securityProtocol": "SASL_SSL"}, "needs kafka.sasl.mechanism and kafka.sasl.username"),
        (
            {"kafka.tls.enabled": "true", "kafka.tls.existingSecret": "x"},
            "needs kafka.securityProtocol SSL or SASL_SSL",
        ),
        ({"gateway.replicas": "3"}, "additional properties 'replicas' not allowed"),
        ({"logLevel": "TRACE"}, "logLevel"),
    ],
)
def test_bad_values_fail_the_render_with_the_value_to_fix(
    helm: Path, values: dict[str, str], message: str
) -> None:
    with pytest.raises(RenderError) as failed:
        render(helm, values={**MINIMAL, **values}, check=False)
    assert message in str(failed.value)


def test_minimal_values_render(helm: Path) -> None:
    assert find(render(helm, values=MINIMAL), "StatefulSet")


def test_monitoring_objects_carry_the_repository_alerts_and_dashboards(
    rendered: Callable[[str], Manifests],
) -> None:
    manifests = rendered("production-values.yaml")
    rule = one(manifests, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]
    dashboards = next(m for m in manifests if m["metadata"]["name"].endswith("-dashboards"))
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboards["metadata"]["namespace"] == "monitoring"
    repository = {p.name: p.read_text() for p in DASHBOARDS.glob("*.json")}
    assert len(repository) == 4
    assert {name: text.rstrip("\n") for name, text in dashboards["data"].items()} == {
        name: text.rstrip("\n") for name, text in repository.items()
    }
    monitors = find(manifests, "ServiceMonitor")
    assert {m["metadata"]["labels"]["app.kubernetes.io/component"] for m in monitors} == {
        "gateway",
        "streams",
        "kafka-exporter",
    }
    # Each ServiceMonitor selects exactly one Service of its component.
    services = find(manifests, "Service")
    for monitor in monitors:
        wanted = monitor["spec"]["selector"]["matchLabels"]
        matching = [s for s in services if wanted.items() <= s["metadata"]["labels"].items()]
        assert len(matching) == 1, monitor["metadata"]["name"]
        ports = {p["name"] for p in matching[0]["spec"]["ports"]}
        assert monitor["spec"]["endpoints"][0]["port"] in ports


def test_network_policies_keep_the_query_api_cluster_internal(rendered: Callable[[str], Manifests]) -> None:
    manifests = rendered("minimal-values.yaml")
    streams_policy = one(manifests, "NetworkPolicy", "streams")
    (rule,) = streams_policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "web", "protocol": "TCP"}]
    assert all("ipBlock" not in peer for peer in rule["from"])
    gateway_policy = one(manifests, "NetworkPolicy", "gateway")
    assert gateway_policy["spec"]["ingress"][0]["ports"] == [{"port": "http", "protocol": "TCP"}]
    production = rendered("production-values.yaml")
    assert "Egress" in one(production, "NetworkPolicy", "streams")["spec"]["policyTypes"]


def test_helm_test_pod_checks_both_components(rendered: Callable[[str], Manifests]) -> None:
    pod = next(m for m in rendered("minimal-values.yaml") if m["kind"] == "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = pod["spec"]["containers"][0]["args"][0]
    assert "rel-presence-gateway:80" in script and "rel-presence-streams:6066" in script
    compile(script, "helm-test", "exec")


def test_the_chart_reads_the_one_copy_of_the_alerts_and_dashboards(helm: Path, tmp_path: Path) -> None:
    # Kept once (prometheus/alerts.yml, grafana/dashboards/): the chart reaches them through symlinks, which helm
    # follows when it renders and copies as plain files when it packages, so a published chart is complete.
    alerts_link, dashboards_link = CHART / "files" / "alerts.yml", CHART / "dashboards"
    assert alerts_link.is_symlink() and alerts_link.resolve() == ALERTS.resolve()
    assert dashboards_link.is_symlink() and dashboards_link.resolve() == DASHBOARDS.resolve()
    done = subprocess.run(
        [str(helm), "package", str(CHART), "--destination", str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (package,) = tmp_path.glob("presence-*.tgz")
    with tarfile.open(package) as archive:
        members = {m.name: m for m in archive.getmembers()}

        def read(name: str) -> str:
            member = members[f"presence/{name}"]
            assert member.isfile(), f"{name} is packaged as a link, not as its content"
            extracted = archive.extractfile(member)
            assert extracted is not None
            return extracted.read().decode()

        assert read("files/alerts.yml") == ALERTS.read_text()
        boards = sorted(p.name for p in DASHBOARDS.glob("*.json"))
        assert boards and all(
            read(f"dashboards/{name}") == (DASHBOARDS / name).read_text() for name in boards
        )


# --- scaling, shutdown and rebalances ------------------------------------------------------------------------------

AUTOSCALED = {**MINIMAL, "gateway.autoscaling.enabled": "true"}


def test_autoscaling_a_persistent_spool_is_refused_without_the_prestop_drain(helm: Path) -> None:
    with pytest.raises(RenderError) as failed:
        render(helm, values=AUTOSCALED, check=False)
    assert "gateway.autoscaling.enabled with a persistent spool strands events" in str(failed.value)
    assert "gateway.shutdown.preStopDrain.enabled=true" in str(failed.value)
    # With the drain (and a grace period that covers it) it renders; without persistence there is no volume to strand.
    drained = render(
        helm,
        values={
            **AUTOSCALED,
            "gateway.shutdown.preStopDrain.enabled": "true",
            "gateway.terminationGracePeriodSeconds": "400",
        },
    )
    assert one(drained, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"
    assert one(
        render(helm, values={**AUTOSCALED, "gateway.spool.persistence.enabled": "false"}),
        "Deployment",
        "gateway",
    )


def test_the_prestop_drain_must_fit_in_the_grace_period(helm: Path) -> None:
    with pytest.raises(RenderError) as failed:
        render(helm, values={**MINIMAL, "gateway.shutdown.preStopDrain.enabled": "true"}, check=False)
    # 5 s pause + 300 s drain wait + 10 s grace + 30 s drain + 5 s.
    assert "gateway.terminationGracePeriodSeconds (60) must be at least 350" in str(failed.value)


class _Readyz(http.server.BaseHTTPRequestHandler):
    """A gateway's /readyz whose spool empties after a few polls (503 while not ready, as the gateway answers)."""

    answers: list[tuple[int, dict[str, Any]]] = []
    polls = 0

    def do_GET(self) -> None:
        type(self).polls += 1
        status, body = self.answers[min(self.polls, len(self.answers)) - 1]
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


def test_the_prestop_drain_waits_until_the_spool_is_empty(helm: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Readyz)
    _Readyz.answers = [
        (503, {"ready": False, "spool_records": 40}),
        (200, {"ready": True, "spool_records": 12}),
        (200, {"ready": True, "spool_records": 0}),
        (200, {"ready": True, "spool_records": 99}),  # never reached: the hook has returned
    ]
    _Readyz.polls = 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        manifests = render(
            helm,
            values={
                **MINIMAL,
                "gateway.port": str(server.server_address[1]),
                "gateway.shutdown.preStopSleepSeconds": "0",
                "gateway.shutdown.preStopDrain.enabled": "true",
                "gateway.terminationGracePeriodSeconds": "400",
            },
        )
        (container,) = one(manifests, "StatefulSet", "gateway")["spec"]["template"]["spec"]["containers"]
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[:2] == ["python", "-c"]
        done = subprocess.run([sys.executable, "-c", command[2]], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert _Readyz.polls == 3
    finally:
        server.shutdown()


def test_the_prestop_drain_gives_up_when_the_gateway_is_gone(helm: Path) -> None:
    # Nothing listens: the hook returns at once instead of holding the pod for the whole timeout.
    manifests = render(
        helm,
        values={
            **MINIMAL,
            "gateway.port": "1",
            "gateway.shutdown.preStopSleepSeconds": "0",
            "gateway.shutdown.preStopDrain.enabled": "true",
            "gateway.terminationGracePeriodSeconds": "400",
        },
    )
    (container,) = one(manifests, "StatefulSet", "gateway")["spec"]["template"]["spec"]["containers"]
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", container["lifecycle"]["preStop"]["exec"]["command"][2]], timeout=60
    )
    assert done.returncode == 0 and time.monotonic() - started < 30


def test_workers_join_with_a_static_group_membership_named_after_the_pod(helm: Path) -> None:
    (container,) = one(render(helm, values=MINIMAL), "StatefulSet", "streams")["spec"]["template"]["spec"][
        "containers"
    ]
    env = {e["name"]: e for e in container["env"]}
    assert env["PRESENCE_WORKER_GROUP_INSTANCE_ID"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.name"}
    }
    off = render(helm, values={**MINIMAL, "streams.staticMembership": "false"})
    (container,) = one(off, "StatefulSet", "streams")["spec"]["template"]["spec"]["containers"]
    assert "PRESENCE_WORKER_GROUP_INSTANCE_ID" not in {e["name"] for e in container["env"]}


def test_the_query_service_keeps_not_ready_workers_so_clients_get_the_apps_503(
    rendered: Callable[[str], Manifests],
) -> None:
    for scenario in SCENARIOS:
        services = find(rendered(scenario), "Service", "streams")
        assert services and all(s["spec"]["publishNotReadyAddresses"] is True for s in services), scenario


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_disruption_budgets_let_unhealthy_pods_be_evicted(
    rendered: Callable[[str], Manifests], scenario: str
) -> None:
    for budget in find(rendered(scenario), "PodDisruptionBudget"):
        assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


@pytest.mark.parametrize(
    ("size", "max_bytes", "fits"),
    [
        ("2Gi", 1073741824, True),
        ("1Gi", 1073741824, False),
        ("1200M", 1073741824, True),
        ("1100M", 1073741824, False),
    ],
)
def test_the_spool_limit_must_fit_its_volume(helm: Path, size: str, max_bytes: int, fits: bool) -> None:
    values = {**MINIMAL, "gateway.spool.persistence.size": size, "gateway.spool.maxBytes": str(max_bytes)}
    if fits:
        assert render(helm, values=values)
        return
    with pytest.raises(RenderError) as failed:
        render(helm, values=values, check=False)
    assert (
        f"gateway.spool.maxBytes ({max_bytes}) does not fit gateway.spool.persistence.size ({size})"
        in str(failed.value)
    )


def test_an_unreadable_volume_size_is_refused(helm: Path) -> None:
    with pytest.raises(RenderError) as failed:
        render(helm, values={**MINIMAL, "gateway.spool.persistence.size": "2Gb"}, check=False)
    assert "gateway/spool/persistence/size': '2Gb' does not match pattern" in str(failed.value)


# --- network policies ---------------------------------------------------------------------------------------------


def test_gateway_from_keeps_prometheus_and_the_helm_test_pod_admitted(helm: Path) -> None:
    ingress_controller = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}
    }
    manifests = render(
        helm,
        "--set-json",
        f"networkPolicy.gatewayFrom=[{json.dumps(ingress_controller)}]",
        values=MINIMAL,
    )
    (rule,) = one(manifests, "NetworkPolicy", "gateway")["spec"]["ingress"]
    peers = rule["from"]
    assert ingress_controller in peers
    # The scraper (metricsFrom's default: the monitoring namespace) shares the port with the webhook.
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}} in peers
    # The helm test pod is one of the release's pods.
    test_pod = one(manifests, "Pod")
    release_peers = [p["podSelector"]["matchLabels"] for p in peers if "podSelector" in p and len(p) == 1]
    assert any(wanted.items() <= test_pod["metadata"]["labels"].items() for wanted in release_peers)
    # Without gatewayFrom the webhook stays open to every source.
    (open_rule,) = one(render(helm, values=MINIMAL), "NetworkPolicy", "gateway")["spec"]["ingress"]
    assert "from" not in open_rule


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_egress_reaches_the_brokers_by_selectors_not_addresses(
    rendered: Callable[[str], Manifests], scenario: str
) -> None:
    for policy in find(rendered(scenario), "NetworkPolicy"):
        for rule in policy["spec"].get("egress", []):
            for peer in rule.get("to", []):
                assert "ipBlock" not in peer, policy["metadata"]["name"]
    values = yaml.safe_load((CHART / "ci" / scenario).read_text())
    for peer in values.get("networkPolicy", {}).get("egress", {}).get("kafkaPeers", []):
        assert "ipBlock" not in peer


# --- several releases on one Kafka ----------------------------------------------------------------------------------


def _identity(manifests: Manifests) -> dict[str, str]:
    data: dict[str, str] = {}
    for config_map in find(manifests, "ConfigMap"):
        data.update(config_map["data"])
    return {
        key: data[key]
        for key in (
            "PRESENCE_WORKER_APP_ID",
            "PRESENCE_TOPIC_RAW",
            "PRESENCE_TOPIC_DLQ",
            "PRESENCE_TOPIC_TRANSITIONS",
            "PRESENCE_TOPIC_STATE",
        )
    }


def test_releases_get_their_own_consumer_group_and_topics_by_default(helm: Path) -> None:
    from streams.config import WorkerSettings

    def identity(release: str, namespace: str) -> dict[str, str]:
        command = [str(helm), "template", release, str(CHART), "--namespace", namespace]
        for key, value in MINIMAL.items():
            command += ["--set", f"{key}={value}"]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        return _identity([d for d in yaml.safe_load_all(done.stdout) if d])

    staging, production = identity("presence", "staging"), identity("presence", "production")
    other_app = identity("presence-app2", "production")
    for a, b in ((staging, production), (production, other_app)):
        assert not set(a.values()) & set(b.values()), (a, b)
    assert production["PRESENCE_WORKER_APP_ID"] == "production-presence-worker"
    assert production["PRESENCE_TOPIC_RAW"] == "production.presence.raw"
    # Every derived name is one the services accept and a valid Kafka topic name.
    WorkerSettings(worker_app_id=production["PRESENCE_WORKER_APP_ID"])
    assert all(re.fullmatch(r"[a-zA-Z0-9._-]{1,249}", name) for name in production.values())


def test_explicit_names_win_and_the_scrape_labels_follow_them(rendered: Callable[[str], Manifests]) -> None:
    manifests = rendered("external-kafka-values.yaml")
    assert _identity(manifests)["PRESENCE_TOPIC_RAW"] == "acme.rongcloud.presence.raw"
    production = rendered("production-values.yaml")
    identity = _identity(production)
    monitor = one(production, "ServiceMonitor", "streams")
    labels = {r["targetLabel"]: r["replacement"] for r in monitor["spec"]["endpoints"][0]["relabelings"]}
    assert labels == {
        "component": "streams",
        "consumergroup": identity["PRESENCE_WORKER_APP_ID"],
        "topic": identity["PRESENCE_TOPIC_RAW"],
    }
    gateway_monitor = one(production, "ServiceMonitor", "gateway")
    assert gateway_monitor["spec"]["endpoints"][0]["relabelings"] == [
        {"targetLabel": "component", "replacement": "gateway"}
    ]


def test_topics_can_be_left_to_someone_else(helm: Path) -> None:
    """topics.create reaches both components as PRESENCE_TOPIC_CREATE (core/topics.py): off, they only describe."""

    def create(values: dict[str, str]) -> str:
        manifests = render(helm, values=values)
        common = _config_maps(manifests)[""]
        assert "PRESENCE_GATEWAY_ENSURE_TOPICS" not in _config_maps(manifests)["gateway"]
        return common["PRESENCE_TOPIC_CREATE"]

    assert create(MINIMAL) == "true"
    assert create({**MINIMAL, "topics.create": "false"}) == "false"
    from core.settings import CommonSettings

    assert CommonSettings(topic_create="false").topic_create is False


def _config_maps(manifests: Manifests) -> dict[str, dict[str, str]]:
    """The chart's ConfigMaps' data by component ("" for the shared one)."""
    return {
        m["metadata"]["labels"].get("app.kubernetes.io/component", ""): m.get("data", {})
        for m in manifests
        if m["kind"] == "ConfigMap" and m["metadata"]["name"].startswith("rel-presence")
        and "dashboards" not in m["metadata"]["name"]
    }  # fmt: skip


def _worker_env(manifests: Manifests) -> dict[str, Any]:
    """The worker container's environment: its ConfigMaps' data, then its own env entries (which win)."""
    maps = _config_maps(manifests)
    env: dict[str, Any] = {**maps[""], **maps["streams"]}
    container = one(manifests, "StatefulSet", "streams")["spec"]["template"]["spec"]["containers"][0]
    env.update({e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]})
    return env


# --- reconciliation ---------------------------------------------------------------------------------------------------


def test_reconciliation_is_on_by_default_and_off_keeps_the_app_secret_from_the_workers(helm: Path) -> None:
    default = _worker_env(render(helm, values=MINIMAL))
    assert default["PRESENCE_RECONCILE_ENABLED"] == "true" and "PRESENCE_APP_SECRET" in default
    env = _worker_env(render(helm, values={**MINIMAL, "reconcile.enabled": "false"}))
    assert env["PRESENCE_RECONCILE_ENABLED"] == "false"
    assert "PRESENCE_APP_SECRET" not in env
    assert not [
        name
        for name in env
        if name.startswith("PRESENCE_RECONCILE_") and name != "PRESENCE_RECONCILE_ENABLED"
    ]


def test_reconciliation_on_gives_the_workers_the_app_secret_and_its_settings(helm: Path) -> None:
    from streams.config import WorkerSettings

    values = {
        **MINIMAL,
        "reconcile.enabled": "true",
        "reconcile.apiUrls[0]": "https://api-sg-a.rong-api.com",
        "reconcile.apiUrls[1]": "https://api-sg-b.rong-api.com",
        "reconcile.budgetPerSecond": "20",
        "reconcile.maxSilenceSeconds": "7200",
        "reconcile.extraConfig.gap_cap": "5000",
    }
    env = _worker_env(render(helm, values=values))
    assert env["PRESENCE_APP_SECRET"] == {"secretKeyRef": {"name": "rel-presence", "key": "app-secret"}}
    # The rendered settings are ones the worker reads, with the values given (pydantic refuses a bad one).
    plain = {k: v for k, v in env.items() if isinstance(v, str) and k.startswith("PRESENCE_")}
    settings = WorkerSettings(
        **{
            k.removeprefix("PRESENCE_").lower(): v
            for k, v in plain.items()
            if not k.startswith("PRESENCE_GATEWAY")
        },
        app_secret="from-the-secret",
    )
    assert settings.reconcile_active
    assert settings.reconcile_api_urls == ("https://api-sg-a.rong-api.com", "https://api-sg-b.rong-api.com")
    assert settings.reconcile_budget_per_second == 20 and settings.reconcile_max_silence_seconds == 7200
    assert settings.reconcile_gap_cap == 5000

    existing = _worker_env(render(helm, values={**values, "app.secret": "", "app.existingSecret": "creds"}))
    assert existing["PRESENCE_APP_SECRET"] == {"secretKeyRef": {"name": "creds", "key": "app-secret"}}


def test_reconciliation_settings_name_real_worker_settings() -> None:
    """Every PRESENCE_RECONCILE_* the chart can render is a WorkerSettings field."""
    from streams.config import WorkerSettings

    template = (CHART / "templates" / "configmap.yaml").read_text()
    rendered_names = set(re.findall(r"PRESENCE_(RECONCILE_[A-Z_]+):", template))
    assert len(rendered_names) >= 7
    assert {name.lower() for name in rendered_names} <= set(WorkerSettings.model_fields)


def test_reconciliation_egress_reaches_the_api_only_when_on(helm: Path) -> None:
    egress = {**MINIMAL, "networkPolicy.egress.enabled": "true"}

    def worker_egress(values: dict[str, str]) -> list[dict[str, Any]]:
        policy = one(render(helm, values=values), "NetworkPolicy", "streams")
        rules: list[dict[str, Any]] = policy["spec"]["egress"]
        return rules

    off = {**egress, "reconcile.enabled": "false"}
    assert not [r for r in worker_egress(off) if {"port": 443, "protocol": "TCP"} in r.get("ports", [])]
    (anywhere,) = [
        r for r in worker_egress({**egress, "reconcile.enabled": "true"})
        if {"port": 443, "protocol": "TCP"} in r.get("ports", [])
    ]  # fmt: skip
    assert "to" not in anywhere
    production = worker_egress({**egress, "reconcile.enabled": "true",
                                "networkPolicy.egress.reconcileApiPeers[0].ipBlock.cidr": "203.0.113.0/24",
                                "networkPolicy.egress.reconcileApiPorts[0]": "443"})  # fmt: skip
    (api,) = [r for r in production if {"port": 443, "protocol": "TCP"} in r.get("ports", [])]
    assert api["to"] == [{"ipBlock": {"cidr": "203.0.113.0/24"}}]


# --- Strimzi ------------------------------------------------------------------------------------------------------------


def test_strimzi_topics_are_the_ones_the_services_would_create(rendered: Callable[[str], Manifests]) -> None:
    """Each KafkaTopic has the name, partitions, replication factor and configs core/topics.py and the worker give
    that topic, for the settings the chart hands the services (extraConfig overrides included)."""
    from core.topics import product_topics
    from streams.config import WorkerSettings
    from streams.main import worker_topics

    manifests = rendered("strimzi-values.yaml")
    env = _worker_env(manifests)
    plain = {k.removeprefix("PRESENCE_").lower(): v for k, v in env.items()
             if isinstance(v, str) and k.startswith("PRESENCE_") and not k.startswith("PRESENCE_KAFKA_SSL")}  # fmt: skip
    settings = WorkerSettings(
        **plain, kafka_sasl_password="from-the-users-secret", app_secret="from-the-secret"
    )
    assert settings.topic_create is False
    expected = {spec.name: spec for spec in [*product_topics(settings), *worker_topics(settings)]}
    topics = find(manifests, "KafkaTopic")
    assert len(topics) == 7 == len(expected)
    for topic in topics:
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == "main"
        spec = expected[topic["spec"]["topicName"]]
        assert topic["spec"]["partitions"] == spec.partitions
        assert topic["spec"]["replicas"] == spec.replication_factor
        assert topic["spec"]["config"] == spec.config, spec.name


def test_strimzi_topics_follow_the_topic_overrides_of_extra_config(helm: Path) -> None:
    from core.settings import CommonSettings
    from core.topics import product_topics

    overrides = {"topic_raw_retention_ms": "1209600000", "topic_state_delete_retention_ms": "172800000",
                 "topic_state_min_cleanable_dirty_ratio": "0.25"}  # fmt: skip
    values = {**MINIMAL, "strimzi.cluster": "main", "strimzi.topics.enabled": "true", "topics.replicationFactor": "2",
              **{f"extraConfig.{k}": v for k, v in overrides.items()}}  # fmt: skip
    manifests = render(helm, values=values)
    settings = CommonSettings(
        **{k.removeprefix("PRESENCE_").lower(): v for k, v in _config_maps(manifests)[""].items()}
    )
    by_name = {t["spec"]["topicName"]: t["spec"] for t in find(manifests, "KafkaTopic")}
    for spec in product_topics(settings):
        assert by_name[spec.name]["config"] == spec.config
        assert by_name[spec.name]["replicas"] == 2
    assert by_name[settings.topic_raw]["config"]["retention.ms"] == "1209600000"
    assert by_name[settings.topic_raw]["config"]["min.insync.replicas"] == "1"


def test_state_compaction_values_reach_the_services_and_the_strimzi_topic(helm: Path) -> None:
    """topics.stateCompaction.* are PRESENCE_TOPIC_STATE_* for the services (which create the topic with them) and
    the Strimzi KafkaTopic's configs; the defaults are the settings' own (docs/consuming.md)."""
    from core.settings import CommonSettings
    from core.topics import product_topics

    def state_topic(values: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
        manifests = render(helm, values={**MINIMAL, "strimzi.cluster": "main", "strimzi.topics.enabled": "true",
                                         **values})  # fmt: skip
        env = _config_maps(manifests)[""]
        settings = CommonSettings(**{k.removeprefix("PRESENCE_").lower(): v for k, v in env.items()})
        spec = next(t for t in product_topics(settings) if t.name == settings.topic_state)
        kafka_topic = next(t for t in find(manifests, "KafkaTopic") if t["spec"]["topicName"] == spec.name)
        assert kafka_topic["spec"]["config"] == spec.config
        return env, spec.config

    env, config = state_topic({})
    defaults = CommonSettings(kafka_bootstrap_servers="k:9092")
    assert env["PRESENCE_TOPIC_STATE_SEGMENT_MS"] == str(defaults.topic_state_segment_ms)
    assert env["PRESENCE_TOPIC_STATE_MIN_CLEANABLE_DIRTY_RATIO"] == str(
        defaults.topic_state_min_cleanable_dirty_ratio
    )
    assert env["PRESENCE_TOPIC_STATE_DELETE_RETENTION_MS"] == str(defaults.topic_state_delete_retention_ms)
    env, config = state_topic({"topics.stateCompaction.segmentMs": "600000",
                               "topics.stateCompaction.minCleanableDirtyRatio": "0.25",
                               "topics.stateCompaction.deleteRetentionMs": "172800000"})  # fmt: skip
    assert (config["segment.ms"], config["min.cleanable.dirty.ratio"], config["delete.retention.ms"]) == (
        "600000",
        "0.25",
        "172800000",
    )
    # extraConfig still overrides, without a second key for the same setting.
    env, config = state_topic({"topics.stateCompaction.segmentMs": "600000",
                               "extraConfig.topic_state_segment_ms": "900000"})  # fmt: skip
    assert env["PRESENCE_TOPIC_STATE_SEGMENT_MS"] == "900000" == config["segment.ms"]


def _acls(user: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    return {
        (acl["resource"]["type"], acl["resource"].get("name", "")): set(acl["operations"])
        for acl in user["spec"]["authorization"]["acls"]
    }


def test_strimzi_users_get_only_what_their_component_uses(rendered: Callable[[str], Manifests]) -> None:
    manifests = rendered("strimzi-values.yaml")
    common = _config_maps(manifests)[""]
    app_id = _config_maps(manifests)["streams"]["PRESENCE_WORKER_APP_ID"]
    raw, dlq = common["PRESENCE_TOPIC_RAW"], common["PRESENCE_TOPIC_DLQ"]
    transitions, state = common["PRESENCE_TOPIC_TRANSITIONS"], common["PRESENCE_TOPIC_STATE"]
    users = {u["metadata"]["labels"]["app.kubernetes.io/component"]: u for u in find(manifests, "KafkaUser")}
    assert set(users) == {"gateway", "streams", "kafka-exporter"}
    for user in users.values():
        assert user["spec"]["authentication"] == {"type": "scram-sha-512"}
        assert user["metadata"]["labels"]["strimzi.io/cluster"] == "main"
        for acl in user["spec"]["authorization"]["acls"]:
            assert "Create" not in acl["operations"] and "All" not in acl["operations"]
            assert acl["resource"].get("patternType", "literal") == "literal"
    assert _acls(users["gateway"]) == {
        ("topic", raw): {"Write", "Describe"},
        ("topic", dlq): {"Write", "Describe"},
        # Describe on all four: the gateway checks at start that they exist.
        ("topic", transitions): {"Describe"},
        ("topic", state): {"Describe"},
    }
    streams = _acls(users["streams"])
    # Reconciliation is on in this scenario: the workers publish observations to RAW.
    assert streams[("topic", raw)] == {"Read", "Write", "Describe"}
    assert streams[("group", app_id)] == {"Read", "Describe"}
    for own in ("ticks", "users-changelog", "__assignor-__leader"):
        assert streams[("topic", f"{app_id}-{own}")] == {"Read", "Write", "Describe"}
    for output in (transitions, state, dlq):
        assert streams[("topic", output)] == {"Write", "Describe"}
    assert _acls(users["kafka-exporter"]) == {
        ("cluster", ""): {"Describe"},
        ("group", app_id): {"Describe"},
        ("topic", raw): {"Describe"},
    }


def test_strimzi_users_are_the_identities_the_components_log_in_with(
    rendered: Callable[[str], Manifests],
) -> None:
    manifests = rendered("strimzi-values.yaml")
    assert "PRESENCE_KAFKA_SASL_USERNAME" not in _config_maps(manifests)[""]
    for kind, component in (("StatefulSet", "gateway"), ("StatefulSet", "streams")):
        container = one(manifests, kind, component)["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert list(env).count("PRESENCE_KAFKA_SASL_PASSWORD") == 1
        assert env["PRESENCE_KAFKA_SASL_USERNAME"]["value"] == f"rel-presence-{component}"
        assert env["PRESENCE_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": f"rel-presence-{component}", "key": "password"}  # fmt: skip
    exporter, _ = _exporter(manifests)
    assert "--sasl.username=rel-presence-kafka-exporter" in exporter["args"]
    assert exporter["env"][0]["valueFrom"]["secretKeyRef"] == {
        "name": "rel-presence-kafka-exporter",
        "key": "password",
    }
    names = {u["metadata"]["name"] for u in find(manifests, "KafkaUser")}
    assert names == {"rel-presence-gateway", "rel-presence-streams", "rel-presence-kafka-exporter"}


def test_strimzi_api_version_can_be_v1(helm: Path) -> None:
    values = {**MINIMAL, "strimzi.cluster": "main", "strimzi.topics.enabled": "true",
              "strimzi.apiVersion": "kafka.strimzi.io/v1"}  # fmt: skip
    topics = find(render(helm, values=values), "KafkaTopic")
    assert {t["apiVersion"] for t in topics} == {"kafka.strimzi.io/v1"}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"strimzi.topics.enabled": "true"}, "need strimzi.cluster"),
        ({"strimzi.cluster": "main", "strimzi.users.enabled": "true", "topics.create": "false"},
         "needs kafka.securityProtocol SASL_SSL or SASL_PLAINTEXT and kafka.sasl.mechanism SCRAM-SHA-512"),
        ({"strimzi.cluster": "main", "strimzi.users.enabled": "true", "kafka.securityProtocol": "SASL_SSL",
          "kafka.sasl.mechanism": "SCRAM-SHA-512"}, "set topics.create=false"),
        ({"strimzi.cluster": "main", "strimzi.users.enabled": "true", "kafka.securityProtocol": "SASL_SSL",
          "kafka.sasl.mechanism": "SCRAM-SHA-512", "topics.create": "false", "strimzi.namespace": "kafka"},
         "which pods in presence cannot read"),
    ],
)  # fmt: skip
def test_strimzi_values_that_cannot_work_are_refused(
    helm: Path, values: dict[str, str], message: str
) -> None:
    with pytest.raises(RenderError, match=re.escape(message)):
        render(helm, values={**MINIMAL, **values}, check=False)


def test_the_crd_check_rejects_a_bad_kafka_topic_and_user() -> None:
    topic = {"apiVersion": "kafka.strimzi.io/v1beta2", "kind": "KafkaTopic", "metadata": {"name": "t"},
             "spec": {"partitions": 0, "replicas": 3}}  # fmt: skip
    assert list(
        jsonschema.Draft7Validator(crd_schemas()["kafka.strimzi.io/v1beta2 KafkaTopic"]).iter_errors(topic)
    )
    user = {"apiVersion": "kafka.strimzi.io/v1beta2", "kind": "KafkaUser", "metadata": {"name": "u"},
            "spec": {"authentication": {"type": "scram-sha-256"}}}  # fmt: skip
    assert list(
        jsonschema.Draft7Validator(crd_schemas()["kafka.strimzi.io/v1beta2 KafkaUser"]).iter_errors(user)
    )


# --- secrets, the exporter, values ----------------------------------------------------------------------------------


def test_pods_roll_when_a_secret_changes(rendered: Callable[[str], Manifests], helm: Path) -> None:
    production = rendered("production-values.yaml")
    for workload in [m for m in production if m["kind"] in ("Deployment", "StatefulSet")]:
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/secret"])
        assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/existing-secrets"])
        assert annotations["secret.reloader.stakater.com/reload"] == "presence-app-credentials"
    external = rendered("external-kafka-values.yaml")
    annotations = one(external, "StatefulSet", "streams")["spec"]["template"]["metadata"]["annotations"]
    assert "secret.reloader.stakater.com/reload" not in annotations  # not asked for
    assert "checksum/existing-secrets" in annotations  # kafka-credentials, kafka-client-tls
    # A changed app secret changes the pods' checksum, so they roll.
    before = one(render(helm, values=MINIMAL), "StatefulSet", "gateway")["spec"]["template"]["metadata"]
    after = one(render(helm, values={**MINIMAL, "app.secret": "another-secret"}), "StatefulSet", "gateway")
    assert (
        before["annotations"]["checksum/secret"]
        != after["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]
    )


def _exporter(manifests: Manifests) -> tuple[dict[str, Any], dict[str, str]]:
    deployment = one(manifests, "Deployment", "kafka-exporter")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args: dict[str, str] = {}
    for arg in container["args"]:
        name, _, value = arg.removeprefix("--").partition("=")
        args[name] = args[name] + "," + value if name in args else value
    return container, args


def test_kafka_exporter_watches_this_releases_group_and_raw_only(
    rendered: Callable[[str], Manifests],
) -> None:
    manifests = rendered("production-values.yaml")
    container, args = _exporter(manifests)
    identity = _identity(manifests)
    assert container["image"].startswith("danielqsj/kafka-exporter:v")
    assert args["kafka.server"] == "kafka-0.kafka:9092,kafka-1.kafka:9092,kafka-2.kafka:9092"
    assert re.fullmatch(args["group.filter"], identity["PRESENCE_WORKER_APP_ID"])
    assert not re.fullmatch(args["group.filter"], identity["PRESENCE_WORKER_APP_ID"] + "-replay")
    assert re.fullmatch(args["topic.filter"], identity["PRESENCE_TOPIC_RAW"])
    assert not re.fullmatch(args["topic.filter"], identity["PRESENCE_TOPIC_RAW"].replace(".", "x", 1))
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    monitor = one(manifests, "ServiceMonitor", "kafka-exporter")
    assert monitor["spec"]["endpoints"][0]["relabelings"] == [
        {"targetLabel": "component", "replacement": "kafka-exporter"}
    ]
    service = one(manifests, "Service", "kafka-exporter")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    policy = one(manifests, "NetworkPolicy", "kafka-exporter")
    assert "Egress" in policy["spec"]["policyTypes"]


def test_kafka_exporter_over_sasl_ssl_with_a_private_ca(helm: Path) -> None:
    values = yaml.safe_load((CHART / "ci" / "external-kafka-values.yaml").read_text())
    command = [str(helm), "template", "rel", str(CHART), "--namespace", "presence", "-f"]
    command += [str(CHART / "ci" / "external-kafka-values.yaml"), "--set", "kafkaExporter.enabled=true"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    container, args = _exporter([d for d in yaml.safe_load_all(done.stdout) if d])
    assert (
        args["sasl.mechanism"] == "scram-sha512"
        and args["sasl.username"] == values["kafka"]["sasl"]["username"]
    )
    assert args["sasl.password"] == "$(KAFKA_SASL_PASSWORD)"
    (env,) = container["env"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "kafka-credentials", "key": "password"}
    assert "tls.enabled" in args and args["tls.ca-file"] == "/etc/presence/kafka-tls/ca.crt"
    assert args["tls.cert-file"] == "/etc/presence/kafka-tls/tls.crt"


def test_kafka_exporter_over_tls_needs_the_ca(helm: Path) -> None:
    with pytest.raises(RenderError) as failed:
        render(
            helm,
            values={**MINIMAL, "kafkaExporter.enabled": "true", "kafka.securityProtocol": "SSL"},
            check=False,
        )
    assert "kafkaExporter.enabled over TLS needs the brokers' CA" in str(failed.value)


def _paths(node: Any, prefix: str = "") -> set[str]:
    if isinstance(node, dict) and node:
        return set().union(
            *(_paths(value, f"{prefix}.{key}" if prefix else key) for key, value in node.items())
        )
    return {prefix}


def _schema_paths(schema: dict[str, Any], prefix: str = "") -> set[str]:
    properties = schema.get("properties")
    if not properties:
        return {prefix}
    found: set[str] = set()
    for key, sub in properties.items():
        found |= _schema_paths(sub, f"{prefix}.{key}" if prefix else key)
    return found


def test_values_and_schema_describe_the_same_keys() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    in_values = _paths(values)
    # Probe fields Kubernetes has defaults for: the schema allows them, values.yaml need not list them.
    optional = {
        f"{component}.probes.{probe}.{field}"
        for component in ("gateway", "streams")
        for probe in ("startup", "liveness", "readiness")
        for field in ("initialDelaySeconds", "successThreshold")
    }
    in_schema = _schema_paths(schema) - {"global"} - optional
    # A leaf in values.yaml may be an object the schema describes further (probes, resources): compare prefixes.
    missing = {
        p
        for p in in_values
        if not any(s == p or s.startswith(p + ".") or p.startswith(s + ".") for s in in_schema)
    }
    extra = {
        s
        for s in in_schema
        if not any(p == s or p.startswith(s + ".") or s.startswith(p + ".") for p in in_values)
    }
    assert not missing, f"in values.yaml, not in the schema: {sorted(missing)}"
    assert not extra, f"in the schema, not in values.yaml: {sorted(extra)}"


def _chart_seeing(tmp_path: Path, streams_data: dict[str, str], common_data: dict[str, str]) -> Path:
    """A copy of the chart whose two ConfigMap lookups find the given data, as `helm upgrade` would in a cluster
    running a release with those settings (`helm template` has no cluster: lookup finds nothing there)."""
    copy = tmp_path / "presence"
    shutil.copytree(CHART, copy, symlinks=False)
    helpers = copy / "templates" / "_helpers.tpl"
    text = helpers.read_text()

    def as_dict(data: dict[str, str]) -> str:
        pairs = " ".join(f'"{key}" "{value}"' for key, value in data.items())
        return f'(dict "data" (dict {pairs}))'

    for name, data in (('"presence.streams.fullname"', streams_data), ('"presence.fullname"', common_data)):
        lookup = f'lookup "v1" "ConfigMap" .Release.Namespace (include {name} .) | default dict'
        assert lookup in text
        text = text.replace(lookup, as_dict(data))
    helpers.write_text(text)
    return copy


def test_an_upgrade_may_not_change_the_app_id_or_the_topics_by_accident(helm: Path, tmp_path: Path) -> None:
    # A release installed with the product's old fixed defaults, upgraded to a chart that derives the names.
    chart = _chart_seeing(
        tmp_path,
        {"PRESENCE_WORKER_APP_ID": "presence-worker"},
        {"PRESENCE_TOPIC_RAW": "rongcloud.presence.raw", "PRESENCE_TOPIC_STATE": "presence.state"},
    )

    def upgrade(*values: str) -> subprocess.CompletedProcess[str]:
        command = [str(helm), "template", "rel", str(chart), "--namespace", "presence", "--is-upgrade"]
        for key, value in MINIMAL.items():
            command += ["--set", f"{key}={value}"]
        for value in values:
            command += ["--set", value]
        return subprocess.run(command, capture_output=True, text=True)

    refused = upgrade()
    assert refused.returncode != 0
    assert 'the worker app id would change from "presence-worker" to "presence-rel-presence-worker"' in (
        refused.stderr
    )
    assert "set streams.allowAppIdChange=true; otherwise set streams.appId=presence-worker" in refused.stderr
    topics = upgrade("streams.appId=presence-worker")
    assert topics.returncode != 0
    assert (
        'topics.raw would change from "rongcloud.presence.raw" to "presence.rel-presence.raw"'
        in topics.stderr
    )
    pinned = upgrade(
        "streams.appId=presence-worker", "topics.raw=rongcloud.presence.raw", "topics.state=presence.state"
    )
    assert pinned.returncode == 0, pinned.stderr
    allowed = upgrade("streams.allowAppIdChange=true", "topics.allowRename=true")
    assert allowed.returncode == 0, allowed.stderr
