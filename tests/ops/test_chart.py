"""The Helm chart: helm lint and helm template for every ci/*-values.yaml scenario, the rendered manifests checked
against the Kubernetes schemas (kubernetes-validate, offline) and the prometheus-operator CRDs, and the chart's
promises (probes, security context, volumes, secrets, limits) asserted on the rendered objects."""

from __future__ import annotations

import subprocess
import tarfile
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
    schemas = {}
    for name in ("servicemonitors", "prometheusrules"):
        crd = yaml.safe_load(tool_file(f"crds/monitoring.coreos.com_{name}.yaml").read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schemas[crd["spec"]["names"]["kind"]] = version["schema"]["openAPIV3Schema"]
    return schemas


@pytest.fixture(scope="module")
def rendered(helm: Path) -> Callable[[str], Manifests]:
    cache_: dict[str, Manifests] = {}

    def get(scenario: str) -> Manifests:
        if scenario not in cache_:
            cache_[scenario] = render(helm, "-f", str(CHART / "ci" / scenario))
        return cache_[scenario]

    return get


def test_every_scenario_is_present() -> None:
    assert SCENARIOS == ["external-kafka-values.yaml", "minimal-values.yaml", "production-values.yaml"]


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
        if manifest["apiVersion"].startswith("monitoring.coreos.com/"):
            schema = crd_schemas()[manifest["kind"]]
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
    assert list(jsonschema.Draft7Validator(crd_schemas()["PrometheusRule"]).iter_errors(bad))


def test_the_kubernetes_check_rejects_an_unknown_field() -> None:
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"portz": []}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSIONS[0], strict=True)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pods_run_non_root_read_only_with_probes_and_resources(
    rendered: Callable[[str], Manifests], scenario: str
) -> None:
    workloads = [m for m in rendered(scenario) if m["kind"] in ("Deployment", "StatefulSet")]
    assert {m["metadata"]["labels"]["app.kubernetes.io/component"] for m in workloads} == {
        "gateway",
        "streams",
    }
    for workload in workloads:
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
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = int(config["PRESENCE_GATEWAY_SHUTDOWN_GRACE_SECONDS"]) + int(
        config["PRESENCE_GATEWAY_SHUTDOWN_DRAIN_SECONDS"]
    )
    assert grace > pause + drain
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
