"""Settings every component shares: Kafka connection and security, topic names and layout, logging.

Each service's own ``Settings`` (``gateway.config``, ``streams.config``) subclasses :class:`CommonSettings`, so one
set of ``PRESENCE_*`` environment variables configures the whole product.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class CommonSettings(BaseSettings):
    """Settings read from ``PRESENCE_*`` environment variables (and an optional ``.env`` file)."""

    model_config = SettingsConfigDict(
        env_prefix="PRESENCE_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    env: Literal["dev", "test", "prod"] = "dev"

    # The RongCloud app this deployment serves: the gateway verifies callbacks with its secret, the worker signs
    # its server-API requests (reconciliation) with it.
    app_key: str = ""
    app_secret: SecretStr = SecretStr("")

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_security_protocol: SecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: SaslMechanism | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    kafka_ssl_key_password: SecretStr | None = None
    kafka_client_id_prefix: str = "presence"

    topic_raw: str = "rongcloud.presence.raw"
    topic_dlq: str = "rongcloud.presence.dlq"
    topic_transitions: str = "presence.transitions"
    topic_state: str = "presence.state"
    # Off: the topics are made beforehand (an administrator, Strimzi KafkaTopics) and the services only describe
    # them, so their Kafka users need no Create right; a missing topic then stops a service with what to create.
    topic_create: bool = True
    topic_partitions: int = Field(default=12, ge=1, le=10_000)
    topic_replication_factor: int = Field(default=1, ge=1, le=10)
    topic_raw_retention_ms: int = Field(default=7 * 24 * 3600 * 1000, ge=-1)
    topic_dlq_retention_ms: int = Field(default=14 * 24 * 3600 * 1000, ge=-1)
    topic_transitions_retention_ms: int = Field(default=7 * 24 * 3600 * 1000, ge=-1)
    # STATE compaction. Kafka never compacts the active segment and by default rolls it after 7 days and
    # cleans a partition only once half of it is superseded, so a bootstrap would read up to a week of every
    # user's churn. An hour's segment and a 10 % dirty ratio bound that to about an hour's updates plus a tenth.
    topic_state_segment_ms: int = Field(default=3600 * 1000, ge=60 * 1000)
    topic_state_min_cleanable_dirty_ratio: float = Field(default=0.1, gt=0, le=1)
    # Tombstones of deleted users are kept this long: a consumer must read STATE to its end within it, or it
    # can miss a deletion (docs/consuming.md).
    topic_state_delete_retention_ms: int = Field(default=24 * 3600 * 1000, ge=0)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _bootstrap_not_empty(cls, value: str) -> str:
        servers = [s.strip() for s in value.split(",") if s.strip()]
        if not servers:
            raise ValueError("must name at least one host:port")
        for server in servers:
            host, sep, port = server.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"{server!r} is not host:port")
        return ",".join(servers)

    @model_validator(mode="after")
    def _security_is_complete(self) -> CommonSettings:
        if self.kafka_security_protocol.startswith("SASL"):
            missing = [
                name
                for name, value in (
                    ("PRESENCE_KAFKA_SASL_MECHANISM", self.kafka_sasl_mechanism),
                    ("PRESENCE_KAFKA_SASL_USERNAME", self.kafka_sasl_username),
                    ("PRESENCE_KAFKA_SASL_PASSWORD", self.kafka_sasl_password),
                )
                if value is None
            ]
            if missing:
                raise ValueError(
                    f"PRESENCE_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs {', '.join(missing)}"
                )
        for name in ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"PRESENCE_{name.upper()}={path} is not a readable file")
        return self

    @property
    def uses_ssl(self) -> bool:
        return self.kafka_security_protocol in ("SSL", "SASL_SSL")

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for Kafka connections, or None for plaintext listeners."""
        if not self.uses_ssl:
            return None
        context = ssl.create_default_context(
            cafile=str(self.kafka_ssl_cafile) if self.kafka_ssl_cafile else None
        )
        if self.kafka_ssl_certfile:
            context.load_cert_chain(
                str(self.kafka_ssl_certfile),
                str(self.kafka_ssl_keyfile) if self.kafka_ssl_keyfile else None,
                self.kafka_ssl_key_password.get_secret_value() if self.kafka_ssl_key_password else None,
            )
        return context

    def aiokafka_options(self) -> dict[str, Any]:
        """Connection and security keyword arguments for any aiokafka client (producer, consumer, admin)."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.kafka_bootstrap_servers,
            "security_protocol": self.kafka_security_protocol,
        }
        context = self.ssl_context()
        if context is not None:
            options["ssl_context"] = context
        if self.kafka_security_protocol.startswith("SASL"):
            assert self.kafka_sasl_password is not None  # noqa: S101 - enforced by _security_is_complete
            options["sasl_mechanism"] = self.kafka_sasl_mechanism
            options["sasl_plain_username"] = self.kafka_sasl_username
            options["sasl_plain_password"] = self.kafka_sasl_password.get_secret_value()
        return options
