"""Realistic RongCloud online-status traffic as a *trace*: a deterministic list of webhook deliveries.

Generating a trace is pure (a seed in, the same deliveries out) and separate from sending it
(:mod:`presence.simulate`), so a trace can be written to a file, inspected and sent again. Times in a trace are
milliseconds relative to the start of the run; the sender adds the wall clock when it sends, so a trace replayed
tomorrow still carries fresh event times and fresh signatures.

What the generator reproduces of upstream's behaviour (see the webhook description in the README's links):

- users online on several devices at once (iOS, Android, PC, Websocket, MiniProgram), each connection its own
  ``sessionId``; reconnects open a new ``sessionId``;
- multi-device kicks: a login on one mobile platform reports the other mobile session offline (``"1"``);
- logouts (``"2"``), plain disconnects (``"1"``);
- late offlines: an offline delivered up to 5 minutes after it happened, after the user's later traffic (a run
  shorter than that delivers them at its end);
- retried deliveries: the same request (same URL, same body) sent again, as upstream does after a timeout;
- out-of-order batches: a later batch sent before an earlier one, and arrays not sorted by time;
- batching: upstream sends a JSON array of events of many users per request.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

TRACE_FORMAT = 1
PLATFORMS = ("iOS", "Android", "PC", "Websocket", "MiniProgram")
_PLATFORM_WEIGHTS = (0.3, 0.4, 0.1, 0.1, 0.1)
# RongCloud lets one mobile platform be logged in at a time by default: a login on one kicks the other.
MOBILE = ("iOS", "Android")
_SESSION_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_"
_LATE_OFFLINE_MAX_MS = 5 * 60 * 1000
_RETRY_AFTER_MS = (5_000, 6_000)  # upstream retries after its 5 s timeout


class TraceError(ValueError):
    """A trace file that cannot be used; the message says what is wrong with it."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One webhook request: when to send it, its nonce and its events (times relative to the run's start)."""

    at_ms: int
    nonce: str
    events: tuple[dict[str, Any], ...]
    # A retry re-sends the request of this earlier delivery byte for byte (same URL, same body).
    retry_of: int | None = None

    def to_json(self) -> dict[str, Any]:
        item: dict[str, Any] = {"at": self.at_ms, "nonce": self.nonce, "events": list(self.events)}
        if self.retry_of is not None:
            item["retry_of"] = self.retry_of
        return item


@dataclass(frozen=True)
class TraceSpec:
    """What to generate. ``rate`` is upstream events per second (retries not counted)."""

    seed: int = 1
    users: int = 1000
    events: int = 10_000
    rate: float = 500.0
    batch_max: int = 50
    batch_window_ms: int = 200
    user_prefix: str = "sim-"

    def header(self) -> dict[str, Any]:
        return {
            "trace": TRACE_FORMAT,
            "seed": self.seed,
            "users": self.users,
            "events": self.events,
            "rate": self.rate,
            "batch_max": self.batch_max,
            "batch_window_ms": self.batch_window_ms,
            "user_prefix": self.user_prefix,
        }


@dataclass
class Trace:
    spec: TraceSpec
    deliveries: list[Delivery]
    # How many of each kind of upstream behaviour the trace holds (reconnect, kick, late_offline, ...).
    scenarios: Counter[str] = field(default_factory=Counter)

    @property
    def event_count(self) -> int:
        return sum(len(d.events) for d in self.deliveries)

    @property
    def duration_ms(self) -> int:
        return self.deliveries[-1].at_ms if self.deliveries else 0

    def userids(self) -> list[str]:
        return sorted({e["userid"] for d in self.deliveries for e in d.events})


@dataclass
class _User:
    userid: str
    # platform -> (sessionId, clientIp, time of its online): a session connected "soon" (a second device, a
    # reconnect) is booked before its online's time comes.
    sessions: dict[str, tuple[str, str, int]] = field(default_factory=dict)


@dataclass(order=True)
class _Pending:
    deliver_ms: int
    order: int
    event: dict[str, Any] = field(compare=False)


class _Generator:
    def __init__(self, spec: TraceSpec) -> None:
        self.spec = spec
        self.rng = random.Random(spec.seed)  # noqa: S311 - reproducible traffic, not secrets
        self.users = [_User(f"{spec.user_prefix}{n:06d}") for n in range(spec.users)]
        self.pending: list[_Pending] = []
        self.scenarios: Counter[str] = Counter()
        self.clock = 0.0
        self.late: list[_Pending] = []

    def session_id(self) -> str:
        return "".join(self.rng.choice(_SESSION_ALPHABET) for _ in range(22))

    def client_ip(self) -> str:
        r = self.rng
        return f"10.{r.randrange(256)}.{r.randrange(256)}.{r.randrange(1, 255)}:{r.randrange(1024, 65536)}"

    def emit(self, user: _User, platform: str, status: str, at: int, *, late: bool = False) -> None:
        session, ip, _ = user.sessions[platform]
        event = {"userid": user.userid, "status": status, "os": platform, "time": at,
                 "clientIp": ip, "sessionId": session}  # fmt: skip
        if late:
            delay = self.rng.randrange(30_000, _LATE_OFFLINE_MAX_MS)
            self.late.append(_Pending(at + delay, len(self.pending) + len(self.late), event))
        else:
            # Upstream's own batching delay: a few milliseconds to a few tens.
            self.pending.append(_Pending(at + self.rng.randrange(0, 40), len(self.pending), event))

    def connect(self, user: _User, platform: str, at: int) -> None:
        user.sessions[platform] = (self.session_id(), self.client_ip(), at)
        self.emit(user, platform, "0", at)

    def end(self, user: _User, platform: str, status: str, at: int, *, late: bool = False) -> None:
        self.emit(user, platform, status, at, late=late)
        del user.sessions[platform]

    def pick_platform(self, exclude: Iterable[str] = ()) -> str:
        excluded = set(exclude)
        choices = [(p, w) for p, w in zip(PLATFORMS, _PLATFORM_WEIGHTS, strict=True) if p not in excluded]
        if not choices:
            return self.rng.choice(PLATFORMS)
        return self.rng.choices([p for p, _ in choices], [w for _, w in choices])[0]

    def step(self, at: int) -> None:
        """One thing happens to one user at virtual time ``at``."""
        r = self.rng
        user = r.choice(self.users)
        if not user.sessions:
            self.connect(user, self.pick_platform(), at)
            self.scenarios["login"] += 1
            if r.random() < 0.25:  # a second device soon after
                self.connect(user, self.pick_platform(user.sessions), at + r.randrange(100, 3000))
                self.scenarios["second_device"] += 1
            return
        # Only a session whose online has happened can end: one booked for later is not connected yet.
        connected = sorted(p for p, (_, _, since) in user.sessions.items() if since <= at)
        if not connected:
            return
        platform = r.choice(connected)
        roll = r.random()
        if roll < 0.30:
            # Network blip: the connection drops and the client reconnects with a new sessionId.
            self.end(user, platform, "1", at)
            self.connect(user, platform, at + r.randrange(50, 3000))
            self.scenarios["reconnect"] += 1
        elif roll < 0.46:
            other = self.pick_platform(user.sessions)
            mobile_online = [p for p in connected if p in MOBILE]
            if other in MOBILE and mobile_online:
                # Multi-device kick: the new mobile login reports the other mobile session offline.
                self.connect(user, other, at)
                self.end(user, mobile_online[0], "1", at + r.randrange(1, 30))
                self.scenarios["kick"] += 1
            else:
                self.connect(user, other, at)
                self.scenarios["another_device"] += 1
        elif roll < 0.70:
            self.end(user, platform, "1", at)
            self.scenarios["disconnect"] += 1
        elif roll < 0.92:
            self.end(user, platform, "2", at)
            self.scenarios["logout"] += 1
        else:
            # Late offline: this drop is reported up to 5 minutes late, after the user's reconnect.
            self.end(user, platform, "1", at, late=True)
            self.connect(user, platform, at + r.randrange(200, 5000))
            self.scenarios["late_offline"] += 1

    def run(self) -> Trace:
        spec = self.spec
        mean_gap_ms = 1000.0 / spec.rate if spec.rate > 0 else 1.0
        produced = 0
        while produced < spec.events:
            before = len(self.pending) + len(self.late)
            self.step(int(self.clock))
            produced += len(self.pending) + len(self.late) - before
            self.clock += self.rng.expovariate(1.0 / mean_gap_ms)
        end_ms = max((p.deliver_ms for p in self.pending), default=0)
        # A run shorter than the delay delivers its late offlines at its end, still after the later traffic.
        for item in self.late:
            item.deliver_ms = min(item.deliver_ms, end_ms + 1)
        items = sorted(self.pending + self.late)[: spec.events]
        return Trace(spec, self.batch(items), self.scenarios)

    def batch(self, items: list[_Pending]) -> list[Delivery]:
        spec, r = self.spec, self.rng
        batches: list[tuple[int, list[dict[str, Any]]]] = []
        current: list[dict[str, Any]] = []
        opened = last = 0
        for item in items:
            if current and (
                len(current) >= spec.batch_max or item.deliver_ms - opened > spec.batch_window_ms
            ):
                batches.append((last, current))
                current = []
            if not current:
                opened = item.deliver_ms
            current.append(item.event)
            last = item.deliver_ms
        if current:
            batches.append((last, current))
        deliveries: list[Delivery] = []
        for index, (at, events) in enumerate(batches):
            if len(events) > 1 and r.random() < 0.1:
                r.shuffle(events)  # upstream's arrays are not sorted by time
                self.scenarios["unsorted_batch"] += 1
            deliveries.append(Delivery(at, f"{index:x}{r.getrandbits(32):08x}", tuple(events)))
        # Out-of-order batches: now and then a batch overtakes the one before it.
        for index in range(1, len(deliveries)):
            if r.random() < 0.05:
                earlier, later = deliveries[index - 1], deliveries[index]
                deliveries[index - 1] = Delivery(earlier.at_ms, later.nonce, later.events)
                deliveries[index] = Delivery(later.at_ms, earlier.nonce, earlier.events)
                self.scenarios["overtaken_batch"] += 1
        retries = [
            Delivery(d.at_ms + r.randrange(*_RETRY_AFTER_MS), d.nonce, d.events, retry_of=index)
            for index, d in enumerate(deliveries)
            if r.random() < 0.03
        ]
        self.scenarios["retried_delivery"] += len(retries)
        # A stable sort keeps originals before retries scheduled at the same millisecond.
        return sorted(deliveries + retries, key=lambda d: d.at_ms)


def generate(spec: TraceSpec) -> Trace:
    """The trace for ``spec``; the same spec always gives the same trace."""
    if spec.users < 1 or spec.events < 1 or spec.rate < 0 or spec.batch_max < 1:
        raise ValueError("users, events and batch_max must be at least 1 and rate not negative")
    trace = _Generator(spec).run()
    # retry_of indexes the sorted list: point each retry at its original's new position.
    position = {(d.nonce, d.retry_of is None): i for i, d in enumerate(trace.deliveries)}
    trace.deliveries = [
        d if d.retry_of is None else Delivery(d.at_ms, d.nonce, d.events, position[(d.nonce, True)])
        for d in trace.deliveries
    ]
    return trace


def write(trace: Trace, path: Path) -> None:
    """Write ``trace`` as JSON lines: a header, then one delivery per line."""
    with path.open("wb") as out:
        out.write(orjson.dumps({**trace.spec.header(), "scenarios": dict(sorted(trace.scenarios.items()))}))
        out.write(b"\n")
        for delivery in trace.deliveries:
            out.write(orjson.dumps(delivery.to_json()))
            out.write(b"\n")


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, line


def read(path: Path) -> Trace:
    """Read a trace written by :func:`write` (``presence simulate --trace-out``)."""
    lines = _lines(path)
    try:
        _, first = next(lines)
        header = orjson.loads(first)
    except StopIteration:
        raise TraceError(
            f"{path} is empty; write a trace with `presence simulate --trace-out FILE`"
        ) from None
    except orjson.JSONDecodeError as exc:
        raise TraceError(f"{path}:1 is not JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("trace") != TRACE_FORMAT:
        raise TraceError(
            f'{path} is not a trace file (its first line must be a header with "trace": {TRACE_FORMAT}); '
            "write one with `presence simulate --trace-out FILE`"
        )
    spec = TraceSpec(**{k: header[k] for k in TraceSpec.__dataclass_fields__ if k in header})
    deliveries: list[Delivery] = []
    for number, line in lines:
        try:
            item = orjson.loads(line)
            events = tuple(item["events"])
            retry_of = item.get("retry_of")
            if retry_of is not None and not 0 <= int(retry_of) < len(deliveries):
                raise ValueError("retry_of must name an earlier delivery")
            deliveries.append(Delivery(int(item["at"]), str(item["nonce"]), events, retry_of))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise TraceError(f"{path}:{number} is not a delivery ({exc})") from None
    return Trace(spec, deliveries, Counter(header.get("scenarios", {})))
