"""Small builders shared by the state-machine tests."""

from __future__ import annotations

from collections.abc import Iterable

from core.contract import Event
from streams.rules import (
    EventStatus,
    PresenceConfig,
    Transition,
    UserRecord,
    apply,
)

USER = "u1"


def ev(
    session: str,
    status: EventStatus,
    time: int,
    os: str | None = "iOS",
    ip: str | None = "10.0.0.1:4000",
    user: str = USER,
) -> Event:
    return Event(user, session, status, time, os, ip, time + 5, f"{session}:{status}:{time}")


def run(
    events: Iterable[Event],
    config: PresenceConfig | None = None,
    record: UserRecord | None = None,
) -> tuple[UserRecord | None, list[Transition]]:
    """Apply events in order with stream time = the largest event time so far."""
    cfg = config or PresenceConfig()
    out: list[Transition] = []
    stream_time = 0 if record is None else record.last_seen
    for e in events:
        stream_time = max(stream_time, e.time)
        record, result = apply(record, e, stream_time, cfg)
        out.extend(result.transitions)
    return record, out
