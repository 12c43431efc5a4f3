"""The one rule for what may be a clearnet DNS server (pure).

Used by NetworkManager's client on every value it reads (tailsfw/nm.py) and
again by the resolv file's renderer (tailsfw/resolv.py), so the two can
never disagree.
"""

from __future__ import annotations

import ipaddress

MAX_TEXT = 64  # longer than any IP address text, even IPv6 with a scope
MAX_SHOWN = 48  # characters of a refused value quoted in its reason
THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")  # "this host": never a server
BROADCAST = ipaddress.IPv4Address("255.255.255.255")


class Refused(ValueError):
    """A value that is not a usable DNS server; the message says why."""


def show(value: object) -> str:
    """A value quoted for a one-line message: escaped, and cut if long."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def check_address(value: object) -> ipaddress.IPv4Address:
    """The value (text, or an IPv4Address) as a DNS server's IPv4 address,
    or Refused naming why not: only unicast IPv4 addresses that can be
    reached outside this host are servers."""
    if isinstance(value, ipaddress.IPv4Address):
        text = str(value)
    elif isinstance(value, str):
        text = value
    else:
        raise Refused(f"{show(value)}: not a string")
    if len(text) > MAX_TEXT or any(not c.isprintable() or c.isspace() for c in text):
        raise Refused(f"{show(value)}: not an IPv4 address (spaces, control characters or long)")
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError:
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise Refused(f"{show(value)}: not an IPv4 address") from None
        raise Refused(f"{show(value)}: IPv6 (only IPv4 servers are used)") from None
    if address in THIS_NETWORK:
        raise Refused(f"{show(value)}: unspecified (0.0.0.0/8)")
    if address.is_loopback:
        raise Refused(f"{show(value)}: loopback")
    if address.is_multicast:
        raise Refused(f"{show(value)}: multicast")
    if address == BROADCAST:
        raise Refused(f"{show(value)}: broadcast")
    if address.is_reserved:
        raise Refused(f"{show(value)}: reserved (240.0.0.0/4)")
    return address
