"""Gateway settings from PRESENCE_* variables, validated at start with the variable named (D1)."""

from __future__ import annotations

import ipaddress

import pytest
from pydantic import ValidationError

from gateway.config import GatewaySettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("PRESENCE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir("/")  # no stray .env file


def test_d1_defaults_match_the_contract() -> None:
    s = GatewaySettings()
    assert s.gateway_path == "/rongcloud/online-status"
    assert s.gateway_timestamp_window_seconds == 600
    assert s.gateway_max_body_bytes == 1024 * 1024
    assert s.gateway_max_events == 5000
    assert s.gateway_publish_budget_seconds == 4.0
    assert s.gateway_spool_enabled


def test_d1_from_environment_with_cidr_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRESENCE_ENV", "prod")
    monkeypatch.setenv("PRESENCE_APP_KEY", "k")
    monkeypatch.setenv("PRESENCE_APP_SECRET", "s3cret-value")
    monkeypatch.setenv("PRESENCE_APP_SECRET_PREVIOUS", "old-secret")
    monkeypatch.setenv("PRESENCE_GATEWAY_ALLOW_CIDRS", "203.0.113.0/24, 2001:db8::/32")
    monkeypatch.setenv("PRESENCE_GATEWAY_TRUSTED_PROXIES", "10.0.0.7/8")
    monkeypatch.setenv("PRESENCE_GATEWAY_PUBLISH_BUDGET_SECONDS", "3.5")
    s = GatewaySettings()
    assert s.secrets() == ("s3cret-value", "old-secret")
    assert s.gateway_allow_cidrs == (
        ipaddress.ip_network("203.0.113.0/24"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    assert s.gateway_trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"),)
    assert s.gateway_publish_budget_seconds == 3.5
    assert "s3cret-value" not in repr(s)


def test_d1_prod_requires_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRESENCE_ENV", "prod")
    with pytest.raises(ValidationError, match="PRESENCE_APP_KEY"):
        GatewaySettings()
    monkeypatch.setenv("PRESENCE_APP_KEY", "k")
    with pytest.raises(ValidationError, match="PRESENCE_APP_SECRET"):
        GatewaySettings()


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("PRESENCE_GATEWAY_PUBLISH_BUDGET_SECONDS", "5", "PRESENCE_GATEWAY_PUBLISH_BUDGET_SECONDS"),
        ("PRESENCE_GATEWAY_ALLOW_CIDRS", "not-a-cidr", "gateway_allow_cidrs"),
        ("PRESENCE_GATEWAY_PATH", "no-slash", "gateway_path"),
        ("PRESENCE_GATEWAY_PATH", "/healthz", "gateway_path"),
        ("PRESENCE_APP_SECRET_PREVIOUS", "same-as-current", "PRESENCE_APP_SECRET_PREVIOUS"),
        ("PRESENCE_GATEWAY_MAX_BODY_BYTES", "12", "gateway_max_body_bytes"),
    ],
)
def test_d1_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv("PRESENCE_APP_SECRET", "same-as-current")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match=message):
        GatewaySettings()


def test_d1_empty_previous_secret_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRESENCE_APP_SECRET", "current-secret")
    monkeypatch.setenv("PRESENCE_APP_SECRET_PREVIOUS", "")
    assert GatewaySettings().secrets() == ("current-secret",)
