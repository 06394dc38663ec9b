"""The ``presence`` command as a user runs it: real processes, the session's real broker, unique topics per test
module, and a running pipeline (``presence up`` in the background) for the commands that look into one.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from presence.children import wait_until
from presence.localkafka import free_port

SECRET = "cli-test-secret-1"
APP_KEY = "cli-test-app"


def topic_env(token: str) -> dict[str, str]:
    """A clean environment naming this test's own topics and worker app id (no PRESENCE_* leaks in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_")}
    env.update(
        {
            "PRESENCE_TOPIC_RAW": f"cli-{token}.raw",
            "PRESENCE_TOPIC_DLQ": f"cli-{token}.dlq",
            "PRESENCE_TOPIC_TRANSITIONS": f"cli-{token}.transitions",
            "PRESENCE_TOPIC_STATE": f"cli-{token}.state",
            "PRESENCE_TOPIC_TICKS": f"cli-{token}.ticks",
            "PRESENCE_TOPIC_PARTITIONS": "4",
            "PRESENCE_WORKER_APP_ID": f"cli-{token}-worker",
            "PRESENCE_APP_KEY": APP_KEY,
            "PRESENCE_APP_SECRET": SECRET,
            "PRESENCE_LOG_LEVEL": "INFO",
        }
    )
    return env


def presence(
    *args: str, env: dict[str, str], timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``presence ARGS`` to completion, as a user would from a shell."""
    return subprocess.run(
        [sys.executable, "-m", "presence.cli", *args],
        env=env, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd,
    )  # fmt: skip


def children_of(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields after the last ')' are fixed.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class Up:
    """A background ``presence up`` with its ports, environment and output file."""

    process: subprocess.Popen[bytes]
    env: dict[str, str]
    output: Path
    gateway_port: int
    worker_port: int
    run_dir: Path

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def webhook(self) -> str:
        return f"{self.gateway}/rongcloud/online-status"

    @property
    def worker(self) -> str:
        return f"http://127.0.0.1:{self.worker_port}"

    @property
    def bootstrap(self) -> str:
        return self.env["PRESENCE_KAFKA_BOOTSTRAP_SERVERS"]

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def status_lines(self) -> list[str]:
        return [line for line in self.text().splitlines() if line.startswith("[")]

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"presence up exited with {self.process.returncode}:\n{self.text()[-3000:]}")
        try:
            return httpx.get(f"{self.worker}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def demo_processed(self) -> bool:
        """The demo traffic is sent and the worker has no lag (from the status lines)."""
        self.ready()
        lines = self.status_lines()
        return bool(lines) and bool(re.search(r"simulator done: .* lag 0,", lines[-1]))


def start_up(kafka_bootstrap: str, tmp: Path, *extra: str, env: dict[str, str]) -> Up:
    gateway_port, worker_port = free_port(), free_port()
    output = tmp / "up.out"
    args = [
        "up", "--kafka", kafka_bootstrap, "--run-dir", str(tmp / "run"), "--gateway-port", str(gateway_port),
        "--worker-port", str(worker_port), "--no-live", *extra,
    ]  # fmt: skip
    with output.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "presence.cli", *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    return Up(process, env, output, gateway_port, worker_port, tmp / "run")


def stop(up: Up, sig: int = signal.SIGINT, timeout: float = 90) -> int:
    if up.process.poll() is None:
        up.process.send_signal(sig)
        try:
            up.process.wait(timeout)
        except subprocess.TimeoutExpired:
            up.process.kill()
            up.process.wait()
            raise AssertionError(
                f"presence up did not stop within {timeout:.0f} s:\n{up.text()[-3000:]}"
            ) from None
    return up.process.returncode


@pytest.fixture(scope="module")
def pipeline(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """``presence up`` with a short demo, running for the whole module; its demo traffic fully processed."""
    env = {**topic_env(uuid.uuid4().hex[:10]), "PRESENCE_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}
    up = start_up(
        kafka_bootstrap, tmp_path_factory.mktemp("up"), "--demo-seconds", "5", "--rate", "150", "--users", "60",
        env=env,
    )  # fmt: skip
    try:
        wait_until(up.ready, 150, "the worker started by presence up to be ready", interval=0.5)
        wait_until(up.demo_processed, 120, "the demo traffic to be processed", interval=0.5)
        yield up
    finally:
        code = stop(up)  # Ctrl-C
    assert code == 0, up.text()[-3000:]
    assert "stopping…" in up.text() and "stopped the gateway and the worker" in up.text()
