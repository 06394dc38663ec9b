"""Gateway metrics (M1, M3): prefix ``presence_gateway_``, base units, closed label sets only."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from gateway.parsing import DeadLetterReason
from gateway.signing import AuthFailure

PREFIX = "presence_gateway"

# Request outcomes: the closed label set of presence_gateway_requests_total.
OUTCOMES = (
    "published",
    "spooled",
    "unauthorized",
    "forbidden",
    "bad_request",
    "too_large",
    "unavailable",
    # An unhandled exception: a bug, answered 500. Counted so the 5xx alert sees it.
    "error",
)
EVENT_STATUSES = ("online", "offline", "logout", "invalid")
EVENT_OUTCOMES = ("published", "spooled", "dead_lettered", "refused")
BREAKER_STATES = ("closed", "open", "half_open")
PUBLISH_SOURCES = ("request", "spool")
PUBLISH_FAILURE_KINDS = ("timeout", "kafka_error")

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
    3.0,
    4.0,
    4.5,
    5.0,
    10.0,
)


class GatewayMetrics:
    """All gateway metrics, registered in their own registry so several apps can live in one process."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process_metrics: bool = True) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)

        self.requests = Counter(
            f"{PREFIX}_requests_total", "Webhook requests by outcome.", ["outcome"], registry=r
        )
        self.request_duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Webhook request latency, from the first byte read to the response.",
            ["outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.auth_failures = Counter(
            f"{PREFIX}_auth_failures_total", "Requests refused with 401, by reason.", ["reason"], registry=r
        )
        self.events = Counter(
            f"{PREFIX}_events_total",
            "Upstream events by status and what became of them.",
            ["status", "outcome"],
            registry=r,
        )
        self.dead_letters = Counter(
            f"{PREFIX}_dead_letters_total",
            "Records sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=r,
        )
        self.request_events = Histogram(
            f"{PREFIX}_request_events",
            "Events per accepted request.",
            buckets=(0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
            registry=r,
        )
        self.publish_duration = Histogram(
            f"{PREFIX}_kafka_publish_duration_seconds",
            "Time until Kafka acknowledged every record of a publish (successful publishes only).",
            ["source"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.publish_failures = Counter(
            f"{PREFIX}_kafka_publish_failures_total",
            "Publishes Kafka did not acknowledge in time or refused, by source and kind.",
            ["source", "kind"],
            registry=r,
        )
        self.producer_restarts = Counter(
            f"{PREFIX}_kafka_producer_starts_total",
            "Kafka producer (re)starts, by result.",
            ["result"],
            registry=r,
        )
        self.breaker_state = Gauge(
            f"{PREFIX}_breaker_state",
            "Circuit breaker state in front of Kafka: 1 for the current state, 0 for the others.",
            ["state"],
            registry=r,
        )
        self.breaker_transitions = Counter(
            f"{PREFIX}_breaker_transitions_total",
            "Circuit breaker changes, by new state.",
            ["state"],
            registry=r,
        )
        self.spool_bytes = Gauge(f"{PREFIX}_spool_bytes", "Bytes in the local spool.", registry=r)
        self.spool_max_bytes = Gauge(f"{PREFIX}_spool_max_bytes", "The spool's size limit.", registry=r)
        self.spool_records = Gauge(
            f"{PREFIX}_spool_records", "Records waiting in the local spool.", registry=r
        )
        self.spool_oldest_age = Gauge(
            f"{PREFIX}_spool_oldest_age_seconds",
            "Age of the oldest record in the spool (0 when empty).",
            registry=r,
        )
        self.spool_appended = Counter(
            f"{PREFIX}_spool_appended_records_total", "Records written to the spool.", registry=r
        )
        self.spool_drained = Counter(
            f"{PREFIX}_spool_drained_records_total", "Spooled records Kafka acknowledged.", registry=r
        )
        self.spool_append_duration = Histogram(
            f"{PREFIX}_spool_append_duration_seconds",
            "Time to write and fsync one append.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.spool_damaged_segments = Counter(
            f"{PREFIX}_spool_damaged_segments_total",
            "Spool segments with unreadable bytes, set aside after their intact records were drained.",
            registry=r,
        )
        self.replay_cache_entries = Gauge(
            f"{PREFIX}_replay_cache_entries",
            "(nonce, timestamp) pairs the replay guard remembers.",
            registry=r,
        )
        self.ready = Gauge(f"{PREFIX}_ready", "1 while the gateway can accept callbacks.", registry=r)
        # Every series exists from the start, so rate() and absent() work before the first occurrence. The request
        # path's are bound once here: labels() takes a lock and a lookup on every call.
        self.by_outcome = {
            outcome: (self.requests.labels(outcome), self.request_duration.labels(outcome))
            for outcome in OUTCOMES
        }
        self.auth_failures_by_reason = {
            reason: self.auth_failures.labels(reason.value) for reason in AuthFailure
        }
        self.dead_letters_by_reason = {
            reason.value: self.dead_letters.labels(reason.value) for reason in DeadLetterReason
        }
        self.events_by = {
            (status, outcome): self.events.labels(status, outcome)
            for status in EVENT_STATUSES
            for outcome in EVENT_OUTCOMES
        }
        self.publish_duration_by_source = {
            source: self.publish_duration.labels(source) for source in PUBLISH_SOURCES
        }
        self.publish_failures_by = {
            (source, kind): self.publish_failures.labels(source, kind)
            for source in PUBLISH_SOURCES
            for kind in PUBLISH_FAILURE_KINDS
        }
        for result in ("started", "failed"):
            self.producer_restarts.labels(result)
        for state in BREAKER_STATES:
            self.breaker_state.labels(state).set(1 if state == "closed" else 0)
