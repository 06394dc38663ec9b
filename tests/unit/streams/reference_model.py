"""An obviously-correct model of rules S1-S5 and S7, to check the real state machine against.

It keeps every event ever seen, forgets nothing, and recomputes the user's status from scratch after each one.
No damping, no retention, no serialisation, no speed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core.contract import Event
from streams.rules import UserStatus

PRIORITY = {"online": 0, "offline": 1, "logout": 2}


def newest(events: list[Event]) -> Event:
    """A session's deciding event: latest time, same millisecond broken by logout > offline > online."""
    return max(events, key=lambda e: (e.time, PRIORITY[e.status]))


def status_of(events: list[Event]) -> UserStatus:
    by_session: dict[str, list[Event]] = {}
    for e in events:
        by_session.setdefault(e.session_id, []).append(e)
    heads = [newest(evs) for evs in by_session.values()]
    if not heads:
        return "offline"
    if any(h.status == "online" for h in heads):
        return "online"
    last_end = max(heads, key=lambda e: (e.time, e.status == "logout"))
    return "logged_out" if last_end.status == "logout" else "offline"


@dataclass
class ReferenceUser:
    events: list[Event] = field(default_factory=list)
    # (from, to, at, cause session, cause event) for every status change, in arrival order.
    changes: list[tuple[str, str, int, str, str]] = field(default_factory=list)

    @property
    def status(self) -> UserStatus:
        return status_of(self.events)

    def see(self, event: Event) -> None:
        before = self.status
        self.events.append(event)
        after = self.status
        if after != before:
            self.changes.append((before, after, event.time, event.session_id, event.status))
