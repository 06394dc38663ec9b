"""RongCloud callback signatures (G1, G2) and the replay guard (G3). Pure: no I/O, the clock is a parameter."""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from core.contract import compute_signature, parse_timestamp_ms

# Newest name first: when a request carries both, the current name wins.
TIMESTAMP_NAMES = ("timestamp", "signTimestamp", "rc-timestamp")
NONCE_NAMES = ("nonce", "rc-nonce")
SIGNATURE_NAMES = ("signature", "rc-signature")
APP_KEY_NAMES = ("appKey",)

MAX_PARAM_LENGTH = 128


class AuthFailure(StrEnum):
    """Why a request was refused with 401; the closed label set of the auth-failure counter."""

    MISSING_PARAMS = "missing_params"
    MALFORMED_PARAMS = "malformed_params"
    UNKNOWN_APP_KEY = "unknown_app_key"
    BAD_SIGNATURE = "bad_signature"
    TIMESTAMP_OUT_OF_WINDOW = "timestamp_out_of_window"
    REPLAYED_NONCE = "replayed_nonce"


@dataclass(frozen=True, slots=True)
class SignedParams:
    """The signature parameters of one callback, as sent."""

    app_key: str
    nonce: str
    timestamp: str
    signature: str

    @property
    def timestamp_ms(self) -> int:
        return parse_timestamp_ms(self.timestamp)


def _first(query: Mapping[str, str], names: Sequence[str]) -> str | None:
    for name in names:
        value = query.get(name)
        if value:
            return value
    return None


def extract_params(query: Mapping[str, str]) -> SignedParams | AuthFailure:
    """The signature parameters under their current or older names, or why they are unusable."""
    app_key = _first(query, APP_KEY_NAMES)
    nonce = _first(query, NONCE_NAMES)
    timestamp = _first(query, TIMESTAMP_NAMES)
    signature = _first(query, SIGNATURE_NAMES)
    if app_key is None or nonce is None or timestamp is None or signature is None:
        return AuthFailure.MISSING_PARAMS
    if any(len(value) > MAX_PARAM_LENGTH for value in (app_key, nonce, timestamp, signature)):
        return AuthFailure.MALFORMED_PARAMS
    try:
        parse_timestamp_ms(timestamp)
    except ValueError:
        return AuthFailure.MALFORMED_PARAMS
    return SignedParams(app_key=app_key, nonce=nonce, timestamp=timestamp, signature=signature)


def _equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def verify(
    params: SignedParams,
    *,
    app_key: str,
    secrets: Sequence[str],
    now_ms: int,
    window_ms: int,
) -> AuthFailure | None:
    """None when the request is authentic and fresh, else the reason to refuse it.

    Every configured secret is tried even after a match, so timing does not tell which one signed. The
    timestamp window is checked after the signature so that its counter only counts authentic requests
    (clock skew, or replays of captured URLs), not noise.
    """
    if not app_key or not _equal(params.app_key, app_key):
        return AuthFailure.UNKNOWN_APP_KEY
    provided = params.signature.lower()
    matched = False
    for secret in secrets:
        if not secret:
            continue
        matched |= _equal(provided, compute_signature(secret, params.nonce, params.timestamp))
    if not matched:
        return AuthFailure.BAD_SIGNATURE
    if abs(now_ms - params.timestamp_ms) > window_ms:
        return AuthFailure.TIMESTAMP_OUT_OF_WINDOW
    return None


def body_digest(body: bytes, *, truncated: bool = False) -> bytes:
    """What the replay guard remembers of a body."""
    digest = hashlib.sha256(body)
    if truncated:
        digest.update(b"\x00truncated")
    return digest.digest()


class ReplayGuard:
    """Remembers which body each signed (nonce, timestamp) came with, for as long as the timestamp is valid (G3).

    The signature does not cover the body, so a captured URL could carry a forged body for the rest of its
    window. The first body seen under a (nonce, timestamp) wins: the same body again is a retry, a different one
    is refused. State is per process (per replica): a forged body sent to another replica is not caught.
    Bounded: past ``max_entries`` the oldest entries are forgotten first.
    """

    def __init__(self, *, window_ms: int, max_entries: int, clock_ms: Callable[[], int]) -> None:
        self._window_ms = window_ms
        self._max_entries = max_entries
        self._clock_ms = clock_ms
        self._entries: OrderedDict[tuple[str, int], tuple[bytes, int]] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, nonce: str, timestamp_ms: int, digest: bytes) -> bool:
        """True if this body may be processed: first seen, or the same body as before."""
        now = self._clock_ms()
        self._expire(now)
        key = (nonce, timestamp_ms)
        seen = self._entries.get(key)
        if seen is not None:
            return hmac.compare_digest(seen[0], digest)
        # Kept until the timestamp leaves the window; after that the window check refuses the URL anyway.
        self._entries[key] = (digest, timestamp_ms + self._window_ms)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
            self.evicted += 1
        return True

    def _expire(self, now: int) -> None:
        # Entries are roughly in expiry order (insertion order, timestamps near now); a late-expiring entry at
        # the front only delays the sweep of those behind it, it never removes a live one.
        while self._entries:
            key, (_, expires) = next(iter(self._entries.items()))
            if expires >= now:
                break
            del self._entries[key]
