"""Netlink framing and sockets: the one piece under every netlink reader
(netlink.py: links and addresses; nftmonitor.py: nftables' notifications;
nflog.py: refused packets; the lab's commit clock).

`split` cuts a datagram into its messages (nlmsghdr); the readers decode
the bodies.  One policy for a malformed datagram, for every reader:

- `split` never raises: it returns the well-framed messages before the
  fault and the reason; the rest of that datagram is skipped (once one
  length is wrong, nothing after it can be found again);
- the reader counts it and logs the first one (`Malformations`; then only
  the count grows, so a hostile or broken peer cannot flood the journal);
- the reader treats it as lost messages, in its own terms: netlink.py reads
  the whole state again, nftmonitor.py has the kernel's ruleset checked,
  nflog.py counts the packets it could not read;
- the reader carries on: a datagram never ends it.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger(__name__)

HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, pid
ERROR = struct.Struct("=i")  # nlmsgerr's first field: a negative errno, 0 for an ack
ATTR = struct.Struct("=HH")  # nlattr: length, type
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
# linux/netlink.h
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x2, 0x4, 0x300
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SO_RCVBUFFORCE = 33  # asm-generic/socket.h; not in Python's socket module

# One message: its type, flags, sequence number, and where its body starts
# and ends in the datagram (a plain tuple: the readers decode ~10,000 a storm).
Frame = tuple[int, int, int, int, int]


class Malformed(ValueError):
    """A netlink message that cannot be read; the message says why."""


def split(data: bytes | memoryview) -> tuple[list[Frame], str]:
    """The messages of one datagram, and why the rest of it was skipped
    ("" if nothing was).  An NLMSG_ERROR message always holds its code."""
    frames: list[Frame] = []
    size = len(data)
    offset = 0
    unpack, header = HEADER.unpack_from, HEADER.size  # locals: ~10,000 messages a storm
    while offset < size:
        if size - offset < header:
            return frames, f"{size - offset} stray bytes at byte {offset}"
        length, kind, flags, seq, _ = unpack(data, offset)
        if length < header or length > size - offset:
            return frames, (
                f"message of length {length} at byte {offset} does not fit"
                f" the {size - offset} bytes left (truncated)"
            )
        if kind == NLMSG_ERROR and length < header + ERROR.size:
            return frames, f"error message of length {length} at byte {offset} has no code"
        frames.append((kind, flags, seq, offset + header, offset + length))
        offset += (length + 3) & ~3
    return frames, ""


def error_code(data: bytes | memoryview, frame: Frame) -> int:
    """The errno an NLMSG_ERROR message carries (0: an acknowledgement)."""
    return -int(ERROR.unpack_from(data, frame[3])[0])


@dataclass
class Malformations:
    """One reader's malformed datagrams: counted, the first one logged."""

    source: str
    count: int = 0
    last: str = ""

    def note(self, reason: str) -> None:
        self.count += 1
        self.last = reason
        if self.count == 1:
            log.warning(
                "%s: skipped a malformed netlink datagram (%s); later ones are only counted",
                self.source,
                reason,
            )


def open_socket(
    protocol: int,
    rcvbuf: int | None = None,
    groups: int = 0,
    memberships: Iterable[int] = (),
    blocking: bool = False,
) -> socket.socket:
    """A bound netlink socket of `protocol`, subscribed to `groups` (a
    bitmask of the first 32) and `memberships` (group numbers), with a
    receive buffer of `rcvbuf` bytes; closed again if any step fails."""
    kind = socket.SOCK_RAW | socket.SOCK_CLOEXEC | (0 if blocking else socket.SOCK_NONBLOCK)
    sock = socket.socket(socket.AF_NETLINK, kind, protocol)
    try:
        if rcvbuf is not None:
            try:
                # FORCE goes past net.core.rmem_max (needs CAP_NET_ADMIN).
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        # Subscribed before any request is sent: an event that races with a
        # dump comes after it, in the kernel's order.
        sock.bind((0, groups))
        for group in memberships:
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
    except BaseException:
        sock.close()
        raise
    return sock
