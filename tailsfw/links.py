"""Links and addresses as values: what netlink.py reads and events.py carries.

Their own module, with no I/O and no imports of the package, so that the
events (and the compiler's users) need no netlink socket code and no module
imports one that imports it back.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    up: bool


@dataclass(frozen=True)
class Address:
    """An address of an interface.

    `prefix` is IFA_ADDRESS with its prefix length: the on-link prefix the
    kernel makes a route for (for a point-to-point address, the peer's
    prefix); `local` is the host's own address (IFA_LOCAL).
    """

    index: int
    local: str
    prefix: IPInterface


@dataclass(frozen=True)
class Snapshot:
    links: frozenset[Link] = frozenset()
    addresses: frozenset[Address] = frozenset()

    @property
    def names(self) -> Mapping[int, str]:
        return {link.index: link.name for link in self.links}

    @property
    def connected(self) -> frozenset[ipaddress.IPv4Network]:
        """IPv4 networks on-link on an interface that is up.

        An interface that is down has no routes: its networks are then
        reached through the gateway, which is what `lan.mode = "connected"`
        exists to refuse.
        """
        up = {link.index for link in self.links if link.up}
        return frozenset(
            a.prefix.network
            for a in self.addresses
            if a.index in up and isinstance(a.prefix, ipaddress.IPv4Interface)
        )
