"""The ``presence`` command line: run the services, manage a local broker, inspect the pipeline."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TypeVar

import click

from core.contract import WEBHOOK_PATH, changelog_topic
from presence import localkafka

DEFAULT_DATA_DIR = Path(".run/kafka")
T = TypeVar("T")


def _fail(message: str) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    raise SystemExit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """Trustworthy user-level presence from RongCloud online-status webhooks.

    \b
    New here? `presence up` runs everything locally with simulated traffic.
    Debugging?  `presence topics`, `presence tail`, `presence query USERID`,
                `presence check-signature`.

    Settings come from PRESENCE_* environment variables (see the README's settings table).
    """


# --- local broker -------------------------------------------------------------------------------------------


@main.group(short_help="Start, stop or check a local Kafka broker.")
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


@main.command("up", short_help="Run broker, worker, gateway and a live demo locally.")
@click.option(
    "--port", type=int, default=9092, show_default=True, help="Kafka client port of the local broker."
)
@_data_dir_option
@click.option(
    "--kafka",
    "kafka_bootstrap",
    metavar="HOST:PORT",
    help="Use this Kafka broker instead of a local one (nothing is started or stopped for it).",
)
@click.option("--run-dir", type=click.Path(path_type=Path, file_okay=False), default=Path(".run"),
              show_default=True, help="Where logs (logs/*.log), the worker's table and the gateway's spool go.")  # fmt: skip
@click.option("--gateway-port", type=int, default=8080, show_default=True, help="Gateway HTTP port.")
@click.option(
    "--worker-port", type=int, default=6066, show_default=True, help="Worker query API / metrics port."
)
@click.option("--demo-seconds", type=click.FloatRange(min=0), default=30, show_default=True,
              help="Length of the simulated traffic; 0 runs the services without a demo.")  # fmt: skip
@click.option("--rate", type=click.FloatRange(min=1), default=200, show_default=True,
              help="Simulated upstream events per second.")  # fmt: skip
@click.option("--users", type=click.IntRange(min=1), default=500, show_default=True, help="Simulated users.")
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of the simulated traffic.")
@click.option("--live/--no-live", default=None,
              help="Full-screen live view, or one status line every few seconds [default: live on a terminal].")  # fmt: skip
@click.option("--exit-after-demo", is_flag=True,
              help="Stop everything and exit once the demo traffic is processed: exit 0 if transitions flowed.")  # fmt: skip
@click.option("--lose-callbacks", type=click.FloatRange(min=0, max=1), default=0.02, show_default=True,
              help="Share of the demo's callbacks lost on purpose, for reconciliation to correct.")  # fmt: skip
def up(
    port: int, data_dir: Path, kafka_bootstrap: str | None, run_dir: Path, gateway_port: int, worker_port: int,
    demo_seconds: float, rate: float, users: int, seed: int, live: bool | None, exit_after_demo: bool,
    lose_callbacks: float,
) -> None:  # fmt: skip
    """Run the whole pipeline locally and watch presence change live.

    Starts (or reuses) a local Kafka broker, creates the topics, starts a worker and a gateway (logs in
    RUN_DIR/logs), sends simulated RongCloud traffic through the gateway and shows online users,
    transitions/s, lag and latency as they happen, with the URLs to look at next. The demo's app key and
    secret are printed (set PRESENCE_APP_KEY / PRESENCE_APP_SECRET to choose them).

    Reconciliation asks an emulated RongCloud server API served by this command (never RongCloud's real
    hosts), from the demo traffic's ground truth; the demo loses some callbacks on purpose and checks users
    online and silent for a minute, so the view shows ghosts being corrected.

    Ctrl-C (or SIGTERM) stops the gateway, the worker and the broker it started, in that order.
    """
    from rich.console import Console

    from presence.up import UpError, UpOptions, run

    console = Console(highlight=False)
    options = UpOptions(
        port=port, data_dir=data_dir, kafka=kafka_bootstrap, run_dir=run_dir, gateway_port=gateway_port,
        worker_port=worker_port, demo_seconds=demo_seconds, rate=rate, users=users, seed=seed,
        live=console.is_terminal if live is None else live, exit_after_demo=exit_after_demo,
        lose_callbacks=lose_callbacks,
    )  # fmt: skip
    try:
        code = run(options, console)
    except UpError as exc:
        _fail(str(exc))
    raise SystemExit(code)


# --- traffic ------------------------------------------------------------------------------------------------


def _default_webhook_url() -> str:
    port = os.environ.get("PRESENCE_GATEWAY_PORT", "8080")
    path = os.environ.get("PRESENCE_GATEWAY_PATH", WEBHOOK_PATH)
    return f"http://127.0.0.1:{port}{path}"


@main.command("simulate", short_help="Send realistic signed webhook traffic to a gateway.")
@click.option("--url", default=_default_webhook_url, show_default="http://127.0.0.1:$PRESENCE_GATEWAY_PORT"
              "$PRESENCE_GATEWAY_PATH", help="The gateway's webhook URL.")  # fmt: skip
@click.option("--app-key", envvar="PRESENCE_APP_KEY", default="presence-demo", show_default=True,
              show_envvar=True, help="App key sent as appKey.")  # fmt: skip
@click.option("--secret", envvar="PRESENCE_APP_SECRET", show_envvar=True,
              help="App secret the requests are signed with (required).")  # fmt: skip
@click.option("--seed", type=int, default=1, show_default=True, help="Same seed, same traffic.")
@click.option("--users", type=click.IntRange(min=1), default=1000, show_default=True, help="Simulated users.")
@click.option("--user-prefix", default="sim-", show_default=True,
              help="User ids are this prefix and a number; another prefix is another population.")  # fmt: skip
@click.option("--rate", type=click.FloatRange(min=0), default=500, show_default=True,
              help="Upstream events per second (their spacing in time); see --flat-out.")  # fmt: skip
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), help="Seconds of traffic at --rate.")
@click.option("--count", type=click.IntRange(min=1), help="Number of events (instead of --duration).")
@click.option("--batch-max", type=click.IntRange(min=1, max=5000), default=50, show_default=True,
              help="Most events per request (upstream batches events of many users).")  # fmt: skip
@click.option("--concurrency", type=click.IntRange(min=1, max=1024), default=64, show_default=True,
              help="Requests in flight at most.")  # fmt: skip
@click.option("--flat-out", is_flag=True, help="Send as fast as the gateway answers, ignoring the schedule.")
@click.option("--trace-out", type=click.Path(path_type=Path, dir_okay=False),
              help="Also write the generated traffic to this file (JSON lines) for --replay.")  # fmt: skip
@click.option("--replay", "replay_file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Send the traffic of a file written with --trace-out instead of generating it.")  # fmt: skip
@click.option("--no-send", is_flag=True, help="Only generate (with --trace-out): send nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar with live rate, latency and errors [default: on a terminal].")  # fmt: skip
def simulate_command(
    url: str, app_key: str, secret: str | None, seed: int, users: int, user_prefix: str, rate: float, duration: float | None,
    count: int | None, batch_max: int, concurrency: int, flat_out: bool, trace_out: Path | None,
    replay_file: Path | None, no_send: bool, as_json: bool, progress: bool | None,
) -> None:  # fmt: skip
    """Send realistic, signed RongCloud online-status traffic to a gateway.

    Users with several devices (iOS, Android, PC, Websocket, MiniProgram) log in, reconnect with new
    sessionIds, get kicked by another device, log out, and go offline with the offline reported up to 5
    minutes late; some requests are retried (same URL, same body), some batches overtake earlier ones, and
    events come in JSON arrays like upstream's. The traffic depends only on --seed and the sizes, so a run can
    be repeated, written to a file (--trace-out) and sent again later (--replay); event times and signatures
    are made when sending.

    \b
    Examples:
      presence simulate --secret S --duration 30 --rate 1000
      presence simulate --secret S --count 50000 --flat-out --json
      presence simulate --seed 7 --count 2000 --trace-out day.jsonl --no-send
      presence simulate --secret S --replay day.jsonl

    Exit status: 0 when the gateway answered 200 to every request, 1 otherwise (the summary says why).
    """
    from presence import simulate, trace

    if replay_file is not None and (duration is not None or count is not None or trace_out is not None):
        raise click.UsageError("--replay sends a file as it is: drop --duration, --count and --trace-out")
    if duration is not None and count is not None:
        raise click.UsageError("give --duration or --count, not both")
    if no_send and trace_out is None:
        raise click.UsageError("--no-send only makes sense with --trace-out FILE")
    if not no_send and not secret:
        raise click.UsageError(
            "no app secret: pass --secret or set PRESENCE_APP_SECRET (the gateway's secret; `presence up` prints it)"
        )
    if replay_file is not None:
        try:
            generated = trace.read(replay_file)
        except trace.TraceError as exc:
            _fail(str(exc))
    else:
        events = count if count is not None else int((duration or 10.0) * (rate or 1000.0))
        spec = trace.TraceSpec(
            seed=seed, users=users, events=events, rate=rate, batch_max=batch_max, user_prefix=user_prefix
        )
        generated = trace.generate(spec)
        if trace_out is not None:
            trace.write(generated, trace_out)
            click.echo(
                f"wrote {len(generated.deliveries)} requests ({generated.event_count} events, "
                f"{generated.duration_ms / 1000:.1f} s of traffic) to {trace_out}",
                err=not no_send and as_json,
            )
    if no_send:
        return
    assert secret is not None  # noqa: S101 - checked above
    target = simulate.Target(url, app_key, secret)
    show = sys.stderr.isatty() if progress is None else progress
    stats = simulate.SendStats()
    try:
        asyncio.run(_send_with_progress(generated, target, stats, concurrency, flat_out or rate == 0, show))
    except simulate.GatewayUnreachable as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
    summary = {**stats.summary(), "scenarios": dict(sorted(generated.scenarios.items())),
               "seed": generated.spec.seed, "url": url}  # fmt: skip
    if as_json:
        click.echo(json.dumps(summary))
    else:
        _print_summary(summary, stats)
    raise SystemExit(0 if stats.requests and stats.failed == 0 and stats.requests == stats.deliveries else 1)


async def _send_with_progress(
    generated: Any, target: Any, stats: Any, concurrency: int, flat_out: bool, show: bool
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from presence import simulate

    total = len(generated.deliveries)
    if not show:
        await simulate.send(generated, target, concurrency=concurrency, flat_out=flat_out, stats=stats)
        return
    columns = (
        TextColumn("[bold]sending"), BarColumn(), MofNCompleteColumn(), TextColumn("requests"),
        TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
    )  # fmt: skip
    with Progress(*columns, console=_stderr_console(), refresh_per_second=5) as bar:
        task = bar.add_task("send", total=total, info="")

        def update(s: simulate.SendStats) -> None:
            errors = f"[red]{s.failed} failed[/]" if s.failed else "0 failed"
            bar.update(
                task, completed=s.requests,
                info=f"{s.events_per_second():.0f} events/s  p99 {s.percentile(0.99, last=500):.0f} ms  "
                f"[green]{s.accepted} accepted[/]  {s.rejected} rejected  {errors}",
            )  # fmt: skip

        await simulate.send(
            generated, target, concurrency=concurrency, flat_out=flat_out, stats=stats, on_answer=update
        )
        update(stats)


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _print_summary(summary: dict[str, Any], stats: Any) -> None:
    from presence.simulate import STATUS_HINTS

    latency = summary["latency_ms"]
    click.echo(
        f"sent {summary['events_sent']} events in {summary['requests']} requests in {summary['seconds']} s "
        f"({summary['events_per_second']} events/s, {summary['requests_per_second']} requests/s)\n"
        f"gateway: {summary['accepted']} events accepted, {summary['rejected']} rejected (dead-lettered); "
        f"{summary['ok']} requests answered 200, {summary['failed']} failed\n"
        f"latency: p50 {latency['p50']} ms, p99 {latency['p99']} ms, max {latency['max']} ms\n"
        f"traffic: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in summary["scenarios"].items())
    )
    for status, number in sorted(stats.statuses.items()):
        if status != 200:
            hint = STATUS_HINTS.get(status, "see the gateway's log")
            click.secho(f"HTTP {status} × {number}: {hint}", fg="red")
    for kind, number in stats.transport_errors.items():
        click.secho(f"{kind} × {number}: the connection to the gateway failed", fg="red")


# --- debugging upstream -------------------------------------------------------------------------------------


@main.command("check-signature", short_help="Compute or verify a callback signature.")
@click.option("--secret", envvar="PRESENCE_APP_SECRET", show_envvar=True, help="The app secret (required).")
@click.option("--nonce", help="The nonce parameter, exactly as sent.")
@click.option("--timestamp", help="The timestamp parameter, exactly as sent (ms, or 10-digit seconds).")
@click.option("--signature", help="A signature to verify instead of just computing one.")
@click.option("--url", "callback_url", metavar="URL",
              help="A whole callback URL (or just its query string): nonce, timestamp and signature are taken "
              "from it, under their current or older names.")  # fmt: skip
@click.option("--window", type=click.FloatRange(min=0), default=600, show_default=True,
              help="Report whether the timestamp is within this many seconds of now, as the gateway checks.")  # fmt: skip
def check_signature(
    secret: str | None, nonce: str | None, timestamp: str | None, signature: str | None,
    callback_url: str | None, window: float,
) -> None:  # fmt: skip
    """Compute or verify a RongCloud callback signature: hex SHA1(secret + nonce + timestamp).

    \b
    Compute:  presence check-signature --secret S --nonce 14314 --timestamp 1408710653000
    Verify:   presence check-signature --secret S --nonce N --timestamp T --signature HEX
    From a captured callback URL (e.g. from upstream's request log):
              presence check-signature --secret S --url 'https://host/path?appKey=..&nonce=..&...'

    Exit status: 0 when the signature is computed or matches, 1 when it does not match.
    """
    import time as _time
    from urllib.parse import parse_qsl, urlsplit

    from core.contract import compute_signature, parse_timestamp_ms

    if not secret:
        raise click.UsageError("no secret: pass --secret or set PRESENCE_APP_SECRET")
    app_key = None
    if callback_url is not None:
        query_text = urlsplit(callback_url).query if "?" in callback_url else callback_url.lstrip("?")
        query = dict(parse_qsl(query_text, keep_blank_values=True))
        nonce = nonce or query.get("nonce") or query.get("rc-nonce")
        timestamp = timestamp or next((query[n] for n in ("timestamp", "signTimestamp", "rc-timestamp") if query.get(n)), None)  # fmt: skip
        signature = signature or query.get("signature") or query.get("rc-signature")
        app_key = query.get("appKey")
    if not nonce or not timestamp:
        raise click.UsageError("need --nonce and --timestamp (or --url with both in its query string)")
    expected = compute_signature(secret, nonce, timestamp)
    if app_key is not None:
        click.echo(f"appKey     {app_key}")
    click.echo(f"nonce      {nonce}\ntimestamp  {timestamp}")
    try:
        age = _time.time() - parse_timestamp_ms(timestamp) / 1000
        verdict = "inside" if abs(age) <= window else "OUTSIDE"
        click.echo(f"           {age:+.0f} s from now: {verdict} the ±{window:.0f} s window")
    except ValueError:
        click.secho(
            "           not a timestamp the gateway accepts (1-16 digits, ms or seconds)", fg="yellow"
        )
    click.echo(f"expected   {expected}")
    if signature is None:
        return
    given = signature.strip()
    click.echo(f"given      {given}")
    if given.lower() == expected:
        click.secho("signature matches", fg="green")
        return
    hints = [
        "the secret differs (it is the app secret, not the app key; is it the previous one after a rotation?)"
    ]
    if given != signature:
        hints.append("the given signature had surrounding whitespace")
    if compute_signature(secret.strip(), nonce, timestamp) == given.lower():
        hints = ["the secret has surrounding whitespace (a trailing newline in a secret file?)"]
    elif (
        timestamp.isdigit()
        and len(timestamp) == 13
        and compute_signature(secret, nonce, timestamp[:10]) == given.lower()
    ):
        hints = [
            "it was signed with the timestamp in seconds; the signature must use the value exactly as sent"
        ]
    click.secho("signature does NOT match; likely: " + "; ".join(hints), fg="red")
    raise SystemExit(1)


# --- services -----------------------------------------------------------------------------------------------


@main.command("gateway", short_help="Run the webhook gateway (verify, publish to Kafka).")
def gateway() -> None:
    """Run the webhook gateway (FastAPI on uvicorn): verify RongCloud callbacks, publish events to Kafka."""
    from gateway.config import GatewaySettings
    from gateway.main import run

    run(_load(GatewaySettings))


@main.command("worker", short_help="Run a streams worker (table, transitions, queries).")
def worker() -> None:
    """Run a streams worker (Faust): per-session table, transitions, state, presence queries."""
    from streams.config import WorkerSettings
    from streams.main import run

    run(_load(WorkerSettings))


# --- topics -------------------------------------------------------------------------------------------------


@main.command("create-topics", short_help="Create the product's topics with their configs.")
@click.option(
    "--worker", "with_worker", is_flag=True,
    help="Also the worker's own topics (<app id>-ticks, -users-changelog, -__assignor-__leader), named by "
    "PRESENCE_WORKER_APP_ID: for workers that may not create topics (PRESENCE_TOPIC_CREATE=false).",
)  # fmt: skip
def create_topics(with_worker: bool) -> None:
    """Create the product's topics with their configs (the gateway and workers also do this at start, unless
    PRESENCE_TOPIC_CREATE=false; this command creates them either way)."""
    from core.settings import CommonSettings
    from core.topics import TopicError, TopicSpec, ensure_topics

    extra: list[TopicSpec] = []
    if with_worker:
        from streams.config import WorkerSettings
        from streams.main import worker_topics

        worker_settings = _load(WorkerSettings)
        extra = worker_topics(worker_settings)
        settings: CommonSettings = worker_settings
    else:
        settings = _load(CommonSettings)
    try:
        created = asyncio.run(ensure_topics(settings.model_copy(update={"topic_create": True}), extra))
    except TopicError as exc:
        _fail(str(exc))
    click.echo(f"created: {', '.join(created)}" if created else "all topics already exist")


# --- looking into a running pipeline -----------------------------------------------------------------------

_bootstrap_option = click.option(
    "-b", "--bootstrap", metavar="HOST:PORT[,…]",
    help="Kafka bootstrap servers [default: PRESENCE_KAFKA_BOOTSTRAP_SERVERS, else 127.0.0.1:9092].",
)  # fmt: skip


def _common(bootstrap: str | None) -> Any:
    import logging

    from core.settings import CommonSettings

    # The Kafka client logs every failed connection attempt; the command says what went wrong in one line.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)

    if bootstrap:
        os.environ["PRESENCE_KAFKA_BOOTSTRAP_SERVERS"] = bootstrap
    return _load(CommonSettings)


def _worker_url() -> str:
    return f"http://127.0.0.1:{os.environ.get('PRESENCE_WORKER_WEB_PORT', '6066')}"


@main.command("query", short_help="Show users' current presence (query API).")
@click.argument("userids", nargs=-1, required=True)
@click.option("--url", default=_worker_url, show_default="http://127.0.0.1:$PRESENCE_WORKER_WEB_PORT",
              help="Any worker's query API; it routes to the worker that owns each user.")  # fmt: skip
@click.option("--token", envvar="PRESENCE_WORKER_QUERY_TOKEN", show_envvar=True,
              help="Bearer token, if the workers require one.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print {userid: record or null} as JSON.")
def query(userids: tuple[str, ...], url: str, token: str | None, as_json: bool) -> None:
    """Show the current presence of one or more users (USERIDS) from the workers' query API.

    For each user: status (online, offline, logged_out), the online sessions with their platform and since
    when, last seen, and (epoch, seq) of the last transition, exactly as on the STATE topic.

    Exit status: 0 when every user has a record, 3 when some have none (never seen, or deleted after the idle
    retention), 1 when the workers cannot be asked.
    """
    from presence.observe import InspectError, clock
    from presence.observe import query as ask

    try:
        records = asyncio.run(ask(url.rstrip("/"), list(userids), token))
    except InspectError as exc:
        _fail(str(exc))
    if as_json:
        click.echo(json.dumps(records, ensure_ascii=False))
    else:
        for userid, record in records.items():
            if record is None:
                click.echo(f"{userid}  unknown (no record: never seen, or deleted after the idle retention)")
                continue
            colour = {"online": "green", "offline": "yellow", "logged_out": "red"}.get(record["status"])
            sessions = ", ".join(
                f"{s.get('os') or '?'} {s['sessionId']} since {clock(s['since'])}" for s in record["sessions"]
            )
            click.echo(
                f"{userid}  "
                + click.style(record["status"], fg=colour, bold=True)
                + f"  last seen {clock(record['last_seen'])}  seq {record['epoch']}/{record['seq']}"
                + (f"\n    online: {sessions}" if sessions else "")
            )
    raise SystemExit(3 if any(r is None for r in records.values()) else 0)


@main.command("reconcile", short_help="Ask RongCloud whether users are online now (checkOnline).")
@click.argument("userids", nargs=-1, required=True)
@click.option("--api-url", "api_urls", multiple=True, metavar="URL",
              help="Server-API base URL; repeat it for fail-over "
              "[default: PRESENCE_RECONCILE_API_URLS, else https://api.rong-api.com, https://api-b.rong-api.com].")  # fmt: skip
@click.option(
    "--app-key", envvar="PRESENCE_APP_KEY", show_envvar=True, help="The RongCloud app key (required)."
)
@click.option("--secret", envvar="PRESENCE_APP_SECRET", show_envvar=True,
              help="The app secret the requests are signed with (required).")  # fmt: skip
@click.option("--publish", is_flag=True,
              help="Also publish each answer to RAW as an observation (R1, source on_demand) for the workers "
              "to apply; needs workers that know observations.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per user.")
@_bootstrap_option
def reconcile(
    userids: tuple[str, ...], api_urls: tuple[str, ...], app_key: str | None, secret: str | None, publish: bool,
    as_json: bool, bootstrap: str | None,
) -> None:  # fmt: skip
    """Ask RongCloud's server API (/user/checkOnline.json) whether each user (USERIDS) is online right now.

    Requests are signed with the app secret, go to the first base URL and move to the next one when it fails,
    are retried with back-off on network and server errors, and stay within PRESENCE_RECONCILE_BUDGET_PER_SECOND.
    Compare the answers with `presence query USERID`: a user shown online whom RongCloud calls offline is a
    ghost (a lost callback).

    \b
    Examples:
      presence reconcile alice bob
      presence reconcile --api-url http://127.0.0.1:8099 --json alice

    Exit status: 0 when every user got an answer, 1 otherwise (each failure is printed with RongCloud's code).
    """
    from pydantic import SecretStr

    from streams.config import WorkerSettings

    if not app_key or not secret:
        raise click.UsageError(
            "need the app key and secret: --app-key/--secret or PRESENCE_APP_KEY/PRESENCE_APP_SECRET"
        )
    if bootstrap:
        os.environ["PRESENCE_KAFKA_BOOTSTRAP_SERVERS"] = bootstrap
    settings = _load(WorkerSettings)
    update: dict[str, Any] = {"app_key": app_key, "app_secret": SecretStr(secret)}
    if api_urls:
        update["reconcile_api_urls"] = tuple(url.rstrip("/") for url in api_urls)
    settings = settings.model_copy(update=update)
    results = asyncio.run(_reconcile(settings, list(dict.fromkeys(userids)), publish))
    failed = False
    for userid, result in results:
        if isinstance(result, Exception):
            failed = True
            code = getattr(result, "code", None)
            if as_json:
                click.echo(
                    json.dumps({"userid": userid, "error": str(result), "code": code}, ensure_ascii=False)
                )
            else:
                click.secho(f"{userid}  error: {result}", fg="red")
            continue
        if as_json:
            click.echo(json.dumps({"userid": userid, "online": result.online, "sent_at": result.sent_at,
                                   "answered_at": result.answered_at, "api": result.base_url}, ensure_ascii=False))  # fmt: skip
        else:
            from presence.observe import clock

            state = click.style(
                "online" if result.online else "offline", fg="green" if result.online else "yellow", bold=True
            )
            click.echo(f"{userid}  {state}  (asked {result.base_url} at {clock(result.sent_at)}, "
                       f"{result.answered_at - result.sent_at} ms)")  # fmt: skip
    raise SystemExit(1 if failed else 0)


async def _reconcile(settings: Any, userids: list[str], publish: bool) -> list[tuple[str, Any]]:
    from streams.checkonline import client_from_settings, publish_observation

    async with client_from_settings(settings) as client:
        answers = await asyncio.gather(*(client.check(u) for u in userids), return_exceptions=True)
    results = list(zip(userids, answers, strict=True))
    if publish and any(not isinstance(a, BaseException) for a in answers):
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(acks="all", **settings.aiokafka_options())
        try:
            await producer.start()
            for _, answer in results:
                if not isinstance(answer, BaseException):
                    await publish_observation(producer, settings.topic_raw, answer.observation("on_demand"))
        except Exception as exc:  # the answers are printed either way; say why RAW missed them
            click.secho(f"error: could not publish to {settings.topic_raw}: {exc}", fg="red", err=True)
            raise SystemExit(1) from exc
        finally:
            await producer.stop()
    return results


@main.command("tail", short_help="Follow transitions (or STATE records) live.")
@click.option(
    "--user", "-u", metavar="USERID", help="Only this user's messages (reads just their partition)."
)
@click.option("--state", is_flag=True, help="Read the STATE topic (full records) instead of TRANSITIONS.")
@click.option("-n", "--lines", type=click.IntRange(min=0), default=10, show_default=True,
              help="How many of the newest messages to show first (0: only new ones).")  # fmt: skip
@click.option("--from-beginning", is_flag=True, help="Show everything the topic holds first.")
@click.option("--follow/--no-follow", "-f/-F", default=True, show_default=True,
              help="Keep waiting for new messages (Ctrl-C stops), or exit after the backlog.")  # fmt: skip
@click.option("--count", type=click.IntRange(min=1), help="Exit after showing this many messages.")
@click.option("--idle-timeout", type=click.FloatRange(min=0), default=0,
              help="Exit when no new message came for this many seconds (0: never).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print each message's JSON as it is on the topic.")
@_bootstrap_option
def tail(
    user: str | None, state: bool, lines: int, from_beginning: bool, follow: bool, count: int | None,
    idle_timeout: float, as_json: bool, bootstrap: str | None,
) -> None:  # fmt: skip
    """Watch presence transitions (or STATE records) as the workers write them.

    \b
    Each transition line: when it happened, the user, from → to, what caused it (event, platform, session),
    where the user is still online, and (epoch, seq) — consumers order a user's transitions by it.

    It reads without a consumer group, so it never takes messages from anyone.
    """
    from presence.observe import InspectError, Message, format_state, format_transition
    from presence.observe import tail as read

    settings = _common(bootstrap)
    topic = settings.topic_state if state else settings.topic_transitions
    fmt = format_state if state else format_transition

    def emit(message: Message) -> None:
        if as_json:
            click.echo(json.dumps(message.value, ensure_ascii=False) if message.value is not None else
                       json.dumps({"userid": message.key, "deleted": True}))  # fmt: skip
        else:
            click.echo(fmt(message))

    def ready() -> None:
        if not as_json and sys.stderr.isatty():
            click.secho(
                f"following {topic}{' for ' + user if user else ''} (Ctrl-C stops)", dim=True, err=True
            )

    try:
        asyncio.run(read(settings, topic, user=user, last=lines, from_beginning=from_beginning, follow=follow,
                         emit=emit, count=count or 0, idle_timeout=idle_timeout, ready=ready))  # fmt: skip
    except InspectError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        pass


@main.command("topics", short_help="Describe topics, partitions and worker lag.")
@click.option("--app-id", "app_ids", multiple=True, metavar="APP_ID",
              help="Workers' app id (consumer group) whose lag to show; repeatable "
              "[default: every group that consumes RAW].")  # fmt: skip
@click.option("--partitions", "by_partition", is_flag=True, help="Show the lag of every partition.")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
@_bootstrap_option
def topics(app_ids: tuple[str, ...], by_partition: bool, as_json: bool, bootstrap: str | None) -> None:
    """Describe the product's topics: partitions, replication, retention/compaction, messages held, and how
    far behind each worker group is on RAW (lag = messages not yet committed).

    Exit status: 0 when every product topic exists, 3 when some are missing (`presence create-topics`
    creates them), 1 when Kafka cannot be reached.
    """
    from presence.observe import InspectError, describe, worker_groups

    settings = _common(bootstrap)
    topic_list = [
        (settings.topic_raw, "raw events from the gateway"),
        (settings.topic_dlq, "dead letters"),
        (settings.topic_transitions, "user-level transitions"),
        (settings.topic_state, "current records (compacted)"),
    ]
    try:
        groups = list(app_ids) or asyncio.run(worker_groups(settings))
        for group in groups:
            topic_list.append((changelog_topic(group), f"table changelog of {group}"))
        infos = asyncio.run(describe(settings, topic_list, {settings.topic_raw: groups}))
    except InspectError as exc:
        _fail(str(exc))
    if as_json:
        click.echo(json.dumps([info.__dict__ for info in infos], default=str))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"Kafka {settings.kafka_bootstrap_servers}", title_justify="left")
        for column in (
            "topic",
            "role",
            "partitions",
            "replicas",
            "messages",
            "config",
            "lag (group: messages)",
        ):
            table.add_column(
                column, justify="right" if column in ("partitions", "replicas", "messages") else "left"
            )
        for info in infos:
            if not info.exists:
                table.add_row(
                    info.name, info.role, "[red]missing[/]", "", "", "run `presence create-topics`", ""
                )
                continue
            config = info.config or {}
            retention = config.get("retention.ms")
            config_text = config.get("cleanup.policy", "?")
            if retention and config.get("cleanup.policy") == "delete":
                config_text += f", {_duration(int(retention))}"
            if config.get("cleanup.policy") == "compact":
                config_text += _compaction_text(config)
            lag = ", ".join(f"{g}: {n}" for g, n in (info.lag or {}).items())
            if by_partition and info.lag_by_partition:
                lag += "".join(
                    f"\n  {g} " + " ".join(f"p{p}={n}" for p, n in sorted(per.items()))
                    for g, per in info.lag_by_partition.items()
                )
            if info.lag is not None and not info.lag:
                lag = "no worker group has committed on RAW yet"
            table.add_row(info.name, info.role, str(info.partitions), str(info.replication), str(info.messages),
                          config_text, lag)  # fmt: skip
        console = Console(highlight=False)
        if not console.is_terminal:
            console.width = 200  # a pipe or a log file: no need to wrap
        console.print(table)
    raise SystemExit(3 if any(not info.exists for info in infos[:4]) else 0)


def _compaction_text(config: dict[str, str]) -> str:
    """Segment roll, dirty ratio and tombstone retention of a compacted topic, one per line."""
    parts = []
    if "segment.ms" in config:
        parts.append(f"segment {_duration(int(config['segment.ms']))}")
    if "min.cleanable.dirty.ratio" in config:
        parts.append(f"dirty ratio {float(config['min.cleanable.dirty.ratio']):g}")
    if "delete.retention.ms" in config:
        parts.append(f"tombstones {_duration(int(config['delete.retention.ms']))}")
    # One per line: the table stays narrow enough for a terminal beside the lag column.
    return "".join(f"\n{part}" for part in parts)


def _duration(ms: int) -> str:
    if ms < 0:
        return "kept forever"
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("min", 60_000), ("s", 1000)):
        if ms >= size and ms % size == 0:
            return f"{ms // size} {unit}"
    return f"{ms} ms"


@main.command("replay", short_help="Rebuild table and STATE from RAW (S11).")
@click.option("--app-id", metavar="APP_ID",
              help="App id of the rebuild: its consumer group, table and changelogs "
              "[default: presence-replay-<date>-<time>]. Run again with the same id to resume.")  # fmt: skip
@click.option("--state-topic", metavar="TOPIC", help="Where the rebuilt STATE goes [default: APP_ID.state].")
@click.option("--into-live-state", is_flag=True,
              help="Rebuild into the live STATE topic (PRESENCE_TOPIC_STATE). Stop the live workers first.")  # fmt: skip
@click.option("--transitions-topic", metavar="TOPIC",
              help="Where the rebuilt transitions go [default: APP_ID.transitions]; never the live topic.")  # fmt: skip
@click.option("--run-dir", type=click.Path(path_type=Path, file_okay=False), default=Path(".run"),
              show_default=True, help="The rebuild's table goes to RUN_DIR/replay/APP_ID, its log to RUN_DIR/logs.")  # fmt: skip
@click.option(
    "--timeout", type=click.FloatRange(min=0), default=0, help="Give up after this many seconds (0: never)."
)
@_bootstrap_option
def replay(
    app_id: str | None, state_topic: str | None, into_live_state: bool, transitions_topic: str | None,
    run_dir: Path, timeout: float, bootstrap: str | None,
) -> None:  # fmt: skip
    """Rebuild the presence table and a STATE topic from the RAW topic, e.g. after a fix to the presence logic.

    Runs a worker under a new app id (its own consumer group, table and changelogs) that reads RAW from the
    beginning, shows its progress, and stops once it has caught up with what RAW held when the replay
    started. The live workers are not touched, and the replay never writes to the live TRANSITIONS topic (rule
    S11): its transitions go to --transitions-topic, its dead letters to APP_ID.dlq.

    \b
    Afterwards, either read the rebuilt STATE topic, or switch the live workers to the rebuilt table: stop
    them and start them with PRESENCE_WORKER_APP_ID=APP_ID (and PRESENCE_TOPIC_STATE pointing at the rebuilt
    topic, unless you rebuilt into the live one with --into-live-state). They continue from where the replay
    stopped; transitions for events that arrived meanwhile are then emitted again, from the new logic.
    """
    from presence import replay as rebuild
    from presence.children import ChildFailed
    from presence.observe import InspectError

    settings = _common(bootstrap)
    if into_live_state and state_topic and state_topic != settings.topic_state:
        raise click.UsageError("--into-live-state and --state-topic name different topics; give one of them")
    app_id = app_id or f"presence-replay-{time.strftime('%Y%m%d-%H%M%S')}"
    plan = rebuild.ReplayPlan.named(
        app_id, run_dir, settings.topic_state if into_live_state else state_topic, transitions_topic
    )
    live_app_id = os.environ.get("PRESENCE_WORKER_APP_ID", rebuild.LIVE_APP_ID)
    try:
        rebuild.check_plan(plan, settings, live_app_id, into_live_state)
    except InspectError as exc:
        _fail(str(exc))
    click.echo(
        f"replaying {settings.topic_raw} from the beginning as app id {plan.app_id}\n"
        f"  STATE → {plan.state_topic}{' (the live topic)' if into_live_state else ''}\n"
        f"  transitions → {plan.transitions_topic}   dead letters → {plan.dlq_topic}\n"
        f"  worker log: {plan.log_path}"
    )
    show = sys.stderr.isatty()
    last_print = [0.0]

    def report(progress: rebuild.Progress) -> None:
        if show:
            click.echo(f"\r  {progress.done}/{progress.total} messages ({progress.fraction:.0%}), "
                       f"{progress.remaining} to go   ", nl=False, err=True)  # fmt: skip
        elif time.monotonic() - last_print[0] > 5 or progress.remaining == 0:
            last_print[0] = time.monotonic()
            click.echo(f"  {progress.done}/{progress.total} messages ({progress.fraction:.0%})", err=True)

    started = time.monotonic()
    try:
        progress = rebuild.run(plan, settings, dict(os.environ), on_progress=report, timeout=timeout)
    except (InspectError, ChildFailed) as exc:
        if show:
            click.echo(err=True)
        _fail(str(exc))
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted; resume with --app-id {plan.app_id}", err=True)
        raise SystemExit(130) from None
    if show:
        click.echo(err=True)
    if progress.total == 0:
        click.echo(f"{settings.topic_raw} is empty: nothing to replay")
        return
    click.echo(
        f"caught up: {progress.total} raw messages replayed in {time.monotonic() - started:.1f} s into "
        f"{plan.state_topic}\n"
        f"to serve from the rebuilt table: PRESENCE_WORKER_APP_ID={plan.app_id} "
        f"PRESENCE_TOPIC_STATE={plan.state_topic} presence worker"
    )


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
