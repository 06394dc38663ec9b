"""A real single-node Apache Kafka broker (KRaft, combined broker + controller) for laptops and CI.

No Docker and no release tarball: the broker's jars come from Maven Central through the pinned ``pom.xml``
beside this file (fetched once, then cached), storage is formatted once, and the broker runs as a plain
``java`` process bound to 127.0.0.1. Readiness means a real Kafka client got an answer, not a log line alone.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

POM = Path(__file__).with_name("pom.xml")
_STARTED_LINE = "Kafka Server started"
_STATE_FILE = "broker.json"


class BrokerError(RuntimeError):
    """Something the user must fix before a broker can run; the message says what to do."""


def kafka_version() -> str:
    """The Kafka version pinned in the bundled pom.xml."""
    match = re.search(r"<kafka.version>([^<]+)</kafka.version>", POM.read_text())
    if match is None:  # pragma: no cover - the pom ships with the package
        raise BrokerError(f"{POM} has no <kafka.version> property")
    return match.group(1)


def default_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "rongcloud-presence" / f"kafka-{kafka_version()}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def _require(tool: str, hint: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise BrokerError(f"{tool} not found on PATH. {hint}")
    return path


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return str(Path(java_home) / "bin" / "java")
    return _require(
        "java",
        "Kafka needs Java 17 or newer: `apt-get install openjdk-17-jre-headless` (or set JAVA_HOME).",
    )


def ensure_jars(cache_dir: Path | None = None, progress: Callable[[str], None] = lambda _m: None) -> Path:
    """Return a directory holding the broker's runtime classpath, fetching it with Maven the first time."""
    libs = (cache_dir or default_cache_dir()) / "libs"
    marker = libs / ".complete"
    if marker.exists():
        return libs
    mvn = _require("mvn", "Fetching the Kafka jars needs Maven: `apt-get install maven`.")
    progress(f"fetching Apache Kafka {kafka_version()} jars from Maven Central into {libs} (once)")
    shutil.rmtree(libs, ignore_errors=True)
    libs.mkdir(parents=True)
    # The plugin version is pinned: older Maven releases default to a copy-dependencies that predates
    # includeScope handling we rely on.
    command = [
        mvn, "-q", "-B", "-f", str(POM),
        "org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies",
        "-DincludeScope=runtime", f"-DoutputDirectory={libs}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
    if result.returncode != 0 or not any(libs.glob("kafka_2.13-*.jar")):
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise BrokerError(f"Maven could not fetch the Kafka jars (exit {result.returncode}):\n{tail}")
    marker.write_text(kafka_version())
    return libs


@dataclass
class LocalKafka:
    """One local broker: its ports, its data directory and (once started) its process."""

    data_dir: Path
    port: int = 9092
    controller_port: int = 0
    cache_dir: Path | None = None
    heap: str = "1g"
    # Small internal topics start faster; a laptop or CI broker never needs 50 offset partitions.
    internal_partitions: int = 4
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    # Where this start's log lines begin: a reused data dir already holds an earlier "started" line.
    _log_offset: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()
        if not self.controller_port:
            self.controller_port = self.port + 1

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "server.log"

    def _write_config(self) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir / "data"),
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": str(self.internal_partitions),
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": str(self.internal_partitions),
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # The product creates its own topics with explicit configs; a typo must fail, not create a topic.
            "auto.create.topics.enable": "false",
        }
        path = self.data_dir / "server.properties"
        path.write_text("".join(f"{key}={value}\n" for key, value in props.items()))
        log4j = self.data_dir / "log4j2.properties"
        log4j.write_text(
            "status = error\n"
            "appender.file.type = File\n"
            "appender.file.name = FILE\n"
            f"appender.file.fileName = {self.log_file}\n"
            "appender.file.layout.type = PatternLayout\n"
            "appender.file.layout.pattern = [%d] %p %m (%c)%n\n"
            "rootLogger.level = INFO\n"
            "rootLogger.appenderRef.file.ref = FILE\n"
            "logger.kafka.name = kafka\n"
            "logger.kafka.level = INFO\n"
            "logger.state.name = state.change.logger\n"
            "logger.state.level = WARN\n"
        )
        return path

    def _java_command(self, libs: Path, main: str, *args: str, heap: str) -> list[str]:
        return [
            _java(),
            f"-Xms{min(heap, '512m', key=_heap_bytes)}",
            f"-Xmx{heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            "-cp",
            f"{libs}/*",
            main,
            *args,
        ]

    def _format(self, libs: Path, config: Path) -> None:
        if (self.data_dir / "data" / "meta.properties").exists():
            return
        # A KRaft cluster id is 16 random bytes in url-safe base64; a leading '-' would read as a flag.
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        while cluster_id.startswith("-"):
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        command = self._java_command(
            libs, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(config),
            "--ignore-formatted", heap="512m",
        )  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
        if result.returncode != 0:
            raise BrokerError(f"formatting {self.data_dir / 'data'} failed:\n{result.stdout}{result.stderr}")

    def start(
        self,
        *,
        detach: bool = False,
        timeout: float = 90.0,
        progress: Callable[[str], None] = lambda _m: None,
    ) -> None:  # noqa: E501
        """Start the broker and return once a real client gets an answer from it."""
        for port in (self.port, self.controller_port):
            if port_in_use(port):
                raise BrokerError(
                    f"port {port} on 127.0.0.1 is already in use. Is a broker already running "
                    f"(`presence kafka status`)? Otherwise choose another with --port."
                )
        libs = ensure_jars(self.cache_dir, progress)
        config = self._write_config()
        self._format(libs, config)
        progress(f"starting Apache Kafka {kafka_version()} on {self.bootstrap} (data in {self.data_dir})")
        self._log_offset = self._log_position()
        out = open(self.data_dir / "broker.out", "ab")  # noqa: SIM115 - handed to the child process
        command = self._java_command(libs, "kafka.Kafka", str(config), heap=self.heap)
        self.process = subprocess.Popen(  # noqa: S603
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=detach
        )
        out.close()
        self._write_state()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _write_state(self) -> None:
        assert self.process is not None  # noqa: S101
        state = {"pid": self.process.pid, "port": self.port, "controller_port": self.controller_port,
                 "version": kafka_version()}  # fmt: skip
        (self.data_dir / _STATE_FILE).write_text(json.dumps(state))

    def _log_position(self) -> int:
        return self.log_file.stat().st_size if self.log_file.exists() else 0

    def wait_ready(self, timeout: float) -> None:
        """Wait for the started line in the log and for a metadata answer to a real client."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise BrokerError(
                    f"the broker exited with code {self.process.returncode} while starting; "
                    f"last lines of {self.log_file}:\n{self.log_tail()}"
                )
            if self._log_says_started(self._log_offset) and _client_answers(self.bootstrap):
                return
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"the broker did not become ready within {timeout:.0f} s; last lines of "
                    f"{self.log_file}:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def _log_says_started(self, offset: int) -> bool:
        if not self.log_file.exists():
            return False
        with self.log_file.open("rb") as handle:
            handle.seek(offset)
            return _STARTED_LINE.encode() in handle.read()

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_file.exists():
            out = self.data_dir / "broker.out"
            return out.read_text(errors="replace")[-4000:] if out.exists() else "(no log written)"
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL if the broker has not exited within ``timeout`` seconds."""
        if self.process is None:
            return
        _terminate(self.process.pid, timeout, wait=self.process.wait)
        self.process = None
        (self.data_dir / _STATE_FILE).unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL the broker at once (fault injection)."""
        if self.process is None:
            return
        self.process.kill()
        self.process.wait()
        self.process = None


def _heap_bytes(value: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    return int(value[:-1]) * units[value[-1].lower()] if value[-1].lower() in units else int(value)


def _terminate(pid: int, timeout: float, wait: Callable[[float], object] | None = None) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if wait is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                wait(0.2)
                return
        elif not _alive(pid):
            return
        else:
            time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if wait is not None:
        wait(10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as gone.
    with contextlib.suppress(ChildProcessError):
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    return True


def _client_answers(bootstrap: str) -> bool:
    async def ask() -> bool:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
        try:
            await admin.start()
            await admin.list_topics()
            return True
        except Exception:  # noqa: BLE001 - any failure just means "not ready yet"
            return False
        finally:
            with contextlib.suppress(Exception):
                await admin.close()

    return asyncio.run(ask())


def read_state(data_dir: Path) -> dict[str, int | str] | None:
    """The running broker's pid/port/version as recorded by start(), or None if none is recorded."""
    path = Path(data_dir) / _STATE_FILE
    if not path.exists():
        return None
    state: dict[str, int | str] = json.loads(path.read_text())
    return state


def status(data_dir: Path) -> tuple[str, dict[str, int | str] | None]:
    """One of ``running``, ``stopped`` or ``stale`` (recorded but the process is gone) with the record."""
    state = read_state(data_dir)
    if state is None:
        return "stopped", None
    if not _alive(int(state["pid"])):
        return "stale", state
    return ("running" if _client_answers(f"127.0.0.1:{state['port']}") else "starting"), state


def stop_recorded(data_dir: Path, timeout: float = 30.0) -> bool:
    """Stop the broker recorded in ``data_dir`` (started detached by another process). True if one was stopped."""
    state = read_state(data_dir)
    if state is None:
        return False
    pid = int(state["pid"])
    stopped = _alive(pid)
    if stopped:
        _terminate(pid, timeout)
    (Path(data_dir) / _STATE_FILE).unlink(missing_ok=True)
    return stopped
