"""The exact library versions :mod:`streams.runtime` was written and verified against.

The worker reaches into private parts of these libraries (:data:`streams.runtime.internals.TOUCHED`) and
patches one of them (:mod:`streams.runtime.fixes`); the processing guarantee (S10) rests on both. Another
version may rename, move or change any of it without notice, so the worker refuses to start on anything else.
The same pins are in ``pyproject.toml`` (a test keeps the two equal).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

from streams.runtime.internals import TOUCHED

PINNED = {"faust-streaming": "0.15.3", "mode-streaming": "0.7.1", "aiokafka": "0.14.0"}

_REVERIFY = (
    "streams/runtime/internals.py (each private name still exists and means the same: {touched}); "
    "streams/runtime/fixes.py (ProducerBuffer.flush still returns before Kafka acknowledges what it flushed, "
    "and Producer.flush still calls it before every offset commit); then run tests/unit/streams/runtime and "
    "tests/integration/streams/test_kill9.py, and update PINNED and pyproject.toml together"
)


class VersionMismatch(RuntimeError):
    """An installed library is not the version the worker's Faust glue was verified with."""


def _installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def mismatches(installed: Callable[[str], str | None] = _installed) -> dict[str, tuple[str, str | None]]:
    """``{package: (pinned, installed)}`` for every package not installed at its pinned version."""
    found = {name: installed(name) for name in PINNED}
    return {name: (pin, found[name]) for name, pin in PINNED.items() if found[name] != pin}


def check(installed: Callable[[str], str | None] = _installed) -> None:
    """Raise :class:`VersionMismatch`, naming what to re-verify, unless every pin is what is installed."""
    wrong = mismatches(installed)
    if wrong:
        found = ", ".join(
            f"{name} {got or 'missing'} (written for {pin})" for name, (pin, got) in wrong.items()
        )
        raise VersionMismatch(
            f"the worker's Faust glue was verified with {PINNED} but found {found}; before running on these "
            f"versions re-verify {_REVERIFY.format(touched='; '.join(TOUCHED))}"
        )
