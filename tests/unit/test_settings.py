"""D1: settings come from PRESENCE_* variables and a bad one is refused with its name."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from core.settings import CommonSettings
from core.topics import min_insync_replicas, product_topics


def test_d1_defaults_match_the_contract() -> None:
    settings = CommonSettings(_env_file=None)  # type: ignore[call-arg]
    assert settings.topic_raw == "rongcloud.presence.raw"
    assert settings.topic_dlq == "rongcloud.presence.dlq"
    assert settings.topic_transitions == "presence.transitions"
    assert settings.topic_state == "presence.state"
    assert settings.topic_partitions == 12


def test_d1_reads_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRESENCE_KAFKA_BOOTSTRAP_SERVERS", "k1:9093, k2:9093")
    monkeypatch.setenv("PRESENCE_TOPIC_PARTITIONS", "24")
    settings = CommonSettings(_env_file=None)  # type: ignore[call-arg]
    assert settings.kafka_bootstrap_servers == "k1:9093,k2:9093"
    assert settings.topic_partitions == 24


@pytest.mark.parametrize("value", ["", "kafka", "kafka:port", ":9092"])
def test_d1_bad_bootstrap_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("PRESENCE_KAFKA_BOOTSTRAP_SERVERS", value)
    with pytest.raises(ValidationError, match="kafka_bootstrap_servers"):
        CommonSettings(_env_file=None)  # type: ignore[call-arg]


def test_d1_sasl_without_credentials_names_the_missing_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRESENCE_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("PRESENCE_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    with pytest.raises(ValidationError) as caught:
        CommonSettings(_env_file=None)  # type: ignore[call-arg]
    assert "PRESENCE_KAFKA_SASL_USERNAME" in str(caught.value)
    assert "PRESENCE_KAFKA_SASL_PASSWORD" in str(caught.value)


def test_d1_sasl_options_reach_the_kafka_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRESENCE_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("PRESENCE_KAFKA_SASL_MECHANISM", "SCRAM-SHA-256")
    monkeypatch.setenv("PRESENCE_KAFKA_SASL_USERNAME", "presence")
    monkeypatch.setenv("PRESENCE_KAFKA_SASL_PASSWORD", "s3cret")
    settings = CommonSettings(_env_file=None)  # type: ignore[call-arg]
    options = settings.aiokafka_options()
    assert options["sasl_mechanism"] == "SCRAM-SHA-256"
    assert options["sasl_plain_password"] == "s3cret"
    assert "s3cret" not in repr(settings), "secrets must not leak through repr/logs"


def test_d1_missing_certificate_file_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PRESENCE_KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("PRESENCE_KAFKA_SSL_CAFILE", str(tmp_path / "absent.pem"))
    with pytest.raises(ValidationError, match="PRESENCE_KAFKA_SSL_CAFILE"):
        CommonSettings(_env_file=None)  # type: ignore[call-arg]


@pytest.mark.parametrize(("rf", "isr"), [(1, 1), (2, 1), (3, 2), (5, 2)])
def test_d2_min_insync_replicas(rf: int, isr: int) -> None:
    assert min_insync_replicas(rf) == isr


def test_d2_state_is_compacted_and_raw_keeps_a_week() -> None:
    specs = {spec.name: spec for spec in product_topics(CommonSettings(_env_file=None))}  # type: ignore[call-arg]
    assert specs["presence.state"].config["cleanup.policy"] == "compact"
    assert specs["rongcloud.presence.raw"].config["retention.ms"] == str(7 * 24 * 3600 * 1000)


# --- reconciliation (checkOnline) ---------------------------------------------------------------------------


def worker_settings(**values: object) -> object:
    from streams.config import WorkerSettings

    return WorkerSettings(_env_file=None, **values)  # type: ignore[call-arg]


def test_reconciliation_defaults_to_rongclouds_hosts_and_is_on_with_credentials() -> None:
    settings = worker_settings()
    assert settings.reconcile_api_urls == ("https://api.rong-api.com", "https://api-b.rong-api.com")  # type: ignore[attr-defined]
    assert settings.reconcile_active is False  # type: ignore[attr-defined]
    assert worker_settings(app_key="k", app_secret="s").reconcile_active is True  # type: ignore[attr-defined]
    assert worker_settings(app_key="k", app_secret="s", reconcile_enabled=False).reconcile_active is False  # type: ignore[attr-defined]


def test_reconciliation_api_urls_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRESENCE_RECONCILE_API_URLS", "http://127.0.0.1:8099/, https://api-b.example")
    assert worker_settings().reconcile_api_urls == ("http://127.0.0.1:8099", "https://api-b.example")  # type: ignore[attr-defined]
    monkeypatch.setenv("PRESENCE_RECONCILE_API_URLS", "api.rong-api.com")
    with pytest.raises(ValidationError, match="reconcile_api_urls"):
        worker_settings()


def test_reconciliation_switched_on_without_the_secret_names_the_variables() -> None:
    with pytest.raises(ValidationError, match="PRESENCE_APP_SECRET"):
        worker_settings(reconcile_enabled=True, app_key="k")


def test_the_app_secret_is_shared_by_gateway_and_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.config import GatewaySettings

    monkeypatch.setenv("PRESENCE_APP_KEY", "key")
    monkeypatch.setenv("PRESENCE_APP_SECRET", "secret-1234")
    gateway = GatewaySettings(_env_file=None)  # type: ignore[call-arg]
    worker = worker_settings()
    assert (gateway.app_key, gateway.app_secret.get_secret_value()) == ("key", "secret-1234")
    assert (worker.app_key, worker.app_secret.get_secret_value()) == ("key", "secret-1234")  # type: ignore[attr-defined]
