"""The source-address allow-list and trusted proxies (G8)."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.sources import client_address, is_allowed

PROXIES = (ipaddress.ip_network("10.0.0.0/8"),)
ALLOW = (ipaddress.ip_network("203.0.113.0/24"), ipaddress.ip_network("2001:db8::/32"))


def addr(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def test_g8_no_allow_list_allows_everyone() -> None:
    assert is_allowed(addr("198.51.100.1"), ())
    assert is_allowed(None, ())


def test_g8_allow_list_membership() -> None:
    assert is_allowed(addr("203.0.113.9"), ALLOW)
    assert is_allowed(addr("2001:db8::1"), ALLOW)
    assert not is_allowed(addr("198.51.100.1"), ALLOW)
    assert not is_allowed(None, ALLOW)


def test_g8_forwarded_for_ignored_from_untrusted_peer() -> None:
    assert client_address("198.51.100.1", "203.0.113.9", PROXIES) == addr("198.51.100.1")


def test_g8_forwarded_for_honoured_from_trusted_proxy() -> None:
    assert client_address("10.1.2.3", "203.0.113.9", PROXIES) == addr("203.0.113.9")


def test_g8_client_cannot_spoof_by_prepending_hops() -> None:
    # The client wrote "203.0.113.9"; the trusted proxy appended the address it really saw.
    assert client_address("10.1.2.3", "203.0.113.9, 198.51.100.7", PROXIES) == addr("198.51.100.7")


def test_g8_chain_of_trusted_proxies_is_walked() -> None:
    assert client_address("10.1.2.3", "203.0.113.9, 10.9.9.9", PROXIES) == addr("203.0.113.9")


def test_g8_garbled_hop_stops_at_the_last_trusted_address() -> None:
    assert client_address("10.1.2.3", "203.0.113.9, garbage", PROXIES) == addr("10.1.2.3")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("203.0.113.9:443", "203.0.113.9"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("::ffff:203.0.113.9", "203.0.113.9"),
    ],
)
def test_g8_address_forms(text: str, expected: str) -> None:
    assert client_address(text, None, ()) == addr(expected)


def test_g8_unparseable_peer() -> None:
    assert client_address("testclient", None, PROXIES) is None
    assert client_address(None, "203.0.113.9", PROXIES) is None
