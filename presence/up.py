"""``presence up``: the whole product on one machine — broker, gateway, worker — with a live demo on top.

Order of a run: a broker (reused if one answers, else started), the product's topics, the worker and the gateway
as child processes (logs in ``<run-dir>/logs``), a simulation through the gateway, and the live view.

Reconciliation runs against an emulated RongCloud server API (:mod:`presence.emulator`, served by this process
from the demo traffic's ground truth), never against RongCloud's real hosts: the demo's credentials are not an
app's, and a local run must not spend a real app's API budget. The demo loses a share of its callbacks on purpose
(``--lose-callbacks``) and checks silent users after a minute, so the live view shows ghosts being corrected. Stopping
(Ctrl-C, SIGTERM, or any error) goes the other way: gateway (it drains its spool), worker, then the broker if this
run started it. Children run in their own process groups and get SIGTERM if this process dies, even by SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from rich.console import Console

from core.contract import WEBHOOK_PATH
from core.settings import CommonSettings
from presence import localkafka, simulate, trace
from presence.children import Child, ChildFailed, presence_command, wait_http_ready
from presence.emulator import ApiEmulator, GroundTruth
from presence.live import Demo, Endpoints, where_next

DEMO_APP_KEY = "presence-demo"


class UpError(RuntimeError):
    """Something stops ``presence up`` from starting; the message says what to do."""


@dataclass
class UpOptions:
    port: int
    data_dir: Path
    kafka: str | None
    run_dir: Path
    gateway_port: int
    worker_port: int
    demo_seconds: float
    rate: float
    users: int
    seed: int
    live: bool
    exit_after_demo: bool
    lose_callbacks: float = 0.0


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops ``presence up`` the way Ctrl-C does, so the same cleanup runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    # Started in the background by a non-interactive shell, SIGINT arrives ignored; Ctrl-C must still stop us.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _broker(opts: UpOptions, say: Callable[[str], None]) -> tuple[str, localkafka.LocalKafka | None]:
    if opts.kafka:
        if not localkafka._client_answers(opts.kafka):
            raise UpError(f"no Kafka broker answers at {opts.kafka} (--kafka); check the address")
        say(f"using the Kafka broker at {opts.kafka}")
        return opts.kafka, None
    state, recorded = localkafka.status(opts.data_dir)
    if state == "running" and recorded is not None:
        bootstrap = f"127.0.0.1:{recorded['port']}"
        say(f"using the local broker already running on {bootstrap} (stop it with `presence kafka stop`)")
        return bootstrap, None
    bootstrap = f"127.0.0.1:{opts.port}"
    if localkafka.port_in_use(opts.port):
        if localkafka._client_answers(bootstrap):
            say(f"using the Kafka broker already answering on {bootstrap}")
            return bootstrap, None
        raise UpError(
            f"port {opts.port} is in use by something that is not Kafka; choose another with --port"
        )
    broker = localkafka.LocalKafka(data_dir=opts.data_dir, port=opts.port)
    try:
        broker.start(detach=True, progress=say)
    except localkafka.BrokerError as exc:
        raise UpError(str(exc)) from exc
    return bootstrap, broker


# Demo thresholds (the product's defaults are hours): a user online and silent for a minute is checked, and
# again every minute while they stay so. The environment may set others.
DEMO_RECONCILE = {
    "PRESENCE_RECONCILE_MAX_SILENCE_SECONDS": "60",
    "PRESENCE_RECONCILE_RECHECK_INTERVAL_SECONDS": "60",
}


def _child_env(opts: UpOptions, bootstrap: str, app_key: str, secret: str, api_url: str) -> dict[str, str]:
    env = dict(os.environ)
    for name, value in DEMO_RECONCILE.items():
        env.setdefault(name, value)
    env.update(
        {
            "PRESENCE_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "PRESENCE_APP_KEY": app_key,
            "PRESENCE_APP_SECRET": secret,
            "PRESENCE_GATEWAY_HOST": "127.0.0.1",
            "PRESENCE_GATEWAY_PORT": str(opts.gateway_port),
            "PRESENCE_GATEWAY_SPOOL_DIR": str((opts.run_dir / "spool").resolve()),
            "PRESENCE_WORKER_WEB_BIND": "127.0.0.1",
            "PRESENCE_WORKER_WEB_PORT": str(opts.worker_port),
            "PRESENCE_WORKER_CANONICAL_URL": f"http://127.0.0.1:{opts.worker_port}",
            "PRESENCE_WORKER_DATA_DIR": str((opts.run_dir / "worker").resolve()),
            # Always the emulator, whatever the environment says: never RongCloud's real hosts from here.
            "PRESENCE_RECONCILE_ENABLED": "true",
            "PRESENCE_RECONCILE_API_URLS": api_url,
        }
    )
    env.setdefault("PRESENCE_LOG_FORMAT", "json")
    return env


def run(opts: UpOptions, console: Console) -> int:
    """Run until Ctrl-C/SIGTERM (or, with ``exit_after_demo``, until the demo traffic is processed)."""

    def say(message: str) -> None:
        console.print(message, highlight=False, soft_wrap=True)

    for name, port in (("--gateway-port", opts.gateway_port), ("--worker-port", opts.worker_port)):
        if localkafka.port_in_use(port):
            raise UpError(
                f"port {port} on 127.0.0.1 is in use (is `presence up` already running?); choose another with {name}"
            )
    children: list[Child] = []
    broker: localkafka.LocalKafka | None = None
    logs = opts.run_dir / "logs"
    with _sigterm_as_interrupt():
        try:
            bootstrap, broker = _broker(opts, say)
            app_key = os.environ.get("PRESENCE_APP_KEY") or DEMO_APP_KEY
            secret = os.environ.get("PRESENCE_APP_SECRET") or f"demo-{secrets.token_hex(8)}"
            api_port = localkafka.free_port()
            api_url = f"http://127.0.0.1:{api_port}"
            env = _child_env(opts, bootstrap, app_key, secret, api_url)
            settings = CommonSettings(kafka_bootstrap_servers=bootstrap)
            from core.topics import TopicError, ensure_topics

            try:
                created = asyncio.run(ensure_topics(settings))
            except TopicError as exc:
                raise UpError(str(exc)) from exc
            say(f"topics ready{' (created ' + ', '.join(created) + ')' if created else ''}")
            worker = Child("worker", presence_command("worker"), env, logs / "worker.log")
            gateway = Child("gateway", presence_command("gateway"), env, logs / "gateway.log")
            for child in (worker, gateway):
                child.start()
                children.append(child)
            say(f"starting the worker and the gateway (logs: {logs}/worker.log, {logs}/gateway.log)")
            gateway_url = f"http://127.0.0.1:{opts.gateway_port}"
            worker_url = f"http://127.0.0.1:{opts.worker_port}"
            wait_http_ready(gateway, f"{gateway_url}/readyz", timeout=60)
            wait_http_ready(worker, f"{worker_url}/readyz", timeout=120)
            path = env.get("PRESENCE_GATEWAY_PATH", WEBHOOK_PATH)
            endpoints = Endpoints(gateway_url, f"{gateway_url}{path}", worker_url)
            say(
                f"gateway {gateway_url} (webhook POST {path}) · worker {worker_url} · broker {bootstrap}\n"
                f"credentials for this run: PRESENCE_APP_KEY={app_key} PRESENCE_APP_SECRET={secret}\n"
                f"reconciliation asks the emulated RongCloud API at {api_url} (try `presence reconcile "
                f"--api-url {api_url} <userid>`)\n" + where_next(endpoints, bootstrap, logs)
            )
            spec = None
            if opts.demo_seconds > 0:
                spec = trace.TraceSpec(
                    seed=opts.seed, users=opts.users, rate=opts.rate,
                    events=max(1, int(opts.rate * opts.demo_seconds)),
                )  # fmt: skip
                say(
                    f"demo: {spec.events} simulated RongCloud events from {spec.users} users at {spec.rate:.0f}/s "
                    f"(seed {spec.seed}); try `presence simulate --url {endpoints.webhook} --app-key {app_key} "
                    f"--secret {secret}` for more"
                )
            api = ApiEmulator(GroundTruth(), app_key=app_key, secret=secret)
            demo = Demo(
                settings=settings, endpoints=endpoints,
                target=simulate.Target(endpoints.webhook, app_key, secret), spec=spec, children=children,
                console=console, live=opts.live, exit_after_demo=opts.exit_after_demo, logs=logs,
                api=api, api_port=api_port, lose_callbacks=opts.lose_callbacks,
            )  # fmt: skip
            return asyncio.run(demo.run())
        except KeyboardInterrupt:
            say("stopping…")
            return 0
        except ChildFailed as exc:
            raise UpError(str(exc)) from exc
        except RuntimeError as exc:
            if isinstance(exc, UpError):
                raise
            raise UpError(str(exc)) from exc
        finally:
            # Ctrl-C again while stopping must not leave children behind.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            for child in reversed(children):
                child.stop(grace=30)
            if broker is not None:
                broker.stop()
            if children or broker is not None:
                say(
                    "stopped the gateway and the worker"
                    + (" and the broker" if broker is not None else "")
                    + f"; logs stay in {logs}"
                )
            signal.signal(signal.SIGINT, signal.default_int_handler)
