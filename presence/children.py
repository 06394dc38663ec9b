"""Child processes that never outlive their parent: own process group, SIGTERM on the parent's death, logs to a
file, and an orderly stop (SIGTERM to the group, SIGKILL after a grace period).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # Linux: the kernel sends SIGTERM to the child when the process that started it dies, even by SIGKILL.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def presence_command(*args: str) -> list[str]:
    """The ``presence`` command line run by this interpreter (works without the console script on PATH)."""
    return [sys.executable, "-m", "presence.cli", *args]


@dataclass
class Child:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
                list(self.argv),
                env=dict(self.env),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches only us; we stop children in order
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
            )

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the child's process group; SIGKILL it if still there after ``grace`` seconds."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        # Anything the child left in its group goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 15) -> str:
        if not self.log_path.exists():
            return "(no log written)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class ChildFailed(RuntimeError):
    """A child exited or did not become ready; the message has its log's last lines."""


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``condition`` until it returns something truthy and return that; raise ``TimeoutError`` naming ``what``.

    For conditions that only another process can make true (a broker, a worker, a consumer's progress), where
    there is nothing to await.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_http_ready(child: Child, url: str, timeout: float) -> None:
    """Wait until ``url`` answers 200, failing at once if the child exits."""

    def answers() -> bool:
        if not child.alive():
            raise ChildFailed(
                f"the {child.name} exited with code {child.exit_code()} while starting; last lines of "
                f"{child.log_path}:\n{child.log_tail()}"
            )
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(url, timeout=2).status_code == 200
        return False

    try:
        wait_until(answers, timeout, url, interval=0.25)
    except TimeoutError:
        raise ChildFailed(
            f"the {child.name} was not ready within {timeout:.0f} s ({url}); last lines of "
            f"{child.log_path}:\n{child.log_tail()}"
        ) from None
