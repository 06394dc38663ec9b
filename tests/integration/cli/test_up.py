"""``presence up``: the demo shows transitions flowing, and nothing it started outlives it (Ctrl-C, SIGTERM,
SIGKILL), as subprocesses against the session's real broker."""

from __future__ import annotations

import re
import signal
import socket
import uuid
from pathlib import Path

from presence.children import wait_until

from .conftest import alive, children_of, presence, start_up, stop, topic_env


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_up_runs_the_demo_shows_transitions_and_exits_0(kafka_bootstrap: str, tmp_path: Path) -> None:
    env = topic_env(uuid.uuid4().hex[:10])
    up = start_up(kafka_bootstrap, tmp_path, "--demo-seconds", "6", "--rate", "150", "--users", "80",
                  "--exit-after-demo", env=env)  # fmt: skip
    try:
        code = up.process.wait(timeout=240)
    finally:
        stop(up)
    out = up.text()
    assert code == 0, out[-4000:]
    assert f"credentials for this run: PRESENCE_APP_KEY={env['PRESENCE_APP_KEY']}" in out
    assert f"{up.gateway}/docs" in out and f"{up.worker}/presence/<userid>" in out
    assert str(tmp_path / "run" / "logs" / "worker.log") in out
    done = re.search(r"demo done: (\d+) events accepted .*; (\d+) transitions seen", out)
    assert done is not None, out[-3000:]
    # 900 events generated, a few callbacks (2 % of the requests, seeded) lost on purpose for reconciliation.
    assert int(done.group(1)) >= 800 and int(done.group(2)) > 0
    # Reconciliation asks the emulator this command serves, never RongCloud's hosts.
    assert re.search(
        r"reconciliation against the emulated RongCloud API http://127\.0\.0\.1:\d+: \d+ callbacks lost", out
    )
    assert "rong-api.com" not in (tmp_path / "run" / "logs" / "worker.log").read_text()
    assert re.search(r"\d+ users online of \d+, [\d.]+ transitions/s, \d+ events/s, lag 0", out)
    assert "→" in out  # sample transitions
    assert "stopped the gateway and the worker" in out
    assert _port_free(up.gateway_port) and _port_free(up.worker_port)
    assert (tmp_path / "run" / "logs" / "gateway.log").stat().st_size > 0


def test_sigterm_stops_every_child_and_sigkill_leaves_none_behind(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    env = topic_env(uuid.uuid4().hex[:10])
    for sig, directory in ((signal.SIGTERM, tmp_path / "term"), (signal.SIGKILL, tmp_path / "kill")):
        directory.mkdir()
        up = start_up(kafka_bootstrap, directory, "--demo-seconds", "0", env=env)
        try:
            wait_until(up.ready, 150, "presence up's worker to be ready", interval=0.5)
            children = children_of(up.process.pid)
            assert len(children) == 2, children  # gateway and worker (the broker is --kafka's)
            up.process.send_signal(sig)
            code = up.process.wait(timeout=90)
            wait_until(lambda: not any(alive(pid) for pid in children), 60,  # noqa: B023
                       f"the children of presence up to exit after {sig.name}")  # fmt: skip
        finally:
            stop(up)
        if sig == signal.SIGTERM:
            assert code == 0, up.text()[-3000:]
            assert "stopped the gateway and the worker" in up.text()
        assert _port_free(up.gateway_port) and _port_free(up.worker_port)


def test_up_says_what_to_do_when_it_cannot_start(kafka_bootstrap: str, tmp_path: Path) -> None:
    env = topic_env(uuid.uuid4().hex[:10])
    result = presence(
        "up", "--kafka", "127.0.0.1:9", "--run-dir", str(tmp_path), "--no-live", env=env, timeout=60
    )
    assert result.returncode == 1
    assert "no Kafka broker answers at 127.0.0.1:9" in result.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = presence("up", "--kafka", kafka_bootstrap, "--gateway-port", str(port), "--run-dir",
                          str(tmp_path), "--no-live", env=env, timeout=60)  # fmt: skip
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use" in result.stderr and "--gateway-port" in result.stderr
