"""The query API (Q1-Q3) and the worker's probes and metrics, as Faust web views.

A user's record lives in the worker owning the user's partition; a request reaching another worker is
forwarded once to the owner (marked with :data:`ROUTED_HEADER` so it is never forwarded again). Every request is
counted and timed by route template and status (``presence_worker_query_*``).

``POST /presence:reconcile`` (token-protected like the queries) queues on-demand checks with RongCloud
(docs/reconciliation.md): each user's check is queued by the worker owning the user, whose share of the budget
pays for it, and the answer reaches the user's record as an observation on RAW.
"""

from __future__ import annotations

import hmac
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import quote

import orjson
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from core.contract import MAX_QUERY_BATCH, USERS_TABLE, changelog_topic, partition_of
from streams.checkonline import Reconciler
from streams.config import WorkerSettings
from streams.metrics import WorkerMetrics
from streams.processor import state_of

ROUTED_HEADER = "X-Presence-Routed"
_REASSIGNING = {"error": "partitions are being reassigned; retry"}


def _measured_view(metrics: WorkerMetrics) -> type[View]:
    """A view base class that counts and times every request by route template (``view_path``) and status."""

    class MeasuredView(View):
        async def dispatch(self, request: Any) -> Any:
            started = time.perf_counter()
            status = 500  # an exception escaping the handler becomes a 500
            try:
                response = await super().dispatch(request)
                status = response.status
                return response
            finally:
                route = self.view_path
                metrics.query_requests.labels(route, str(status)).inc()
                metrics.query_request_duration.labels(route).observe(time.perf_counter() - started)

    return MeasuredView


class Query:
    """Q1 and Q2 over the local table, forwarding to the owning worker where needed."""

    def __init__(self, app: Any, settings: WorkerSettings, table: Mapping[str, bytes]) -> None:
        self._app = app
        self._settings = settings
        self._table = table
        self._token = settings.worker_query_token.get_secret_value() if settings.worker_query_token else None
        self._me = settings.canonical_url.rstrip("/")
        self._changelog = changelog_topic(settings.worker_app_id)

    def unauthorized(self, view: View, request: Request) -> Response | None:
        """Q3: a 401 unless the bearer token matches (or none is configured)."""
        if self._token is None:
            return None
        if hmac.compare_digest(
            request.headers.get("Authorization", "").encode(), f"Bearer {self._token}".encode()
        ):
            return None
        return view.json({"error": "missing or wrong bearer token"}, status=401)

    def owner_of(self, userid: str) -> str | None:
        """URL of the worker that owns the user's partition, None while the assignment is unknown.

        Computed from Kafka's partitioner and the assignment the group leader shared; Faust's own key routing
        asks the producer's metadata, which may not know the changelog topic yet and then guesses.
        """
        partition = partition_of(userid.encode(), self._settings.topic_partitions)
        for url, topics in self._app.router.table_metadata(USERS_TABLE).items():
            if partition in topics.get(self._changelog, ()):
                return str(url).rstrip("/")
        return None

    def _forward_headers(self) -> dict[str, str]:
        headers = {ROUTED_HEADER: "1"}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def _local(self, userid: str) -> dict[str, Any] | None:
        return state_of(self._table, userid, self._settings.worker_include_client_ip)

    async def one(self, view: View, request: Request, userid: str) -> Response:
        """Q1: a user's current record, as on STATE."""
        if request.headers.get(ROUTED_HEADER) is None:
            owner = self.owner_of(userid)
            if owner is None:
                return view.json(_REASSIGNING, status=503)
            if owner != self._me:
                async with self._app.http_client.get(
                    f"{owner}/presence/{quote(userid, safe='')}", headers=self._forward_headers()
                ) as response:
                    return view.bytes(
                        await response.read(), content_type="application/json", status=response.status
                    )
        record = self._local(userid)
        if record is None:
            return view.json({"error": f"no presence record for {userid!r}", "userid": userid}, status=404)
        return view.json(record)

    async def batch(self, view: View, request: Request) -> Response:
        """Q2: the records of up to MAX_QUERY_BATCH users; unknown users are left out."""
        userids, refusal = await _userids(view, request)
        if refusal is not None:
            return refusal
        return await self._by_owner(view, request, userids, "/presence:batch", "records", 200, self._local)

    async def reconcile(self, view: View, request: Request, reconciler: Reconciler | None) -> Response:
        """Queue an on-demand check of up to MAX_QUERY_BATCH users at the workers owning them (202): what each
        worker's queue did with each user (``queued``, ``raised``, ``duplicate``, ``full``)."""
        if reconciler is None:
            return view.json(
                {"error": "reconciliation is off (PRESENCE_RECONCILE_ENABLED, or no app key and secret)"},
                status=409,
            )
        userids, refusal = await _userids(view, request)
        if refusal is not None:
            return refusal
        return await self._by_owner(
            view, request, userids, "/presence:reconcile", "queued", 202,
            lambda userid: reconciler.offer(userid, "on_demand").value,
        )  # fmt: skip

    async def _by_owner(
        self,
        view: View,
        request: Request,
        userids: list[str],
        path: str,
        field: str,
        status: int,
        local: Callable[[str], Any],
    ) -> Response:
        """``local`` for each of ``userids`` this worker owns, ``path`` at the owners of the others; answer
        ``{field: {userid: result}}`` (results that are None left out). A request routed here by another worker
        is answered locally: its sender already found the owner."""
        results: dict[str, Any] = {}
        remote: dict[str, list[str]] = defaultdict(list)
        routed = request.headers.get(ROUTED_HEADER) is not None
        for userid in dict.fromkeys(userids):
            owner = None if routed else self.owner_of(userid)
            if owner is None and not routed:
                return view.json(_REASSIGNING, status=503)
            if owner is None or owner == self._me:
                result = local(userid)
                if result is not None:
                    results[userid] = result
            else:
                remote[owner].append(userid)
        for owner_url, ids in remote.items():
            async with self._app.http_client.post(
                f"{owner_url}{path}", data=orjson.dumps({"userids": ids}), headers=self._forward_headers()
            ) as response:
                if response.status != status:
                    return view.json({"error": f"owner {owner_url} answered {response.status}"}, status=502)
                results.update((await response.json())[field])
        return view.json({field: results}, status=status)


async def _userids(view: View, request: Request) -> tuple[list[str], Response | None]:
    """The ``{"userids": [...]}`` body of Q2 and the reconcile endpoint, or the 400/413 answer refusing it."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return [], view.json({"error": 'body must be JSON: {"userids": [...]}'}, status=400)
    userids = body.get("userids") if isinstance(body, dict) else None
    if not isinstance(userids, list) or not all(isinstance(u, str) and u for u in userids):
        return [], view.json({"error": 'body must be {"userids": [non-empty strings]}'}, status=400)
    if len(userids) > MAX_QUERY_BATCH:
        return [], view.json({"error": f"at most {MAX_QUERY_BATCH} user ids per request"}, status=413)
    return userids, None


def register_views(
    app: Any,
    settings: WorkerSettings,
    table: Mapping[str, bytes],
    metrics: WorkerMetrics,
    is_ready: Callable[[], bool],
    reconciler: Reconciler | None = None,
) -> None:
    """Add the query API, the reconcile endpoint, ``/metrics``, ``/healthz`` and ``/readyz`` to ``app``'s web
    server (``reconciler`` None: reconciliation is off and the endpoint says so)."""
    query = Query(app, settings, table)
    measured = _measured_view(metrics)

    def page(path: str, name: str, **handlers: Callable[..., Awaitable[Response]]) -> None:
        app.page(path, name=name)(type(name, (measured,), handlers))

    async def presence(view: View, request: Request, userid: str) -> Response:
        return query.unauthorized(view, request) or await query.one(view, request, userid)

    async def presence_batch(view: View, request: Request) -> Response:
        return query.unauthorized(view, request) or await query.batch(view, request)

    async def presence_reconcile(view: View, request: Request) -> Response:
        return query.unauthorized(view, request) or await query.reconcile(view, request, reconciler)

    async def metrics_page(view: View, request: Request) -> Response:
        # aiohttp refuses a charset inside content_type; the exposition format is UTF-8 by definition.
        content_type = CONTENT_TYPE_LATEST.split(";")[0] + "; version=0.0.4"
        return view.bytes(generate_latest(metrics.registry), content_type=content_type)

    async def healthz(view: View, request: Request) -> Response:
        return view.json({"status": "alive"})

    async def readyz(view: View, request: Request) -> Response:
        if is_ready():
            return view.json({"status": "ready"})
        return view.json({"status": "recovering or rebalancing"}, status=503)

    page("/presence/{userid}", "PresenceView", get=presence)
    page("/presence:batch", "PresenceBatchView", post=presence_batch)
    page("/presence:reconcile", "PresenceReconcileView", post=presence_reconcile)
    page("/metrics", "MetricsView", get=metrics_page)
    page("/healthz", "HealthView", get=healthz)
    page("/readyz", "ReadyView", get=readyz)
