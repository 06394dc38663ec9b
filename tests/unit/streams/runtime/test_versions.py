"""The version guard: the Faust glue runs only on the exact versions it was verified with."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from streams.config import WorkerSettings
from streams.runtime import internals, versions
from streams.runtime.app import create_app

ROOT = Path(__file__).resolve().parents[4]


def _pyproject_pins() -> dict[str, str]:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for requirement in dependencies:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s;,]+)", requirement)
        if match:
            pins[match[1]] = match[3]
    return pins


def test_the_installed_libraries_are_the_versions_the_glue_was_written_for() -> None:
    """Fails loudly after an upgrade: the message says what to re-verify before changing the pins."""
    wrong = versions.mismatches()
    if wrong:
        with pytest.raises(versions.VersionMismatch) as raised:
            versions.check()
        pytest.fail(str(raised.value))


def test_the_guard_uses_the_pins_of_pyproject() -> None:
    pins = _pyproject_pins()
    assert {name: pins.get(name) for name in versions.PINNED} == versions.PINNED


def test_another_version_is_refused_naming_it_and_what_to_reverify() -> None:
    installed = {**versions.PINNED, "aiokafka": "0.15.0"}
    with pytest.raises(versions.VersionMismatch) as raised:
        versions.check(installed.get)
    message = str(raised.value)
    assert "aiokafka 0.15.0 (written for 0.14.0)" in message
    assert "faust-streaming" not in message.split("but found")[1].split(";")[0]
    for touched in internals.TOUCHED:
        assert touched in message
    assert "streams/runtime/fixes.py" in message and "test_kill9.py" in message


def test_a_missing_library_is_refused() -> None:
    with pytest.raises(versions.VersionMismatch, match="mode-streaming missing"):
        versions.check(lambda name: None if name == "mode-streaming" else versions.PINNED[name])


def test_every_private_name_the_glue_uses_is_listed_in_internals() -> None:
    """A private attribute reached for outside internals.py would escape the version guard's list."""
    private_access = re.compile(r"\.(_[a-z][A-Za-z0-9_]*)")
    runtime = ROOT / "streams" / "runtime"
    found = {}
    for path in sorted(runtime.glob("*.py")):
        if path.name in (
            "internals.py",
            "versions.py",
        ):  # versions.py names them only to fingerprint their source
            continue
        names = set(private_access.findall(path.read_text()))
        # Attributes of the glue's own objects (self._x) are not Faust's.
        own = set(re.findall(r"self\.(_[a-z][A-Za-z0-9_]*)", path.read_text()))
        foreign = names - own
        if foreign:
            found[path.name] = sorted(foreign)
    assert found == {}


def test_the_worker_refuses_to_build_its_app_on_another_version(
    monkeypatch: pytest.MonkeyPatch, settings: WorkerSettings
) -> None:
    monkeypatch.setitem(versions.PINNED, "aiokafka", "0.0.1")
    with pytest.raises(versions.VersionMismatch, match=r"aiokafka 0\.14\.0 \(written for 0\.0\.1\)"):
        create_app(settings)


def test_the_faust_code_the_batch_delivery_reproduces_is_the_code_it_was_written_against() -> None:
    """streams.runtime.delivery copies Faust's drain loop and ack bookkeeping; a changed copy upstream (even under
    the same version number) would silently diverge from it."""
    assert versions.changed_sources() == []


def test_a_build_of_the_pinned_version_with_changed_code_is_refused() -> None:
    def patched(name: str) -> str:
        return "0" * 16 if name.endswith("Consumer.ack") else versions.REPRODUCED[name]

    with pytest.raises(versions.VersionMismatch, match=r"Consumer\.ack.*streams/runtime/delivery\.py"):
        versions.check(fingerprint_of=patched)
