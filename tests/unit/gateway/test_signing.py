"""Signature verification (G1, G2) and the replay guard (G3)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.contract import compute_signature, parse_timestamp_ms
from gateway.signing import (
    AuthFailure,
    ReplayGuard,
    SignedParams,
    body_digest,
    extract_params,
    verify,
)

SECRET = "Y1W2MeFwwwRxa0"
NONCE = "14314"
TIMESTAMP = "1408710653000"
VECTOR = "30be0bbca9c9b2e27578701e9fda2358a814c88f"
WINDOW = 600_000


def params(**overrides: str) -> SignedParams:
    values = {"app_key": "key", "nonce": NONCE, "timestamp": TIMESTAMP, "signature": VECTOR}
    values.update(overrides)
    return SignedParams(**values)


def check(
    p: SignedParams, *, secrets: tuple[str, ...] = (SECRET,), now_ms: int = 1408710653000
) -> AuthFailure | None:
    return verify(p, app_key="key", secrets=secrets, now_ms=now_ms, window_ms=WINDOW)


def test_g1_official_test_vector() -> None:
    assert compute_signature(SECRET, NONCE, TIMESTAMP) == VECTOR
    assert check(params()) is None


def test_g1_signature_hex_is_case_insensitive() -> None:
    assert check(params(signature=VECTOR.upper())) is None


def test_g1_previous_secret_is_accepted_during_rotation() -> None:
    assert check(params(), secrets=("new-secret-123", SECRET)) is None
    assert check(params(), secrets=("new-secret-123",)) is AuthFailure.BAD_SIGNATURE


def test_g1_empty_secret_never_verifies() -> None:
    unsigned = params(signature=hashlib.sha1((NONCE + TIMESTAMP).encode()).hexdigest())  # noqa: S324
    assert check(unsigned, secrets=("",)) is AuthFailure.BAD_SIGNATURE
    assert check(unsigned, secrets=()) is AuthFailure.BAD_SIGNATURE


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"appKey": "k", "timestamp": "1", "nonce": "n", "signature": "s"}, ("k", "n", "1", "s")),
        ({"appKey": "k", "signTimestamp": "2", "nonce": "n", "signature": "s"}, ("k", "n", "2", "s")),
        ({"appKey": "k", "rc-timestamp": "3", "rc-nonce": "n", "rc-signature": "s"}, ("k", "n", "3", "s")),
        # the current name wins over an older one
        (
            {"appKey": "k", "timestamp": "4", "rc-timestamp": "5", "nonce": "n", "signature": "s"},
            ("k", "n", "4", "s"),
        ),
    ],
)
def test_g1_current_and_older_parameter_names(query: dict[str, str], expected: tuple[str, ...]) -> None:
    got = extract_params(query)
    assert isinstance(got, SignedParams)
    assert (got.app_key, got.nonce, got.timestamp, got.signature) == expected


@pytest.mark.parametrize("missing", ["appKey", "timestamp", "nonce", "signature"])
def test_g2_missing_parameter(missing: str) -> None:
    query = {"appKey": "k", "timestamp": "1", "nonce": "n", "signature": "s"}
    del query[missing]
    assert extract_params(query) is AuthFailure.MISSING_PARAMS


def test_g2_empty_parameter_counts_as_missing() -> None:
    assert (
        extract_params({"appKey": "k", "timestamp": "1", "nonce": "", "signature": "s"})
        is AuthFailure.MISSING_PARAMS
    )


@pytest.mark.parametrize("timestamp", ["abc", "-1", "1.5", "１２３", "1" * 17, " 123"])
def test_g2_malformed_timestamp(timestamp: str) -> None:
    query = {"appKey": "k", "timestamp": timestamp, "nonce": "n", "signature": "s"}
    assert extract_params(query) is AuthFailure.MALFORMED_PARAMS


def test_g2_overlong_parameter_is_malformed() -> None:
    query = {"appKey": "k", "timestamp": "1", "nonce": "n" * 200, "signature": "s"}
    assert extract_params(query) is AuthFailure.MALFORMED_PARAMS


def test_g2_unknown_app_key() -> None:
    assert check(params(app_key="other")) is AuthFailure.UNKNOWN_APP_KEY
    assert (
        verify(params(), app_key="", secrets=(SECRET,), now_ms=0, window_ms=WINDOW)
        is AuthFailure.UNKNOWN_APP_KEY
    )


def test_g2_bad_signature() -> None:
    assert check(params(signature="0" * 40)) is AuthFailure.BAD_SIGNATURE
    assert check(params(signature=VECTOR[:-1])) is AuthFailure.BAD_SIGNATURE
    assert check(params(signature="é" * 40)) is AuthFailure.BAD_SIGNATURE


def test_g2_timestamp_window_edges() -> None:
    ts = 1408710653000
    assert check(params(), now_ms=ts + WINDOW) is None
    assert check(params(), now_ms=ts - WINDOW) is None
    assert check(params(), now_ms=ts + WINDOW + 1) is AuthFailure.TIMESTAMP_OUT_OF_WINDOW
    assert check(params(), now_ms=ts - WINDOW - 1) is AuthFailure.TIMESTAMP_OUT_OF_WINDOW


def test_g2_ten_digit_seconds_timestamp() -> None:
    assert parse_timestamp_ms("1408710653") == 1408710653000
    assert parse_timestamp_ms("1408710653000") == 1408710653000
    seconds = params(timestamp="1408710653", signature=compute_signature(SECRET, NONCE, "1408710653"))
    assert check(seconds, now_ms=1408710653000 + 1000) is None
    assert check(seconds, now_ms=1408710653000 + WINDOW + 1000) is AuthFailure.TIMESTAMP_OUT_OF_WINDOW


def test_g2_window_checked_only_after_the_signature() -> None:
    assert check(params(signature="0" * 40), now_ms=0) is AuthFailure.BAD_SIGNATURE


@given(
    secret=st.text(min_size=1, max_size=40),
    nonce=st.text(min_size=1, max_size=40),
    timestamp=st.integers(min_value=1, max_value=10**15).map(str),
    flip=st.integers(min_value=0, max_value=39),
)
def test_g1_sign_verify_roundtrip_and_any_tampering_fails(
    secret: str, nonce: str, timestamp: str, flip: int
) -> None:
    signature = compute_signature(secret, nonce, timestamp)
    now = parse_timestamp_ms(timestamp)
    p = SignedParams("key", nonce, timestamp, signature)
    assert verify(p, app_key="key", secrets=(secret,), now_ms=now, window_ms=WINDOW) is None
    tampered_char = "0" if signature[flip] != "0" else "1"
    tampered = signature[:flip] + tampered_char + signature[flip + 1 :]
    p_bad = SignedParams("key", nonce, timestamp, tampered)
    assert (
        verify(p_bad, app_key="key", secrets=(secret,), now_ms=now, window_ms=WINDOW)
        is AuthFailure.BAD_SIGNATURE
    )


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def test_g3_same_body_is_a_retry_different_body_is_refused() -> None:
    clock = Clock(1_000_000)
    guard = ReplayGuard(window_ms=WINDOW, max_entries=1000, clock_ms=clock)
    assert guard.check("n1", 1_000_000, body_digest(b"[1]"))
    assert guard.check("n1", 1_000_000, body_digest(b"[1]"))
    assert not guard.check("n1", 1_000_000, body_digest(b"[2]"))
    # another nonce, or the same nonce at another timestamp, is another request
    assert guard.check("n2", 1_000_000, body_digest(b"[2]"))
    assert guard.check("n1", 1_000_001, body_digest(b"[2]"))


def test_g3_truncated_body_differs_from_the_same_prefix_complete() -> None:
    assert body_digest(b"abc", truncated=True) != body_digest(b"abc")


def test_g3_entries_expire_with_the_window() -> None:
    clock = Clock(1_000_000)
    guard = ReplayGuard(window_ms=WINDOW, max_entries=1000, clock_ms=clock)
    guard.check("n", 1_000_000, body_digest(b"a"))
    clock.now = 1_000_000 + WINDOW
    assert not guard.check("n", 1_000_000, body_digest(b"b"))
    clock.now = 1_000_000 + WINDOW + 1
    guard.check("other", clock.now, body_digest(b"x"))
    assert len(guard) == 1


def test_g3_guard_is_bounded() -> None:
    guard = ReplayGuard(window_ms=WINDOW, max_entries=1000, clock_ms=Clock(0))
    for i in range(1500):
        guard.check(f"n{i}", 0, b"d")
    assert len(guard) == 1000
    assert guard.evicted == 500
