"""The circuit breaker in front of Kafka (G7). Pure: the clock is a parameter."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Breaker:
    """Closed: publish to Kafka. Open: don't, until a cooldown has passed; then one trial (half-open) decides.

    The cooldown doubles after each failed trial, up to a maximum, and resets on success.
    """

    def __init__(
        self,
        *,
        cooldown: float,
        max_cooldown: float,
        clock: Callable[[], float],
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self._base_cooldown = cooldown
        self._max_cooldown = max_cooldown
        self._cooldown = cooldown
        self._clock = clock
        self._on_change = on_change
        self.state = BreakerState.CLOSED
        self._opened_at = 0.0
        self.consecutive_failures = 0

    def _set(self, state: BreakerState) -> None:
        if state is not self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(state)

    @property
    def closed(self) -> bool:
        return self.state is BreakerState.CLOSED

    def seconds_until_trial(self) -> float:
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self._cooldown - self._clock())

    def try_trial(self, *, force: bool = False) -> bool:
        """True (and half-open) if the cooldown is over (or ``force``) and no other trial is running."""
        if self.state is BreakerState.OPEN and (force or self.seconds_until_trial() <= 0):
            self._set(BreakerState.HALF_OPEN)
            return True
        return False

    def success(self) -> None:
        self.consecutive_failures = 0
        self._cooldown = self._base_cooldown
        self._set(BreakerState.CLOSED)

    def failure(self) -> None:
        self.consecutive_failures += 1
        if self.state is BreakerState.HALF_OPEN:
            self._cooldown = min(self._cooldown * 2, self._max_cooldown)
        self._opened_at = self._clock()
        self._set(BreakerState.OPEN)

    def force_open(self) -> None:
        """Open without counting a failure (no producer yet)."""
        self._opened_at = self._clock()
        self._set(BreakerState.OPEN)

    def forget_failures(self) -> None:
        """Start counting failures afresh (a new producer replaces the one that kept failing)."""
        self.consecutive_failures = 0
