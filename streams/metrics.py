"""Worker metrics (M2), Prometheus conventions: ``presence_worker_`` prefix, base units, closed label sets (M3).

Faust's own sensor reports milliseconds under its own names and has no consumer lag; these are the metrics the
dashboards and alerts use.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from core.contract import GAP_REASONS

# M3: the os label only takes upstream's five platforms, anything else is "other".
# The query API's routes, by their templates (a closed set: the user id is never a label).
QUERY_ROUTES = (
    "/presence/{userid}",
    "/presence:batch",
    "/presence:reconcile",
    "/metrics",
    "/healthz",
    "/readyz",
)
KNOWN_PLATFORMS = ("iOS", "Android", "Websocket", "PC", "MiniProgram")
OUTCOMES = ("applied", "duplicate", "stale", "too_late", "invalid")
# What an applied observation did (R2-R4), streams.rules.Correction.
CORRECTION_KINDS = ("session_ended", "synthetic_opened", "verified")
STATUSES = ("online", "offline", "logged_out")
GAP_REASON_LABELS = (*GAP_REASONS, "other")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_QUERY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_EVENT_LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 3600.0)


def platform_label(os: str | None) -> str:
    return os if os in KNOWN_PLATFORMS else "other"


class WorkerMetrics:
    """All worker metrics, registered in one registry (a fresh one per app, so tests don't collide)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "presence_worker_events_total",
            "RAW events processed, by outcome (applied, duplicate, stale, too_late (R5), invalid).",
            ["outcome"],
            registry=r,
        )
        for outcome in OUTCOMES:
            self.events.labels(outcome)
        self.reconcile_corrections = Counter(
            "presence_worker_reconcile_corrections_total",
            "Observations applied, by what they did (R2-R4): session_ended, synthetic_opened, verified (agreed).",
            ["kind"],
            registry=r,
        )
        for kind in CORRECTION_KINDS:
            self.reconcile_corrections.labels(kind)
        self.transitions = Counter(
            "presence_worker_transitions_total",
            "User-level transitions emitted to TRANSITIONS, by from/to status (re-sends included).",
            ["from_status", "to_status"],
            registry=r,
        )
        self.reemitted = Counter(
            "presence_worker_transitions_resent_total",
            "Transitions sent again because their cause was redelivered after a crash or rebalance (S10).",
            registry=r,
        )
        self.state_updates = Counter(
            "presence_worker_state_updates_total",
            "Records published to the compacted STATE topic (tombstones included).",
            registry=r,
        )
        self.users_deleted = Counter(
            "presence_worker_users_deleted_total",
            "Users deleted after the idle retention (S6), each with a STATE tombstone.",
            registry=r,
        )
        self.dead_letters = Counter(
            "presence_worker_dead_letters_total",
            "RAW messages the worker could not use, sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=r,
        )
        self.processing_errors = Counter(
            "presence_worker_processing_errors_total",
            "Unexpected errors while processing a message (the agent restarts and the message is retried).",
            registry=r,
        )
        self.batch_cuts = Counter(
            "presence_worker_batch_cuts_total",
            "Batches cut short so that no user is sent more transitions than its record remembers before they "
            "are acknowledged (S10); the rest of the batch follows once they are.",
            registry=r,
        )
        self.rebalances = Counter(
            "presence_worker_rebalances_total",
            "Consumer group rebalances this worker took part in.",
            registry=r,
        )
        self.recovery_seconds = Histogram(
            "presence_worker_recovery_seconds",
            "Time from a rebalance to processing again (table recovery from the changelog included).",
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        # The histogram's rate needs two recoveries in a window to show one; a gauge shows the last at once, and
        # max_over_time gives the longest within any window.
        self.last_recovery_seconds = Gauge(
            "presence_worker_last_recovery_seconds",
            "Duration of this worker's most recent recovery (rebalance to processing again).",
            registry=r,
        )
        self.pipeline_latency = Histogram(
            "presence_worker_pipeline_latency_seconds",
            "Gateway receipt of the causing event to the transition being emitted.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.event_time_lag = Histogram(
            "presence_worker_event_time_lag_seconds",
            "Processing time minus the event's own time (upstream delay plus pipeline delay).",
            buckets=_EVENT_LAG_BUCKETS,
            registry=r,
        )
        self.consumer_lag_messages = Gauge(
            "presence_worker_consumer_lag_messages",
            "Messages in the RAW partition not yet processed by this worker.",
            ["partition"],
            registry=r,
        )
        self.consumer_lag_seconds = Gauge(
            "presence_worker_consumer_lag_seconds",
            "Age of the oldest unprocessed RAW message of the partition (0 when caught up).",
            ["partition"],
            registry=r,
        )
        self.assigned_partitions = Gauge(
            "presence_worker_assigned_partitions",
            "RAW partitions this worker owns.",
            registry=r,
        )
        self.online_users = Gauge(
            "presence_worker_online_users",
            "Users whose shown status is online, over this worker's partitions.",
            registry=r,
        )
        self.users = Gauge(
            "presence_worker_users",
            "Users with a record in this worker's partitions.",
            registry=r,
        )
        self.sessions = Gauge(
            "presence_worker_sessions",
            "Sessions tracked (online and recently ended) in this worker's partitions.",
            registry=r,
        )
        self.online_sessions = Gauge(
            "presence_worker_online_sessions",
            "Online sessions by platform in this worker's partitions.",
            ["os"],
            registry=r,
        )
        for platform in (*KNOWN_PLATFORMS, "other"):
            self.online_sessions.labels(platform)
        self.stream_time_seconds = Gauge(
            "presence_worker_stream_time_seconds",
            "Stream time (largest event time seen) of each owned partition, epoch seconds.",
            ["partition"],
            registry=r,
        )
        self.query_requests = Counter(
            "presence_worker_query_requests_total",
            "Query API requests by route (template) and HTTP status.",
            ["route", "status"],
            registry=r,
        )
        self.query_request_duration = Histogram(
            "presence_worker_query_request_duration_seconds",
            "Query API latency by route, from the handler's start to its response (forwarding included).",
            ["route"],
            buckets=_QUERY_BUCKETS,
            registry=r,
        )
        for route in QUERY_ROUTES:
            self.query_request_duration.labels(route)
        self.ready = Gauge(
            "presence_worker_ready",
            "1 when the worker has partitions assigned and recovered and is processing, else 0.",
            registry=r,
        )
        # --- reconciliation (docs/reconciliation.md; the checker's own are presence_worker_reconcile_*) ---
        self.intake_gaps = Counter(
            "presence_worker_intake_gaps_total",
            "Intake-gap markers read from RAW (one per partition per gap), by reason.",
            ["reason"],
            registry=r,
        )
        for reason in GAP_REASON_LABELS:
            self.intake_gaps.labels(reason)
