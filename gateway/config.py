"""Gateway settings: the RongCloud app's credentials, the webhook's limits, the spool and the network policy.

Everything is read from ``PRESENCE_*`` environment variables (see :class:`core.settings.CommonSettings` for
Kafka, topics and logging). Lists (CIDRs) are comma-separated.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from core.contract import WEBHOOK_PATH
from core.settings import CommonSettings

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Networks = Annotated[tuple[IPNetwork, ...], NoDecode]


def _parse_networks(value: Any) -> Any:
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",") if part.strip()]
        # strict=False accepts a host address with a prefix ("10.0.0.7/24") as the network it lies in.
        return tuple(ipaddress.ip_network(item, strict=False) for item in items)
    return value


class GatewaySettings(CommonSettings):
    """Settings of the webhook gateway (``presence gateway``)."""

    # app_key and app_secret are shared with the worker (it calls RongCloud's server API): core.settings.
    app_secret_previous: SecretStr | None = None

    gateway_host: str = "0.0.0.0"  # noqa: S104 - a container's service must listen on all interfaces
    gateway_port: int = Field(default=8080, ge=1, le=65535)
    gateway_path: str = WEBHOOK_PATH

    gateway_timestamp_window_seconds: float = Field(default=600.0, gt=0, le=86_400)
    gateway_max_body_bytes: int = Field(default=1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    gateway_max_events: int = Field(default=5000, ge=1, le=1_000_000)
    gateway_max_future_skew_seconds: float = Field(default=300.0, ge=0)
    gateway_dlq_raw_max_bytes: int = Field(default=64 * 1024, ge=256, le=900 * 1024)
    gateway_replay_cache_max_entries: int = Field(default=200_000, ge=1000)

    gateway_publish_budget_seconds: float = Field(default=4.0, gt=0, le=30)
    gateway_breaker_cooldown_seconds: float = Field(default=1.0, gt=0, le=300)
    gateway_breaker_max_cooldown_seconds: float = Field(default=30.0, gt=0, le=3600)
    gateway_kafka_request_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    gateway_kafka_linger_ms: int = Field(default=2, ge=0, le=1000)

    gateway_spool_enabled: bool = True
    gateway_spool_dir: Path = Path("/var/lib/presence/spool")
    gateway_spool_max_bytes: int = Field(default=1024**3, ge=64 * 1024)
    gateway_spool_segment_bytes: int = Field(default=8 * 1024 * 1024, ge=4 * 1024)
    gateway_spool_drain_batch: int = Field(default=1000, ge=1, le=100_000)

    gateway_allow_cidrs: Networks = ()
    gateway_trusted_proxies: Networks = ()

    # A connection whose request head (request line and headers) is not complete within this time is closed:
    # the HTTP server itself never times out a head that trickles in (slowloris).
    gateway_header_timeout_seconds: float = Field(default=10.0, gt=0, le=300)

    # The fraction of successful webhook requests that get an access-log line; every refusal and error gets one.
    gateway_access_log_success_sample: float = Field(default=0.01, ge=0, le=1)

    gateway_shutdown_grace_seconds: float = Field(default=10.0, ge=0, le=3600)
    gateway_shutdown_drain_seconds: float = Field(default=15.0, ge=0, le=3600)
    gateway_ensure_topics: bool = True

    @field_validator("gateway_allow_cidrs", "gateway_trusted_proxies", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        return _parse_networks(value)

    @field_validator("gateway_path")
    @classmethod
    def _path_shape(cls, value: str) -> str:
        if not value.startswith("/") or "?" in value or "#" in value or any(c.isspace() for c in value):
            raise ValueError(f"must be an absolute URL path such as {WEBHOOK_PATH}")
        if value.rstrip("/") in ("", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
            raise ValueError(f"{value!r} collides with the gateway's own endpoints")
        return value

    @model_validator(mode="after")
    def _credentials(self) -> GatewaySettings:
        secret = self.app_secret.get_secret_value()
        previous = self.app_secret_previous.get_secret_value() if self.app_secret_previous else None
        if self.env != "dev":
            if not self.app_key:
                raise ValueError("PRESENCE_APP_KEY must be set outside dev")
            if len(secret) < 8:
                raise ValueError("PRESENCE_APP_SECRET must be set (at least 8 characters) outside dev")
        if previous is not None and previous == secret:
            raise ValueError("PRESENCE_APP_SECRET_PREVIOUS equals PRESENCE_APP_SECRET")
        if self.gateway_publish_budget_seconds >= 5.0:
            raise ValueError(
                "PRESENCE_GATEWAY_PUBLISH_BUDGET_SECONDS must stay below RongCloud's 5 s callback timeout"
            )
        if self.gateway_breaker_max_cooldown_seconds < self.gateway_breaker_cooldown_seconds:
            raise ValueError(
                "PRESENCE_GATEWAY_BREAKER_MAX_COOLDOWN_SECONDS is below PRESENCE_GATEWAY_BREAKER_COOLDOWN_SECONDS"
            )
        if self.gateway_spool_segment_bytes > self.gateway_spool_max_bytes:
            raise ValueError("PRESENCE_GATEWAY_SPOOL_SEGMENT_BYTES exceeds PRESENCE_GATEWAY_SPOOL_MAX_BYTES")
        return self

    def secrets(self) -> tuple[str, ...]:
        """The app secrets a signature may be made with: the current one, then the previous one if set."""
        current = self.app_secret.get_secret_value()
        values = [current] if current else []
        previous = self.app_secret_previous.get_secret_value() if self.app_secret_previous else ""
        if previous:  # an empty variable (as templates often render "unset") means no previous secret
            values.append(previous)
        return tuple(values)


@lru_cache(maxsize=1)
def get_settings() -> GatewaySettings:
    """The process's settings, read once from the environment."""
    return GatewaySettings()
