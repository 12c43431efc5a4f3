"""Links and addresses, from netlink: the facts, and no policy decisions.

`NetlinkSource.snapshots()` reads the whole link and address state, then
follows link and address events, yielding a `Snapshot` whenever the state
changed (once per batch of messages read together, not per message).  On
ENOBUFS (the kernel dropped events for us) or any other error the socket is
thrown away and the whole state is read again: a lost event can delay the
truth, never replace it.

rtnetlink is spoken directly (`decode` is pure): the daemon needs four
fields of four message kinds, and a general decoder (pyroute2's) cost ~0.2 ms
a message and 20 MB of memory; a storm of 2,000 interfaces brings ~10,000
messages.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import struct
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import nlsock
from .events import LinksChanged
from .links import Address, Link, Snapshot
from .nlsock import ATTR, HEADER, NLA_TYPE_MASK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR

log = logging.getLogger(__name__)

# From linux/rtnetlink.h.
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR
IFF_UP = 0x1
# Room for a burst of events while a commit blocks the loop (a few ms); a
# storm of 2,000 new interfaces is ~10 MB of messages.
RCVBUF = 16 * 1024 * 1024
# linux/rtnetlink.h
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
EVENTS = {
    RTM_NEWLINK: "RTM_NEWLINK", RTM_DELLINK: "RTM_DELLINK",
    RTM_NEWADDR: "RTM_NEWADDR", RTM_DELADDR: "RTM_DELADDR",
}  # fmt: skip
IFLA_IFNAME = 3
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
RECV_SIZE = 1 << 17
BATCH = 64  # datagrams read before the state is looked at again

# A message as the fields State reads: "event", "index", "flags", "family",
# "prefixlen", and the attributes by their kernel names (as pyroute2 gives them).
Message = dict[str, Any]


class NetlinkError(OSError):
    """The kernel answered a request with an error."""


def _attributes(data: bytes, offset: int, end: int) -> Iterator[tuple[int, bytes]]:
    while offset + ATTR.size <= end:
        length, kind = ATTR.unpack_from(data, offset)
        if length < ATTR.size:
            return
        yield kind & NLA_TYPE_MASK, data[offset + ATTR.size : offset + length]
        offset += (length + 3) & ~3


def _link(data: bytes, offset: int, end: int, event: str) -> Message:
    _, _, index, flags, _ = IFINFOMSG.unpack_from(data, offset)
    msg: Message = {"event": event, "index": index, "flags": flags}
    for kind, value in _attributes(data, offset + IFINFOMSG.size, end):
        if kind == IFLA_IFNAME:
            msg["IFLA_IFNAME"] = value.split(b"\0", 1)[0].decode(errors="replace")
    return msg


def _address(data: bytes, offset: int, end: int, event: str) -> Message:
    family, prefixlen, _, _, index = IFADDRMSG.unpack_from(data, offset)
    msg: Message = {"event": event, "index": index, "family": family, "prefixlen": prefixlen}
    size = {socket.AF_INET: 4, socket.AF_INET6: 16}.get(family)
    for kind, value in _attributes(data, offset + IFADDRMSG.size, end):
        if kind in (IFA_ADDRESS, IFA_LOCAL) and len(value) == size:
            msg["IFA_ADDRESS" if kind == IFA_ADDRESS else "IFA_LOCAL"] = socket.inet_ntop(
                family, value
            )
    return msg


def decode(data: bytes, seq: int = 0) -> tuple[list[Message], bool]:
    """The link and address messages of one datagram, and whether it ends
    the dump numbered `seq`.  Raises NetlinkError for the kernel's refusal,
    nlsock.Malformed for a datagram that cannot be read whole (the state
    is then read again: see nlsock)."""
    messages: list[Message] = []
    done = False
    frames, malformed = nlsock.split(data)
    for frame in frames:
        kind, _, number, body, end = frame
        event = EVENTS.get(kind)
        if event is not None and kind in (RTM_NEWLINK, RTM_DELLINK):
            if end - body >= IFINFOMSG.size:
                messages.append(_link(data, body, end, event))
        elif event is not None:
            if end - body >= IFADDRMSG.size:
                messages.append(_address(data, body, end, event))
        elif kind == NLMSG_DONE and seq and number == seq:
            done = True
        elif kind == NLMSG_ERROR and (code := nlsock.error_code(data, frame)) != 0:
            raise NetlinkError(code, f"netlink request refused: {errno.errorcode.get(code)}")
    if malformed:
        raise nlsock.Malformed(malformed)
    return messages, done


def dump_request(kind: int, seq: int) -> bytes:
    """A request for every link (RTM_GETLINK) or address (RTM_GETADDR)."""
    body = IFINFOMSG.pack(0, 0, 0, 0, 0) if kind == RTM_GETLINK else IFADDRMSG.pack(0, 0, 0, 0, 0)
    return HEADER.pack(HEADER.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def open_socket(rcvbuf: int, groups: int = GROUPS) -> socket.socket:
    return nlsock.open_socket(socket.NETLINK_ROUTE, rcvbuf, groups)


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
    # By interface index: an interface's removal drops its addresses at once
    # (a storm removes thousands of interfaces).
    addresses: dict[int, set[Address]] = field(default_factory=dict)

    def update(self, msg: Any) -> None:
        event = msg.get("event")
        if event == "RTM_NEWLINK":
            link = link_of(msg)
            self.links[link.index] = link
        elif event == "RTM_DELLINK":
            index = int(msg["index"])
            self.links.pop(index, None)
            # The kernel announces the addresses' removal too; do not rely on it.
            self.addresses.pop(index, None)
        elif event in ("RTM_NEWADDR", "RTM_DELADDR"):
            address = address_of(msg)
            if address is None:
                return
            if event == "RTM_NEWADDR":
                self.addresses.setdefault(address.index, set()).add(address)
            elif (held := self.addresses.get(address.index)) is not None:
                held.discard(address)
                if not held:
                    del self.addresses[address.index]

    def load(self, messages: Iterable[Any]) -> None:
        """Replace everything with a full dump."""
        self.links.clear()
        self.addresses.clear()
        for msg in messages:
            self.update(msg)

    def snapshot(self) -> Snapshot:
        addresses = frozenset(a for held in self.addresses.values() for a in held)
        return Snapshot(frozenset(self.links.values()), addresses)


def read_snapshot() -> Snapshot:
    """The links and addresses now, read once (for tailsfwctl, not the daemon)."""
    with open_socket(RCVBUF, groups=0) as sock:
        sock.setblocking(True)
        state = State()
        for seq, kind in enumerate((RTM_GETLINK, RTM_GETADDR), start=1):
            sock.sendto(dump_request(kind, seq), (0, 0))
            done = False
            while not done:
                messages, done = decode(sock.recv(RECV_SIZE), seq)
                for msg in messages:
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
        self.malformed = nlsock.Malformations(self.name)

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
            except nlsock.Malformed as e:
                self.last_error = f"malformed message: {e}"
                self.malformed.note(str(e))  # the state is read again: nothing is lost
            except Exception as e:  # a message we cannot decode, ...
                self.last_error = repr(e)
                log.error("netlink: %r: reading the whole state again", e)
            # Do not spin if the error comes back at once.
            await asyncio.sleep(self.retry_delay)

    async def _follow(self) -> AsyncIterator[Snapshot]:
        loop = asyncio.get_running_loop()
        with open_socket(self.rcvbuf) as sock:
            state = State()
            # Events that come during the dumps are applied in the order the
            # kernel sent them, between the dump's own messages.
            for seq, kind in enumerate((RTM_GETLINK, RTM_GETADDR), start=1):
                sock.sendto(dump_request(kind, seq), (0, 0))  # a few bytes: never blocks
                done = False
                while not done:
                    messages, done = decode(await loop.sock_recv(sock, RECV_SIZE), seq)
                    for msg in messages:
                        state.update(msg)
            self.reads += 1
            last = state.snapshot()
            yield last
            while True:
                datagrams = [await loop.sock_recv(sock, RECV_SIZE)]
                while len(datagrams) < BATCH:
                    try:
                        datagrams.append(sock.recv(RECV_SIZE))
                    except BlockingIOError:
                        break
                for data in datagrams:
                    if not data:
                        raise NetlinkClosed(errno.ECONNRESET, "netlink socket closed")
                    for msg in decode(data)[0]:
                        state.update(msg)
                snapshot = state.snapshot()
                if snapshot != last:
                    last = snapshot
                    yield snapshot


def _describe(e: OSError) -> str:
    name = errno.errorcode.get(e.errno or 0, str(e.errno))
    return f"{name}: {e.strerror or e}"
