"""The local broker's start-up errors say what to do."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from presence import localkafka


def test_kafka_version_is_pinned_to_4x() -> None:
    assert localkafka.kafka_version().startswith("4.")


def test_taken_port_is_reported_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = localkafka.LocalKafka(data_dir=tmp_path, port=port, controller_port=localkafka.free_port())
        with pytest.raises(localkafka.BrokerError, match=f"port {port} .* already in use"):
            broker.start()
    assert broker.process is None


def test_missing_java_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(localkafka.BrokerError, match="apt-get install openjdk"):
        localkafka._java()


def test_missing_maven_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(localkafka.BrokerError, match="apt-get install maven"):
        localkafka.ensure_jars(cache_dir=tmp_path / "cache")


def test_status_of_a_dead_recorded_broker_is_stale(tmp_path: Path) -> None:
    (tmp_path / "broker.json").write_text('{"pid": 999999999, "port": 1, "version": "4.1.1"}')
    state, recorded = localkafka.status(tmp_path)
    assert state == "stale"
    assert recorded is not None and recorded["port"] == 1
