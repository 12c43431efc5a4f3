"""Links and addresses, from netlink: the facts, and no policy decisions.

`NetlinkSource.snapshots()` reads the whole link and address state, then
follows link and address events, yielding a `Snapshot` whenever the state
changed.  On ENOBUFS (the kernel dropped events for us) or any other error
the socket is thrown away and the whole state is read again: a lost event
can delay the truth, never replace it.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import AsyncIPRoute, IPRoute  # type: ignore[import-untyped]

from .events import LinksChanged

log = logging.getLogger(__name__)

# From linux/rtnetlink.h (pyroute2 names them too, but not typed).
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR
IFF_UP = 0x1
SO_RCVBUFFORCE = 33  # asm-generic/socket.h; not in typeshed
# Room for a burst of events while a commit blocks the loop (a few ms).
RCVBUF = 4 * 1024 * 1024

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


def link_of(msg: Any) -> Link:
    return Link(
        index=int(msg["index"]),
        name=str(msg.get("IFLA_IFNAME")),
        up=bool(int(msg["flags"]) & IFF_UP),
    )


def address_of(msg: Any) -> Address | None:
    """An address message as an `Address`; None for other families."""
    if msg["family"] not in (socket.AF_INET, socket.AF_INET6):
        return None
    prefix_address = msg.get("IFA_ADDRESS") or msg.get("IFA_LOCAL")
    if prefix_address is None:
        return None
    return Address(
        index=int(msg["index"]),
        local=str(msg.get("IFA_LOCAL") or prefix_address),
        prefix=ipaddress.ip_interface(f"{prefix_address}/{msg['prefixlen']}"),
    )


@dataclass
class State:
    """The link and address state, kept up to date by netlink messages."""

    links: dict[int, Link] = field(default_factory=dict)
    addresses: set[Address] = field(default_factory=set)

    def update(self, msg: Any) -> None:
        event = msg.get("event")
        if event == "RTM_NEWLINK":
            link = link_of(msg)
            self.links[link.index] = link
        elif event == "RTM_DELLINK":
            index = int(msg["index"])
            self.links.pop(index, None)
            # The kernel announces the addresses' removal too; do not rely on it.
            self.addresses = {a for a in self.addresses if a.index != index}
        elif event in ("RTM_NEWADDR", "RTM_DELADDR"):
            address = address_of(msg)
            if address is None:
                return
            if event == "RTM_NEWADDR":
                self.addresses.add(address)
            else:
                self.addresses.discard(address)

    def load(self, messages: Iterable[Any]) -> None:
        """Replace everything with a full dump."""
        self.links.clear()
        self.addresses.clear()
        for msg in messages:
            self.update(msg)

    def snapshot(self) -> Snapshot:
        return Snapshot(frozenset(self.links.values()), frozenset(self.addresses))


def read_snapshot() -> Snapshot:
    """The links and addresses now, read once (for tailsfwctl, not the daemon)."""
    with IPRoute() as ipr:
        state = State()
        state.load(ipr.link("dump"))
        for msg in ipr.addr("dump"):
            state.update(msg)
        return state.snapshot()


class NetlinkClosed(ConnectionError):
    """The netlink socket ended without an error: read everything again."""


class NetlinkSource:
    """Snapshots of links and addresses, from a full read and then events."""

    name = "netlink"

    def __init__(self, rcvbuf: int = RCVBUF, retry_delay: float = 0.05) -> None:
        self.rcvbuf = rcvbuf
        self.retry_delay = retry_delay
        self.reads = 0  # full reads of the state: 1 + the number of resyncs
        self.last_error = ""

    async def events(self) -> AsyncIterator[LinksChanged]:
        async for snapshot in self.snapshots():
            yield LinksChanged(snapshot)

    async def snapshots(self) -> AsyncIterator[Snapshot]:
        while True:
            try:
                async for snapshot in self._follow():
                    yield snapshot
            except OSError as e:
                self.last_error = _describe(e)
                if e.errno == errno.ENOBUFS:
                    log.warning("netlink: events were lost (ENOBUFS): reading the whole state")
                    continue
                log.error("netlink: %s: reading the whole state again", self.last_error)
            except Exception as e:  # a message pyroute2 cannot decode, ...
                self.last_error = repr(e)
                log.error("netlink: %r: reading the whole state again", e)
            # Do not spin if the error comes back at once.
            await asyncio.sleep(self.retry_delay)

    async def _follow(self) -> AsyncIterator[Snapshot]:
        ipr = AsyncIPRoute()
        try:
            # Subscribe before the dump: an event that races with the dump is
            # queued and applied after it, so the state converges.
            await ipr.bind(groups=GROUPS)
            self._grow_buffer(ipr)
            state = State()
            state.load([m async for m in await ipr.link("dump")])
            for msg in [m async for m in await ipr.addr("dump")]:
                state.update(msg)
            self.reads += 1
            last = state.snapshot()
            yield last
            while True:
                received = 0
                async for msg in ipr.get():
                    received += 1
                    state.update(msg)
                if received == 0:
                    raise NetlinkClosed(errno.ECONNRESET, "netlink socket closed")
                snapshot = state.snapshot()
                if snapshot != last:
                    last = snapshot
                    yield snapshot
        finally:
            ipr.close()

    def _grow_buffer(self, ipr: Any) -> None:
        try:
            # FORCE goes past net.core.rmem_max (needs CAP_NET_ADMIN).
            ipr.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.rcvbuf)
        except OSError:
            ipr.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)


def _describe(e: OSError) -> str:
    name = errno.errorcode.get(e.errno or 0, str(e.errno))
    return f"{name}: {e.strerror or e}"
