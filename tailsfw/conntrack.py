"""Delete conntrack entries by filter (ctnetlink), so that an established
flow cannot outlive its permission (`tailsfw.flowcut` names them).

The IPv4 table is dumped (IPCTNL_MSG_CT_GET), the entries that match a cut
are collected, then each is deleted by its original tuple
(IPCTNL_MSG_CT_DELETE).  An entry gone meanwhile (ENOENT) is no error.
Blocking: the caller runs it away from the event loop (a dump may hold
hundreds of thousands of entries).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from . import nlsock
from .flowcut import Cut

log = logging.getLogger("tailsfwd")
NETLINK_NETFILTER = 12
# linux/netfilter/nfnetlink.h, nfnetlink_conntrack.h
CTNL = 1 << 8  # NFNL_SUBSYS_CTNETLINK
CT_NEW, CT_GET, CT_DELETE = CTNL, CTNL | 1, CTNL | 2  # a dump answers in CT_NEW
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_MARK = 1, 2, 8
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST = 1, 2
CTA_PROTO_NUM, CTA_PROTO_DST_PORT = 1, 3
NESTED = 0x8000
NFGEN = struct.pack("=BBH", socket.AF_INET, 0, 0)  # nfgenmsg: family, version, res_id


class ConntrackError(OSError):
    """The kernel refused a dump or a deletion."""


@dataclass(frozen=True)
class Entry:
    """What a cut reads of one IPv4 conntrack entry."""

    orig: bytes  # the CTA_TUPLE_ORIG attribute as the kernel gave it
    addresses: tuple[ipaddress.IPv4Address, ...]  # both directions' sources and destinations
    proto: int
    dport: int | None
    mark: int

    def matches(self, cut: Cut) -> bool:
        return (
            (cut.mark is None or cut.mark == self.mark)
            and (cut.proto is None or cut.proto == self.proto)
            and (cut.dports is None or self.dport in cut.dports)
            and (cut.network is None or any(a in cut.network for a in self.addresses))
        )


def attributes(data: bytes, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(type, value) of each attribute from `offset`; stops at a bad length."""
    while offset + nlsock.ATTR.size <= len(data):
        length, kind = nlsock.ATTR.unpack_from(data, offset)
        if length < nlsock.ATTR.size or offset + length > len(data):
            return
        yield kind & nlsock.NLA_TYPE_MASK, data[offset + nlsock.ATTR.size : offset + length]
        offset += (length + 3) & ~3


def attr(kind: int, value: bytes) -> bytes:
    """One netlink attribute, padded."""
    data = nlsock.ATTR.pack(nlsock.ATTR.size + len(value), kind) + value
    return data + b"\0" * (-len(data) % 4)


def decode(body: bytes) -> Entry | None:
    """One dumped entry (the body after the netlink header); None if unreadable."""
    top = dict(attributes(body, len(NFGEN)))
    if CTA_TUPLE_ORIG not in top:
        return None
    addresses: list[ipaddress.IPv4Address] = []
    proto, dport = -1, None
    for which in (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY):
        parts = dict(attributes(top.get(which, b"")))
        for kind, value in attributes(parts.get(CTA_TUPLE_IP, b"")):
            if kind in (CTA_IP_V4_SRC, CTA_IP_V4_DST) and len(value) == 4:
                addresses.append(ipaddress.IPv4Address(value))
        if which == CTA_TUPLE_ORIG:
            l4 = dict(attributes(parts.get(CTA_TUPLE_PROTO, b"")))
            proto = l4.get(CTA_PROTO_NUM, b"\xff")[0]
            port = l4.get(CTA_PROTO_DST_PORT)
            dport = struct.unpack("!H", port)[0] if port is not None and len(port) == 2 else None
    mark = top.get(CTA_MARK)
    return Entry(
        orig=attr(CTA_TUPLE_ORIG | NESTED, top[CTA_TUPLE_ORIG]),
        addresses=tuple(addresses),
        proto=proto,
        dport=dport,
        mark=struct.unpack("!I", mark)[0] if mark is not None and len(mark) == 4 else 0,
    )


def _request(kind: int, flags: int, body: bytes, seq: int) -> bytes:
    return nlsock.HEADER.pack(nlsock.HEADER.size + len(body), kind, flags, seq, 0) + body


def dump() -> list[Entry]:
    """The IPv4 conntrack table's entries."""
    with nlsock.open_socket(NETLINK_NETFILTER, rcvbuf=1 << 22, blocking=True) as sock:
        return _dump(sock)


def _dump(sock: socket.socket) -> list[Entry]:
    sock.send(_request(CT_GET, nlsock.NLM_F_REQUEST | nlsock.NLM_F_DUMP, NFGEN, 1))
    entries: list[Entry] = []
    while True:
        data = sock.recv(1 << 20)
        frames, fault = nlsock.split(data)
        if fault:
            raise ConntrackError(errno.EBADMSG, f"conntrack dump: {fault}")
        for kind, _, _, start, end in frames:
            if kind == nlsock.NLMSG_DONE:
                return entries
            if kind == nlsock.NLMSG_ERROR:
                code = nlsock.error_code(data, (kind, 0, 0, start, end))
                raise ConntrackError(code, f"conntrack dump refused: {_name(code)}")
            if kind == CT_NEW:
                entry = decode(data[start:end])
                if entry is not None:
                    entries.append(entry)


def delete(cuts: Sequence[Cut]) -> int:
    """Delete the IPv4 entries that match any of `cuts`; how many were deleted."""
    if not cuts:
        return 0
    sock = nlsock.open_socket(NETLINK_NETFILTER, rcvbuf=1 << 22, blocking=True)
    with sock:
        doomed = [e for e in _dump(sock) if any(e.matches(c) for c in cuts)]
        deleted = 0
        for seq, entry in enumerate(doomed, start=2):
            body = NFGEN + entry.orig
            sock.send(_request(CT_DELETE, nlsock.NLM_F_REQUEST | nlsock.NLM_F_ACK, body, seq))
            data = sock.recv(4096)
            frames, fault = nlsock.split(data)
            if fault or not frames or frames[0][0] != nlsock.NLMSG_ERROR:
                raise ConntrackError(errno.EBADMSG, f"conntrack delete: no answer ({fault})")
            code = nlsock.error_code(data, frames[0])
            if code == 0:
                deleted += 1
            elif code != errno.ENOENT:  # gone meanwhile: what we wanted
                raise ConntrackError(code, f"conntrack delete refused: {_name(code)}")
        return deleted


def _name(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def cut_in_background(cuts: Sequence[Cut]) -> None:
    """Delete what `cuts` name in a thread of its own: never on the loop."""
    threading.Thread(target=_cut, args=(tuple(cuts),), name="conntrack-cut", daemon=True).start()


def _cut(cuts: Sequence[Cut]) -> None:
    why = "; ".join(c.why for c in cuts)
    try:
        count = delete(cuts)
    except OSError as e:
        log.error("cannot delete the flows the new ruleset forbids (%s): %s", why, e)
        return
    log.info("deleted %d conntrack entries the new ruleset forbids: %s", count, why)
