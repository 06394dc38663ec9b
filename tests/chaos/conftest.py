"""The reliability suite (marker ``chaos``): faults, load and hostile input against real processes.

Short mode by default (part of ``./dev test``); long mode with ``PRESENCE_CHAOS_LONG=1`` (or ``--chaos-long``
when pytest is pointed at ``tests/chaos``). Durations can be set one by one, see :func:`knob`. The session writes
``.run/reports/reliability-<mode>.md`` and ``.json``; ``PRESENCE_CHAOS_REPORT_DIR=reports`` refreshes the
committed ones.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .report import Report

ROOT = Path(__file__).resolve().parents[2]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--chaos-long", action="store_true", help="run the chaos suite's long mode")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The soak runs as long as it is told to; other long-mode tests get the same room.
    timeout = max(600, knob(config, "SOAK_SECONDS", short=90, long=1800) + 900)
    for item in items:
        if "tests/chaos" in str(item.fspath):
            item.add_marker(pytest.mark.chaos)
            item.add_marker(pytest.mark.integration)
            item.add_marker(pytest.mark.timeout(timeout))


def long_mode(config: pytest.Config) -> bool:
    flag = bool(config.getoption("--chaos-long", default=False))
    return flag or os.environ.get("PRESENCE_CHAOS_LONG", "") not in ("", "0")


def knob(config: pytest.Config, name: str, short: float, long: float) -> float:
    """A duration or count: ``PRESENCE_CHAOS_<NAME>`` if set, else the mode's value."""
    value = os.environ.get(f"PRESENCE_CHAOS_{name}")
    if value:
        return float(value)
    return long if long_mode(config) else short


@pytest.fixture(scope="session")
def chaos_long(pytestconfig: pytest.Config) -> bool:
    return long_mode(pytestconfig)


@pytest.fixture(scope="session")
def reliability(pytestconfig: pytest.Config) -> Iterator[Report]:
    """The session's report; written once every chaos test has run."""
    mode = "long" if long_mode(pytestconfig) else "short"
    knobs = " ".join(
        f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items()) if k.startswith("PRESENCE_CHAOS_")
    )
    if mode == "long" and "PRESENCE_CHAOS_LONG" not in knobs:
        knobs = f"PRESENCE_CHAOS_LONG=1 {knobs}".strip()
    command = f"{knobs} python -m pytest -m chaos tests/chaos".strip()
    report = Report(mode=mode, command=command)
    yield report
    if report.rows:
        # A test run must not rewrite the committed reports: they go to .run/ unless asked for
        # (PRESENCE_CHAOS_REPORT_DIR=reports refreshes the published ones).
        directory = Path(os.environ.get("PRESENCE_CHAOS_REPORT_DIR", ROOT / ".run" / "reports"))
        path = report.write(directory)
        reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"[chaos] report written to {path}")
        else:
            print(f"[chaos] report written to {path}", file=sys.stderr)
