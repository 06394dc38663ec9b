"""A real Prometheus scrapes a real gateway and a real worker (against the session's Kafka broker) while traffic
flows; then every dashboard panel query returns data, every metric selector inside every alert expression returns
series, and Prometheus evaluates every alert rule without error.

Two gateways run: one healthy, one whose Kafka is unreachable (so the spool, breaker and publish-failure series
exist, as they would during an outage), plus one worker fed signed callbacks through the healthy gateway and one
undecodable record written straight to RAW (so the worker's dead-letter series exist).
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from aiokafka import AIOKafkaProducer

from core.contract import compute_signature
from presence.children import wait_until
from presence.localkafka import free_port
from tests.ops.promql import (
    ALERTS,
    EXTERNAL_METRICS,
    RECONCILE_PREFIX,
    alert_rules,
    expand_grafana,
    metric_names,
    panel_queries,
    selectors,
)

pytestmark = [pytest.mark.ops, pytest.mark.integration]

APP_KEY = "scrape-app"
SECRET = "scrape-secret-1"
# Longer than the whole test: a rate over it covers every sample, so quantiles and ratios are finite.
RATE_WINDOW = "5m"


class Service:
    """A product process on a free port; its log goes to a file shown when it fails."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.name, self.port, self.log = name, port, log
        with log.open("wb") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def answers(self, path: str) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")
        try:
            return httpx.get(f"{self.url}{path}", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _gateway_command() -> list[str]:
    from presence.cli import main

    if "gateway" in main.commands:
        return [sys.executable, "-m", "presence.cli", "gateway"]
    return [sys.executable, "-m", "gateway"]


@pytest.fixture
def services(tmp_path: Path) -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for service in reversed(started):
        service.stop()


def _base_env(settings: dict[str, Any]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_")}
    env.update({f"PRESENCE_{key.upper()}": str(value) for key, value in settings.items()})
    env.update({"PRESENCE_LOG_FORMAT": "json", "PRESENCE_LOG_LEVEL": "INFO"})
    return env


def _gateway_env(base: dict[str, str], port: int, spool: Path, **extra: str) -> dict[str, str]:
    return {
        **base,
        "PRESENCE_APP_KEY": APP_KEY,
        "PRESENCE_APP_SECRET": SECRET,
        "PRESENCE_GATEWAY_HOST": "127.0.0.1",
        "PRESENCE_GATEWAY_PORT": str(port),
        "PRESENCE_GATEWAY_SPOOL_DIR": str(spool),
        "PRESENCE_GATEWAY_PUBLISH_BUDGET_SECONDS": "1",
        **extra,
    }


def _signed(nonce: str, secret: str = SECRET) -> str:
    timestamp = str(time.time_ns() // 1_000_000)
    return f"appKey={APP_KEY}&timestamp={timestamp}&nonce={nonce}&signature={compute_signature(secret, nonce, timestamp)}"


def _event(userid: str, session: str, status: str, os_name: str, offset_ms: int = 0) -> dict[str, Any]:
    return {
        "userid": userid,
        "status": status,
        "os": os_name,
        "time": time.time_ns() // 1_000_000 - 2000 + offset_ms,
        "clientIp": "10.1.2.3:5555",
        "sessionId": session,
    }


def _post(gateway: Service, events: list[dict[str, Any]], secret: str = SECRET) -> httpx.Response:
    url = f"{gateway.url}/rongcloud/online-status?{_signed(uuid.uuid4().hex[:12], secret)}"
    return httpx.post(url, content=orjson.dumps(events), timeout=15)


def _compose_labels(job: str, **overrides: str) -> dict[str, str]:
    """The target labels prometheus/prometheus.yml gives a job (the ones the rules and dashboards rely on)."""
    config = yaml.safe_load((ALERTS.parent / "prometheus.yml").read_text())
    (scrape,) = [c for c in config["scrape_configs"] if c["job_name"] == job]
    labels: dict[str, str] = scrape["static_configs"][0]["labels"]
    return {**labels, **overrides}


class Prometheus:
    def __init__(
        self, binary: Path, tmp: Path, gateways: list[str], workers: list[str], worker_labels: dict[str, str]
    ) -> None:
        self.port = free_port()
        rules = tmp / "alerts.yml"
        rules.write_text(ALERTS.read_text())
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {
                    "job_name": "gateway",
                    "static_configs": [{"targets": gateways, "labels": _compose_labels("gateway")}],
                },
                {
                    "job_name": "streams",
                    "static_configs": [
                        {"targets": workers, "labels": _compose_labels("streams", **worker_labels)}
                    ],
                },
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = tmp / "prometheus.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    str(binary),
                    f"--config.file={tmp / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.url = f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert answer["status"] == "success", (expr, answer)
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def api(self, path: str) -> Any:
        return httpx.get(f"{self.url}/api/v1/{path}", timeout=10).json()["data"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def prometheus_factory(
    prometheus_bin: Path, tmp_path: Path
) -> Iterator[Callable[[list[str], list[str], dict[str, str]], Prometheus]]:
    started: list[Prometheus] = []

    def start(gateways: list[str], workers: list[str], worker_labels: dict[str, str]) -> Prometheus:
        prometheus = Prometheus(prometheus_bin, tmp_path / "prometheus", gateways, workers, worker_labels)
        started.append(prometheus)
        wait_until(prometheus.ready, 60, "prometheus to be ready")
        return prometheus

    (tmp_path / "prometheus").mkdir()
    yield start
    for prometheus in started:
        prometheus.stop()


def _finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


def test_prometheus_scrapes_the_services_and_every_query_has_data(
    settings_for: Callable[..., dict[str, Any]],
    tmp_path: Path,
    services: list[Service],
    prometheus_factory: Callable[[list[str], list[str], dict[str, str]], Prometheus],
) -> None:
    settings = settings_for(topic_partitions=4)
    base = _base_env(settings)

    healthy_port, outage_port, worker_port = free_port(), free_port(), free_port()
    healthy = Service(
        "gateway",
        _gateway_command(),
        _gateway_env(base, healthy_port, tmp_path / "spool-healthy"),
        healthy_port,
        tmp_path / "gateway.log",
    )
    services.append(healthy)
    # Nothing listens on this port: the second gateway lives through a Kafka outage.
    outage = Service(
        "gateway without Kafka",
        _gateway_command(),
        _gateway_env(
            base,
            outage_port,
            tmp_path / "spool-outage",
            PRESENCE_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}",
            PRESENCE_GATEWAY_ENSURE_TOPICS="false",
        ),
        outage_port,
        tmp_path / "gateway-outage.log",
    )
    services.append(outage)
    wait_until(lambda: healthy.answers("/readyz"), 90, "the gateway to be ready")
    wait_until(lambda: outage.answers("/healthz"), 90, "the gateway without Kafka to be up")

    worker_env = {
        **base,
        "PRESENCE_WORKER_APP_ID": f"scrape-{uuid.uuid4().hex[:8]}",
        "PRESENCE_WORKER_DATA_DIR": str(tmp_path / "worker"),
        "PRESENCE_WORKER_WEB_BIND": "127.0.0.1",
        "PRESENCE_WORKER_WEB_PORT": str(worker_port),
        "PRESENCE_WORKER_SESSION_TIMEOUT_SECONDS": "6",
        "PRESENCE_WORKER_HEARTBEAT_INTERVAL_SECONDS": "1",
        "PRESENCE_WORKER_COMMIT_INTERVAL_SECONDS": "0.5",
    }
    worker = Service(
        "worker",
        [sys.executable, "-m", "presence.cli", "worker"],
        worker_env,
        worker_port,
        tmp_path / "worker.log",
    )
    services.append(worker)
    # Prometheus watches the worker from its start, so the first recovery (assignment to processing) falls within
    # its windows, as the recovery-time panel's rate over the last hour needs.
    prometheus = prometheus_factory(
        [f"127.0.0.1:{healthy_port}", f"127.0.0.1:{outage_port}"],
        [f"127.0.0.1:{worker_port}"],
        {
            "consumergroup": worker_env["PRESENCE_WORKER_APP_ID"],
            "topic": settings["topic_raw"],
            "pod": "worker",
        },
    )

    wait_until(lambda: worker.answers("/readyz"), 120, "the worker to be ready")
    wait_until(lambda: len(prometheus.query("up == 1")) == 3, 60, "all three targets to be scraped")

    async def undecodable() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=settings["kafka_bootstrap_servers"])
        await producer.start()
        try:
            await producer.send_and_wait(settings["topic_raw"], key=b"user-bad", value=b"{not json")
        finally:
            await producer.stop()

    # Traffic: sessions coming online on several platforms, some ending, a logout; an invalid element; a forged
    # signature; a callback to the gateway without Kafka; an undecodable record straight into RAW.
    platforms = ["iOS", "Android", "Websocket", "PC", "MiniProgram", "Harmony"]

    def traffic(round_: int) -> None:
        online = [
            _event(f"user-{round_}-{i}", f"s-{i}", "0", platforms[i % len(platforms)]) for i in range(12)
        ]
        answer = _post(healthy, [*online, {"userid": "", "status": "9"}])
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"accepted": 12, "rejected": 1}
        ended = [_event(f"user-{round_}-{i}", f"s-{i}", "1", "iOS", offset_ms=500) for i in range(0, 4)]
        ended.append(_event(f"user-{round_}-5", "s-5", "2", "iOS", offset_ms=500))
        assert _post(healthy, ended).status_code == 200
        assert _post(healthy, online[:2], secret="not-the-secret").status_code == 401
        assert _post(outage, [_event(f"user-{round_}-x", "s-x", "0", "PC")]).status_code == 200
        asyncio.run(undecodable())

    def transitions_seen() -> float:
        return sum(float(s["value"][1]) for s in prometheus.query("presence_worker_transitions_total"))

    # Two rounds: a labelled series appears with its first increment, which rate() cannot see; the second round's
    # increments are what the rates and quantiles show.
    traffic(1)
    first = wait_until(transitions_seen, 60, "the first round's transitions in Prometheus")
    wait_until(
        lambda: (
            prometheus.query("presence_worker_dead_letters_total")
            and prometheus.query("presence_gateway_spool_append_duration_seconds_count > 0")
        ),
        60,
        "the first round's dead letter and spool append in Prometheus",
    )
    traffic(2)
    wait_until(lambda: transitions_seen() > first, 60, "the second round's transitions in Prometheus")

    # Every panel query with data, every alert selector with series.
    # The saturation panels read cAdvisor and kubelet series, which only a Kubernetes node has.
    queries = [
        (board, title, expand_grafana(expr, RATE_WINDOW))
        for board, title, expr in panel_queries()
        if not metric_names(expand_grafana(expr)) & EXTERNAL_METRICS
    ]
    assert len(queries) > 40
    # The reconciliation row and rules read series a worker exports only while it reconciles (streams/checkonline.py
    # ReconcileMetrics); this worker has no app secret, so they are checked here only if it exports them anyway.
    # (The corrections counter is the worker's own and always exported; the budget gauge only while reconciling.)
    reconciling = bool(prometheus.query(f"count({RECONCILE_PREFIX}budget_per_second)"))
    if not reconciling:
        unchecked = [q for q in queries if any(n.startswith(RECONCILE_PREFIX) for n in metric_names(q[2]))]
        queries = [q for q in queries if q not in unchecked]
        warnings.warn(
            f"{len(unchecked)} reconciliation panel queries not checked against a live worker: the worker exports no "
            f"{RECONCILE_PREFIX}* series (reconciliation off); their names are checked against ReconcileMetrics",
            stacklevel=1,
        )

    missing: list[str] = []
    deadline = time.monotonic() + 60
    pending = queries
    while pending:
        pending = [q for q in pending if not _finite(prometheus.query(q[2]))]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(1)
    missing += [f"{board} / {title}: {expr}" for board, title, expr in pending]
    assert not missing, "panel queries without data:\n" + "\n".join(missing)

    # Series of kafka-exporter and kube-state-metrics are not here (neither runs in this test); their names are
    # checked against the exporters' own in test_alerts. `up` of the services is, with the labels the rules pick.
    for rule in alert_rules():
        for selector in selectors(str(rule["expr"])):
            if selector.name in EXTERNAL_METRICS - {"up"} or 'component="kafka-exporter"' in str(selector):
                continue
            if selector.name.startswith(RECONCILE_PREFIX) and not reconciling:
                continue
            assert prometheus.query(str(selector)), f"{rule['alert']}: {selector} returns no series"

    # Prometheus itself loaded the alert rules and evaluates each of them without error.
    def evaluated() -> list[dict[str, Any]]:
        rules = [r for group in prometheus.api("rules")["groups"] for r in group["rules"]]
        return rules if rules and all(r.get("lastEvaluation", "").startswith("2") for r in rules) else []

    rules = wait_until(evaluated, 30, "the alert rules to be evaluated")
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
