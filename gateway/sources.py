"""The source-address allow-list (G8). Pure."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from gateway.config import IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(text: str) -> IPAddress | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "203.0.113.7:443"
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _within(address: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    return any(address.version == net.version and address in net for net in networks)


def client_address(
    peer: str | None, forwarded_for: str | None, trusted_proxies: Sequence[IPNetwork]
) -> IPAddress | None:
    """The address the request came from.

    ``X-Forwarded-For`` is read only when the TCP peer is a trusted proxy, and then from the right: the first
    hop that is not itself a trusted proxy is the client. Anything left of it could have been written by the
    client and is ignored.
    """
    address = _address(peer) if peer else None
    if address is None or not forwarded_for or not _within(address, trusted_proxies):
        return address
    for hop in reversed(forwarded_for.split(",")):
        hop_address = _address(hop)
        if hop_address is None:
            # A garbled hop cannot be attributed; the last trusted proxy is as far back as we can vouch for.
            return address
        address = hop_address
        if not _within(hop_address, trusted_proxies):
            return hop_address
    return address


def is_allowed(address: IPAddress | None, allow: Sequence[IPNetwork]) -> bool:
    """True when no allow-list is configured, or the address lies in one of its networks."""
    if not allow:
        return True
    return address is not None and _within(address, allow)
