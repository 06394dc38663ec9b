"""What every benchmark shares: the machine's facts, a broker, processes and their CPU, tables and results."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from presence.localkafka import LocalKafka, free_port, kafka_version

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
NOISE_NOTE = (
    "Measured on a shared, noisy 2-core machine (other engineers run tests on it). Absolute numbers move from "
    "run to run; the ratios between systems measured in the same run are what count."
)


def machine_facts() -> dict[str, Any]:
    """nproc, CPU model, RAM, OS and the versions that matter, recorded with every result."""
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "ram_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "kafka": kafka_version(),
        "load_average_when_written": [round(x, 2) for x in os.getloadavg()],  # 1, 5, 15 min
        "note": NOISE_NOTE,
    }


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return float(ordered[rank])


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else math.nan


# --- processes ----------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its live children so far (0 once it is gone)."""
    try:
        proc = psutil.Process(pid)
        total = sum(proc.cpu_times()[:2])
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += sum(child.cpu_times()[:2])
        return float(total)
    except psutil.Error:
        return 0.0


def rss_bytes(pid: int) -> int:
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


@dataclass
class CpuMeter:
    """CPU seconds used by a set of processes between ``start()`` and ``stop()``."""

    pids: dict[str, int]
    _start: dict[str, float] = field(default_factory=dict)
    _wall: float = 0.0
    used: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0

    def start(self) -> None:
        self._wall = time.monotonic()
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        self.wall = time.monotonic() - self._wall
        self.used = {name: round(cpu_seconds(pid) - self._start[name], 2) for name, pid in self.pids.items()}
        return self.used

    def cores(self) -> dict[str, float]:
        """Average cores used by each process over the interval."""
        return {name: round(used / self.wall, 2) if self.wall else 0.0 for name, used in self.used.items()}


class Service:
    """A child process with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.command = command
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> Service:
        with self.log_path.open("ab") as log:
            self.started_at = time.monotonic()
            self.process = subprocess.Popen(  # noqa: S603
                self.command,
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO_ROOT,
            )
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check(self) -> bool:
        """Raise if the process has exited; False otherwise (so it can lead an ``or`` in a wait condition)."""
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}; log:\n{self.log_tail()}")
        return False

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


# --- broker -------------------------------------------------------------------------------------------------


@dataclass
class Workspace:
    """A temporary directory and a broker of the benchmark's own, on free ports."""

    root: Path
    broker: LocalKafka

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap

    @property
    def broker_pid(self) -> int:
        assert self.broker.process is not None
        return self.broker.process.pid

    def path(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path


@contextlib.contextmanager
def workspace(name: str, heap: str = "1g", keep: bool = False) -> Iterator[Workspace]:
    root = Path(tempfile.mkdtemp(prefix=f"presence-bench-{name}-"))
    broker = LocalKafka(data_dir=root / "kafka", port=free_port(), controller_port=free_port(), heap=heap)
    say(f"starting a Kafka {kafka_version()} broker on {broker.bootstrap} (data in {root})")
    broker.start(progress=say)
    try:
        yield Workspace(root, broker)
    finally:
        broker.stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


# --- output -------------------------------------------------------------------------------------------------


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (readable on a terminal too)."""
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = [
        f"\n### {title}\n",
        "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
    ]
    lines.append("| " + " | ".join("-" * w for w in widths) + " |")
    for row in cells:
        lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


def write_results(
    name: str, smoke: bool, payload: dict[str, Any], out_dir: Path | None = None, variant: str | None = None
) -> Path:
    """Write the benchmark's JSON (``<name>.json``, ``<name>.<variant>.json`` for another size, or
    ``<name>.smoke.json``) and return its path."""
    directory = out_dir or RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (
        f"{name}.smoke.json" if smoke else f"{name}.{variant}.json" if variant else f"{name}.json"
    )
    document = {
        "benchmark": name,
        "smoke": smoke,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_facts(),
        **payload,
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return path
