"""Worker settings: the Faust app, its state store, the stream rules' timings and the query API.

Read from ``PRESENCE_*`` environment variables like every component (see :class:`CommonSettings` for Kafka,
topics and logging).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from core.contract import DEFAULT_WORKER_APP_ID
from core.settings import CommonSettings
from streams.rules import PresenceConfig

_MINUTE = 60.0
_HOUR = 3600.0
_DAY = 24 * 3600.0
# RongCloud's server-API hosts for the China (Beijing) data centre, primary then backup (docs/reconciliation.md).
_RONGCLOUD_API_URLS = ("https://api.rong-api.com", "https://api-b.rong-api.com")


class WorkerSettings(CommonSettings):
    """Settings of ``presence worker``."""

    worker_app_id: str = Field(
        default=DEFAULT_WORKER_APP_ID,
        min_length=1,
        description="Consumer group and prefix of the table's changelog topics; one per deployment.",
    )
    worker_data_dir: Path = Path(".run/worker")
    worker_web_bind: str = "127.0.0.1"
    worker_web_port: int = Field(default=6066, ge=1, le=65535)
    worker_canonical_url: str | None = Field(
        default=None,
        description="URL other workers use to reach this one for query routing; default http://bind:port.",
    )
    worker_query_token: SecretStr | None = None

    worker_ended_session_retention_seconds: float = Field(default=15 * _MINUTE, ge=0)
    worker_user_retention_seconds: float = Field(default=30 * _DAY, ge=0)
    worker_offline_grace_seconds: float = Field(default=0, ge=0)
    worker_include_client_ip: bool = True
    # 16, not the rules' 8: a batch sends several transitions of a user before any is acknowledged (S10).
    worker_transition_memory: int = Field(default=16, ge=1, le=1000)
    worker_deletion_memory: int = Field(
        default=10_000,
        ge=1,
        description="Deleted users kept per partition to re-send their deletion after a crash (S10).",
    )
    worker_sweep_batch: int = Field(default=1000, ge=1)
    worker_tick_interval_seconds: float = Field(default=1.0, gt=0)

    worker_session_timeout_seconds: float = Field(default=30, gt=0)
    worker_heartbeat_interval_seconds: float = Field(default=3, gt=0)
    worker_commit_interval_seconds: float = Field(default=2.0, gt=0)
    worker_group_instance_id: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "Static group membership (Kafka's group.instance.id), unique per worker and stable across its "
            "restarts (the pod name of a StatefulSet): a worker back within the session timeout keeps its "
            "partitions without a rebalance. Unset: dynamic membership."
        ),
    )
    worker_producer_linger_ms: int = Field(
        default=5, ge=0, le=1000, description="How long the worker's producer waits to fill a batch."
    )
    # RocksDB sizes apply per partition: Faust's defaults (2 GiB block cache each) would let 12 partitions ask
    # for 24 GiB. RocksDB's memory per owned partition is at most block cache + 2 write buffers: 16 MiB with
    # these defaults, 192 MiB for a worker owning 12 partitions (a million users' records take ~80 MiB on disk).
    worker_rocksdb_block_cache_bytes: int = Field(default=8 * 1024**2, ge=1024**2)
    worker_rocksdb_write_buffer_bytes: int = Field(default=4 * 1024**2, ge=1024**2)
    worker_rocksdb_max_open_files: int = Field(default=256, ge=16)

    topic_ticks: str | None = Field(
        default=None,
        description="Internal tick topic (S8 on idle partitions); default '<worker app id>-ticks'.",
    )
    topic_replay_transitions: str | None = Field(
        default=None,
        description="Replay mode (S11): where rebuilt transitions go; never the live TRANSITIONS topic.",
    )

    @model_validator(mode="after")
    def _timings_are_consistent(self) -> WorkerSettings:
        if self.worker_heartbeat_interval_seconds >= self.worker_session_timeout_seconds:
            raise ValueError(
                "PRESENCE_WORKER_HEARTBEAT_INTERVAL_SECONDS must be below PRESENCE_WORKER_SESSION_TIMEOUT_SECONDS"
            )
        if (
            self.topic_replay_transitions is not None
            and self.topic_replay_transitions == self.topic_transitions
        ):
            raise ValueError(
                "PRESENCE_TOPIC_REPLAY_TRANSITIONS must not be the live PRESENCE_TOPIC_TRANSITIONS topic (S11)"
            )
        return self

    @property
    def ticks_topic(self) -> str:
        # Per deployment like the changelogs, so a replay (another app id) never sees the live worker's ticks.
        return self.topic_ticks or f"{self.worker_app_id}-ticks"

    @property
    def canonical_url(self) -> str:
        return self.worker_canonical_url or f"http://{self.worker_web_bind}:{self.worker_web_port}"

    def presence_config(self) -> PresenceConfig:
        return PresenceConfig(
            ended_session_retention_ms=int(self.worker_ended_session_retention_seconds * 1000),
            user_retention_ms=int(self.worker_user_retention_seconds * 1000),
            offline_grace_ms=int(self.worker_offline_grace_seconds * 1000),
            include_client_ip=self.worker_include_client_ip,
            transition_memory=self.worker_transition_memory,
            deletion_memory=self.worker_deletion_memory,
            reconcile_margin_ms=int(self.reconcile_margin_seconds * 1000),
        )

    # --- reconciliation: RongCloud's checkOnline (docs/reconciliation.md) ------------------------------------
    # Kept together at the end of the class. The API is signed with PRESENCE_APP_KEY / PRESENCE_APP_SECRET.

    reconcile_enabled: bool | None = Field(
        default=None,
        description="Check doubted users with RongCloud's server API; default: on when the app key and secret "
        "are set.",
    )
    reconcile_api_urls: Annotated[tuple[str, ...], NoDecode] = Field(
        default=_RONGCLOUD_API_URLS,
        description="Server-API base URLs, comma-separated, tried in turn when one fails.",
    )
    reconcile_budget_per_second: float = Field(
        default=50.0,
        gt=0,
        le=10_000,
        description="checkOnline calls per second for the whole deployment (RongCloud allows 100 per app).",
    )
    reconcile_max_silence_seconds: float = Field(default=4 * _HOUR, gt=0)
    reconcile_recheck_interval_seconds: float = Field(default=_HOUR, gt=0)
    reconcile_margin_seconds: float = Field(default=30.0, ge=0, le=3600)
    reconcile_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    reconcile_attempts: int = Field(default=3, ge=1, le=10)
    reconcile_backoff_seconds: float = Field(default=0.5, gt=0, le=60)
    reconcile_concurrency: int = Field(default=8, ge=1, le=256)
    reconcile_queue_capacity: int = Field(default=100_000, ge=100)
    reconcile_gap_cap: int = Field(default=10_000, ge=0)
    reconcile_gap_lookback_seconds: float = Field(default=60.0, ge=0)

    @field_validator("reconcile_api_urls", mode="before")
    @classmethod
    def _api_urls(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        if isinstance(value, list | tuple):
            if not value:
                raise ValueError("name at least one base URL")
            for url in value:
                parts = urlsplit(str(url))
                if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
                    raise ValueError(f"{url!r} is not a base URL such as https://api.rong-api.com")
            return tuple(str(url).rstrip("/") for url in value)
        return value

    @model_validator(mode="after")
    def _reconcile_has_credentials(self) -> WorkerSettings:
        if self.reconcile_enabled and not (self.app_key and self.app_secret.get_secret_value()):
            raise ValueError(
                "PRESENCE_RECONCILE_ENABLED=true needs PRESENCE_APP_KEY and PRESENCE_APP_SECRET (the server API "
                "is signed with the app secret)"
            )
        return self

    @property
    def reconcile_active(self) -> bool:
        """Whether this worker checks doubted users with RongCloud."""
        if self.reconcile_enabled is not None:
            return self.reconcile_enabled
        return bool(self.app_key and self.app_secret.get_secret_value())
