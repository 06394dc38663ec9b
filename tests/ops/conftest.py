"""Fixtures of the operations tests: the real tools scripts/install-tools puts in its cache (helm, promtool,
prometheus, the prometheus-operator CRDs, the Compose schema). A missing tool fails the test with the command that
installs it; ./dev test runs that command first."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALLER = ROOT / "scripts" / "install-tools"


def tools_dir() -> Path:
    out = subprocess.run([str(INSTALLER), "--print-dir"], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def tool_path(name: str) -> Path:
    """A binary from the tools cache, else from PATH."""
    cached = tools_dir() / "bin" / name
    if cached.is_file():
        return cached
    found = shutil.which(name)
    if found:
        return Path(found)
    pytest.fail(f"{name} is not installed: run scripts/install-tools (./dev test does)")


def tool_file(relative: str) -> Path:
    path = tools_dir() / relative
    if not path.is_file():
        pytest.fail(f"{path} is missing: run scripts/install-tools (./dev test does)")
    return path


@pytest.fixture(scope="session")
def helm() -> Path:
    return tool_path("helm")


@pytest.fixture(scope="session")
def promtool() -> Path:
    return tool_path("promtool")


@pytest.fixture(scope="session")
def prometheus_bin() -> Path:
    return tool_path("prometheus")
