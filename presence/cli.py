"""The ``presence`` command line: run the services, manage a local broker, inspect the pipeline."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import TypeVar

import click

from presence import localkafka

DEFAULT_DATA_DIR = Path(".run/kafka")
T = TypeVar("T")


def _fail(message: str) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    raise SystemExit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """Trustworthy user-level presence from RongCloud online-status webhooks.

    Settings come from PRESENCE_* environment variables (see the README's settings table).
    """


# --- local broker -------------------------------------------------------------------------------------------


@main.group()
def kafka() -> None:
    """Run a real single-node Apache Kafka broker on this machine (no Docker needed).

    The broker's jars are fetched from Maven Central once (needs Java 17+ and Maven) and cached.
    """


_data_dir_option = click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=DEFAULT_DATA_DIR,
    show_default=True,
    help="Where the broker keeps its data, logs and pid file.",
)


@kafka.command("start")
@click.option("--port", type=int, default=9092, show_default=True, help="Client port on 127.0.0.1.")
@click.option("--controller-port", type=int, default=0, help="KRaft controller port [default: port + 1].")
@_data_dir_option
@click.option("--foreground", is_flag=True, help="Stay attached; Ctrl-C stops the broker.")
@click.option("--heap", default="1g", show_default=True, help="Java heap size (-Xmx).")
def kafka_start(port: int, controller_port: int, data_dir: Path, foreground: bool, heap: str) -> None:
    """Start the broker and wait until a Kafka client gets an answer."""
    state, recorded = localkafka.status(data_dir)
    if state in ("running", "starting") and recorded is not None:
        click.echo(f"Apache Kafka {recorded['version']} is already running on 127.0.0.1:{recorded['port']}")
        return
    broker = localkafka.LocalKafka(data_dir=data_dir, port=port, controller_port=controller_port, heap=heap)
    started = time.monotonic()
    try:
        broker.start(detach=not foreground, progress=lambda m: click.echo(m, err=True))
    except localkafka.BrokerError as exc:
        _fail(str(exc))
    click.echo(
        f"Apache Kafka {localkafka.kafka_version()} listening on {broker.bootstrap} "
        f"(ready in {time.monotonic() - started:.1f} s; data and logs in {broker.data_dir})"
    )
    if not foreground:
        click.echo(
            f"export PRESENCE_KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap}   # stop: presence kafka stop"
        )
        return
    try:
        assert broker.process is not None  # noqa: S101
        broker.process.wait()
    except KeyboardInterrupt:
        click.echo("stopping the broker…", err=True)
    finally:
        broker.stop()


@kafka.command("stop")
@_data_dir_option
def kafka_stop(data_dir: Path) -> None:
    """Stop the broker started with `presence kafka start` (SIGTERM, SIGKILL after 30 s)."""
    if localkafka.stop_recorded(data_dir):
        click.echo("broker stopped")
    else:
        click.echo(f"no broker is running from {data_dir}")


@kafka.command("status")
@_data_dir_option
def kafka_status(data_dir: Path) -> None:
    """Say whether the local broker runs, where it listens and which Kafka version it is."""
    state, recorded = localkafka.status(data_dir)
    if recorded is None:
        click.echo(f"stopped (nothing recorded in {data_dir})")
        raise SystemExit(3)
    click.echo(
        f"{state}: Apache Kafka {recorded['version']} on 127.0.0.1:{recorded['port']} pid {recorded['pid']}"
    )
    if state != "running":
        raise SystemExit(3)


# --- the whole product, locally --------------------------------------------------------------------------


@main.command("up")
@click.option("--port", type=int, default=9092, show_default=True, help="Kafka client port on 127.0.0.1.")
@_data_dir_option
def up(port: int, data_dir: Path) -> None:
    """Run everything locally: a Kafka broker and the product's topics. Ctrl-C stops it all."""
    import os

    state, recorded = localkafka.status(data_dir)
    broker: localkafka.LocalKafka | None = None
    if state == "running" and recorded is not None:
        bootstrap = f"127.0.0.1:{recorded['port']}"
        click.echo(f"using the broker already running on {bootstrap}")
    else:
        broker = localkafka.LocalKafka(data_dir=data_dir, port=port)
        try:
            broker.start(progress=lambda m: click.echo(m, err=True))
        except localkafka.BrokerError as exc:
            _fail(str(exc))
        bootstrap = broker.bootstrap
    os.environ["PRESENCE_KAFKA_BOOTSTRAP_SERVERS"] = bootstrap
    try:
        from presence.settings import CommonSettings
        from presence.topics import TopicError, ensure_topics

        settings = _load(CommonSettings)
        try:
            asyncio.run(ensure_topics(settings))
        except TopicError as exc:
            _fail(str(exc))
        click.echo(f"Apache Kafka {localkafka.kafka_version()} on {bootstrap}; topics ready. Ctrl-C stops.")
        while broker is None or (broker.process is not None and broker.process.poll() is None):
            time.sleep(0.5)
        _fail(f"the broker exited; see {data_dir / 'server.log'}")
    except KeyboardInterrupt:
        click.echo("stopping…", err=True)
    finally:
        if broker is not None:
            broker.stop()


# --- services -----------------------------------------------------------------------------------------------


@main.command("gateway")
def gateway() -> None:
    """Run the webhook gateway (FastAPI on uvicorn): verify RongCloud callbacks, publish events to Kafka."""
    from gateway.config import GatewaySettings
    from gateway.main import run

    run(_load(GatewaySettings))


@main.command("worker")
def worker() -> None:
    """Run a streams worker (Faust): per-session table, transitions, state, presence queries."""
    from streams.config import WorkerSettings
    from streams.main import run

    run(_load(WorkerSettings))


# --- topics -------------------------------------------------------------------------------------------------


@main.command("create-topics")
def create_topics() -> None:
    """Create the product's topics with their configs (the gateway and workers also do this at start)."""
    from presence.settings import CommonSettings
    from presence.topics import TopicError, ensure_topics

    settings = _load(CommonSettings)
    try:
        created = asyncio.run(ensure_topics(settings))
    except TopicError as exc:
        _fail(str(exc))
    click.echo(f"created: {', '.join(created)}" if created else "all topics already exist")


def _load(factory: type[T]) -> T:
    """Build a Settings class, turning a validation error into a message naming the bad variable."""
    from pydantic import ValidationError

    try:
        return factory()
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            location = "_".join(str(part) for part in error["loc"]).upper()
            name = f"PRESENCE_{location}" if location else "settings"
            lines.append(f"  {name}: {error['msg']}")
        _fail("invalid settings:\n" + "\n".join(lines))
        raise  # unreachable: _fail exits


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
