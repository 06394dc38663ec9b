"""docker-compose.yml: valid under `docker compose config` where the plugin exists, and always against the Compose
Specification's JSON schema; its promises (healthchecks, start order, required secrets, provisioning) asserted."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.ops.conftest import tool_file

pytestmark = pytest.mark.ops

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
REQUIRED_SECRETS = {"PRESENCE_APP_KEY", "PRESENCE_APP_SECRET", "GRAFANA_ADMIN_PASSWORD"}


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return document


def schema() -> dict[str, Any]:
    import json

    loaded: dict[str, Any] = json.loads(tool_file("compose-spec.json").read_text())
    return loaded


def test_compose_file_matches_the_compose_specification() -> None:
    errors = sorted(jsonschema.Draft7Validator(schema()).iter_errors(compose()), key=str)
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors[:5]]


def test_the_schema_check_rejects_a_bad_compose_file() -> None:
    bad = compose()
    bad["services"]["gateway"]["depends_on"]["topics"]["condition"] = "service_ready"
    assert list(jsonschema.Draft7Validator(schema()).iter_errors(bad))


def _has_compose_plugin() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    return subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(
    not _has_compose_plugin(), reason="no docker compose plugin here; validated by the JSON schema"
)
def test_docker_compose_config() -> None:
    env = {**os.environ, **dict.fromkeys(REQUIRED_SECRETS, "x" * 12)}
    done = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"], env=env, capture_output=True
    )
    assert done.returncode == 0, done.stderr


def test_required_secrets_are_demanded_not_defaulted() -> None:
    text = COMPOSE.read_text()
    demanded = set(re.findall(r"\$\{(\w+):\?[^}]+\}", text))
    assert demanded == REQUIRED_SECRETS
    for name in REQUIRED_SECRETS:
        assert f"${{{name}:-" not in text and f"${{{name}}}" not in text


def test_services_wait_for_what_they_need() -> None:
    services = compose()["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "KAFKA_PROCESS_ROLES" in services["kafka"]["environment"]
    assert services["kafka"]["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert services["topics"]["depends_on"] == {"kafka": {"condition": "service_healthy"}}
    for name in ("gateway", "worker"):
        assert services[name]["depends_on"] == {"topics": {"condition": "service_completed_successfully"}}
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    for name in ("kafka", "gateway", "worker", "prometheus", "grafana"):
        assert services[name]["healthcheck"]["test"], name
    assert services["gateway"]["command"] == ["gateway"] and services["worker"]["command"] == ["worker"]
    assert "gateway-spool:/var/lib/presence/spool" in services["gateway"]["volumes"]
    assert "worker-state:/var/lib/presence/streams" in services["worker"]["volumes"]


def test_prometheus_loads_the_alerts_and_scrapes_both_services(promtool: Path) -> None:
    services = compose()["services"]
    assert "./prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    config = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert targets == {
        "gateway": ["gateway:8080"],
        "streams": ["worker:6066"],
        "kafka-exporter": ["kafka-exporter:9308"],
    }
    # The worker's labels name the group and topic the worker really uses (compose leaves both at the defaults).
    from streams.config import WorkerSettings

    defaults = WorkerSettings.model_fields
    (streams,) = [job for job in config["scrape_configs"] if job["job_name"] == "streams"]
    labels = streams["static_configs"][0]["labels"]
    assert labels["consumergroup"] == defaults["worker_app_id"].default
    assert labels["topic"] == defaults["topic_raw"].default
    worker_env = services["worker"]["environment"]
    assert "PRESENCE_WORKER_APP_ID" not in worker_env and "PRESENCE_TOPIC_RAW" not in worker_env
    done = subprocess.run(
        [str(promtool), "check", "config", str(ROOT / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_kafka_exporter_watches_the_workers_group_and_raw_at_the_broker() -> None:
    services = compose()["services"]
    exporter = services["kafka-exporter"]
    assert exporter["image"].startswith("danielqsj/kafka-exporter:v")
    args = dict(arg.removeprefix("--").split("=", 1) for arg in exporter["command"])
    assert args["kafka.server"] == services["gateway"]["environment"]["PRESENCE_KAFKA_BOOTSTRAP_SERVERS"]
    # Compose writes "$$" for a literal "$".
    assert re.fullmatch(args["group.filter"].replace("$$", "$"), "presence-worker")
    assert re.fullmatch(args["topic.filter"].replace("$$", "$"), "rongcloud.presence.raw")
    assert not re.fullmatch(args["topic.filter"].replace("$$", "$"), "rongcloudXpresence.raw")
    assert exporter["read_only"] is True and exporter["cap_drop"] == ["ALL"]


def test_dockerfile_builds_one_image_with_both_commands() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["presence"]' in dockerfile
    assert re.search(r"^USER \$\{UID\}:\$\{UID\}$", dockerfile, re.M), (
        "numeric non-root user (runAsNonRoot can check it); tests/ops/test_image.py checks its default"
    )
    from presence.cli import main

    for command in ("worker", "create-topics"):
        assert command in main.commands, command


def test_the_compose_worker_never_reconciles_against_the_real_api() -> None:
    """Reconciliation turns itself on when the worker has the app key and secret; compose runs no API emulator, so
    its worker says off explicitly, and stays off even when it is given both."""
    from streams.config import WorkerSettings

    worker_env = compose()["services"]["worker"]["environment"]
    assert worker_env["PRESENCE_RECONCILE_ENABLED"] == "false"
    assert "PRESENCE_RECONCILE_API_URLS" not in worker_env
    settings = WorkerSettings(
        reconcile_enabled=worker_env["PRESENCE_RECONCILE_ENABLED"], app_key="key", app_secret="a-secret-value"
    )
    assert not settings.reconcile_active
