"""The exact library versions :mod:`streams.runtime` was written and verified against.

The worker reaches into private parts of these libraries (:data:`streams.runtime.internals.TOUCHED`) and
patches one of them (:mod:`streams.runtime.fixes`); the processing guarantee (S10) rests on both. Another
version may rename, move or change any of it without notice, so the worker refuses to start on anything else.
The same pins are in ``pyproject.toml`` (a test keeps the two equal).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

from streams.runtime.internals import TOUCHED

PINNED = {"faust-streaming": "0.15.3", "mode-streaming": "0.7.1", "aiokafka": "0.14.0"}

#: The Faust code :mod:`streams.runtime.delivery` reproduces (the drain loop, getmany's checks, ack's bookkeeping,
#: the gap rule) or relies on (the stream acks what it handed out in a ``finally``; recovery buffers changelog
#: events and applies them through the table), by the SHA-256 prefix of its source. A build of the pinned version
#: with any of it changed (a fork, a local patch) is refused like another version.
REPRODUCED = {
    "faust.transport.consumer.Consumer._drain_messages": "44a2500309e83c63",
    "faust.transport.consumer.Consumer.getmany": "4b168d84882a70d6",
    "faust.transport.consumer.Consumer.ack": "5fcf41cf45153475",
    "faust.transport.consumer.Consumer._add_gap": "4df2573ded7c1c2c",
    "faust.types.tuples.Message.ack": "4751b72c4ed84153",
    "faust.streams.Stream._py_aiter": "3a48ee257a65435b",
    "faust.tables.recovery.Recovery._slurp_changelogs": "7825c7e50f766d5a",
    "faust.stores.rocksdb.Store.apply_changelog_batch": "ea3344d369fc4ab5",
}

_REVERIFY = (
    "streams/runtime/internals.py (each private name still exists and means the same: {touched}); "
    "streams/runtime/fixes.py (ProducerBuffer.flush still returns before Kafka acknowledges what it flushed, "
    "and Producer.flush still calls it before every offset commit); streams/runtime/delivery.py against the "
    "new Consumer._drain_messages, getmany and ack, and streams/runtime/table.py's changelog batches against "
    "Recovery and Store.apply_changelog_batch (then refresh REPRODUCED); then run tests/unit/streams/runtime, "
    "tests/integration/streams/test_kill9.py and tests/chaos/test_worker_faults.py, and update PINNED and "
    "pyproject.toml together"
)


def fingerprint(dotted: str) -> str:
    """SHA-256 prefix of the source of ``module.Class.method``."""
    module, owner, name = dotted.rsplit(".", 2)
    obj = getattr(getattr(importlib.import_module(module), owner), name)
    obj = getattr(obj, "fun", obj)  # mode's Service.task wraps the coroutine function
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


def changed_sources(fingerprint_of: Callable[[str], str] = fingerprint) -> list[str]:
    """The entries of :data:`REPRODUCED` whose installed source differs from what the glue was written against."""
    return [name for name, expected in REPRODUCED.items() if fingerprint_of(name) != expected]


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


def check(
    installed: Callable[[str], str | None] = _installed, fingerprint_of: Callable[[str], str] = fingerprint
) -> None:
    """Raise :class:`VersionMismatch`, naming what to re-verify, unless every pin is what is installed and the
    Faust code the batch delivery reproduces is the code it was written against."""
    wrong = mismatches(installed)
    if not wrong:
        changed = changed_sources(fingerprint_of)
        if changed:
            raise VersionMismatch(
                f"faust-streaming {PINNED['faust-streaming']} is installed but differs from the release the "
                f"worker's Faust glue was verified with in {', '.join(changed)}; before running on it re-verify "
                f"{_REVERIFY.format(touched='; '.join(TOUCHED))}"
            )
    if wrong:
        found = ", ".join(
            f"{name} {got or 'missing'} (written for {pin})" for name, (pin, got) in wrong.items()
        )
        raise VersionMismatch(
            f"the worker's Faust glue was verified with {PINNED} but found {found}; before running on these "
            f"versions re-verify {_REVERIFY.format(touched='; '.join(TOUCHED))}"
        )
