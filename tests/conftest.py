"""Fixtures shared by every test: a real Apache Kafka broker for the integration tests.

The broker is started once per test session by the project's own :mod:`presence.localkafka` on free ports in a
temporary directory, or taken from ``PRESENCE_TEST_KAFKA=host:port`` when set (then tests that stop or kill the
broker cannot run and say so). Each test gets its own topic names, so tests never see each other's data.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from core.settings import CommonSettings
from presence.localkafka import LocalKafka, free_port, kafka_version


class Broker:
    """The session's broker, with stop/start/kill for fault-injection tests."""

    def __init__(self, local: LocalKafka | None, bootstrap: str) -> None:
        self._local = local
        self.bootstrap = bootstrap

    @property
    def restartable(self) -> bool:
        return self._local is not None

    def _need_local(self) -> LocalKafka:
        if self._local is None:
            pytest.fail("this test stops the broker; it cannot run against PRESENCE_TEST_KAFKA (unset it)")
        return self._local

    def stop(self) -> None:
        self._need_local().stop()

    def kill(self) -> None:
        self._need_local().kill()

    def start(self) -> None:
        """Start again on the same port and data (after stop() or kill())."""
        local = self._need_local()
        if local.process is None:
            local.start()

    @property
    def log_file(self) -> Path | None:
        return self._local.log_file if self._local else None


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[Broker]:
    # Fixture output is captured; a cold start fetches jars, so say what is happening on the terminal.
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")

    def _say(message: str) -> None:
        if reporter is None:
            return
        # Session fixtures run under pytest's output capture; lift it so the line reaches the terminal/CI log.
        if capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"[kafka] {message}")
        else:
            reporter.write_line(f"[kafka] {message}")

    external = os.environ.get("PRESENCE_TEST_KAFKA")
    if external:
        _say(f"using the broker at {external} (PRESENCE_TEST_KAFKA)")
        yield Broker(None, external)
        return
    local = LocalKafka(
        data_dir=tmp_path_factory.mktemp("kafka"), port=free_port(), controller_port=free_port(), heap="768m"
    )
    local.start(progress=_say)
    _say(f"Apache Kafka {kafka_version()} ready on {local.bootstrap}")
    try:
        yield Broker(local, local.bootstrap)
    finally:
        local.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: Broker) -> str:
    return kafka_broker.bootstrap


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Names unique to this test (topics, consumer groups, app ids)."""
    token = uuid.uuid4().hex[:10]
    return lambda name: f"{name}-{token}"


@pytest.fixture
def settings_for(kafka_bootstrap: str, unique: Callable[[str], str]) -> Callable[..., dict[str, Any]]:
    """Keyword arguments for any Settings class: this test's broker and topic names, small partition counts."""

    def make(**overrides: Any) -> dict[str, Any]:
        values: dict[str, Any] = {
            "env": "test",
            "kafka_bootstrap_servers": kafka_bootstrap,
            "topic_raw": unique("raw"),
            "topic_dlq": unique("dlq"),
            "topic_transitions": unique("transitions"),
            "topic_state": unique("state"),
            "topic_partitions": 4,
            "topic_replication_factor": 1,
        }
        values.update(overrides)
        return values

    return make


@pytest.fixture
def common_settings(settings_for: Callable[..., dict[str, Any]]) -> CommonSettings:
    return CommonSettings(**settings_for())
