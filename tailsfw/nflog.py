"""The NFLOG group the ruleset logs refused packets to: a pure decoder and a thin socket.

pyroute2 has no nfnetlink_log support, so this speaks it directly: a raw
NETLINK_NETFILTER socket, subsystem ULOG.  `decode` turns one netlink
message into a `Drop` (bytes in, a typed value out, no I/O); `NflogSocket`
binds the group, asks for headers only, one message per packet, and a
sequence number on each, and reads without ever blocking.

The sequence number is how losses are counted: when the socket's receive
queue is full the kernel discards messages (the reader then gets ENOBUFS),
and the gap in the numbers says exactly how many.  UID and GID need no flag:
the kernel adds them whenever the packet belongs to a socket with an owner.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from socket import AF_INET, AF_INET6

from . import nlsock
from .nlsock import (
    ATTR,
    HEADER,
    NLA_TYPE_MASK,
    NLM_F_ACK,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_NOOP,
    NLMSG_OVERRUN,
    Malformed,
)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
MSG_PACKET = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET
MSG_CONFIG = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
NFNETLINK_V0 = 0

# Packet attributes (linux/netfilter/nfnetlink_log.h, enum nfulnl_attr_type).
NFULA_PACKET_HDR = 1
NFULA_TIMESTAMP = 3
NFULA_IFINDEX_INDEV = 4
NFULA_IFINDEX_OUTDEV = 5
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NFULA_UID = 11
NFULA_SEQ = 12
NFULA_GID = 14
# Configuration attributes and values.
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_QTHRESH = 5
NFULA_CFG_FLAGS = 6
NFULNL_CFG_CMD_BIND = 1
NFULNL_CFG_CMD_UNBIND = 2
NFULNL_COPY_PACKET = 2
NFULNL_CFG_F_SEQ = 0x0001

# Headers only: IPv4's longest header (60) or IPv6's (40) with room for
# extension headers, and the first 8 bytes of the transport header.
COPY_RANGE = 128
# Big enough for a few thousand messages (each ~0.5-1 KiB of socket memory):
# a burst waits here while the loop is busy, instead of being lost.
RCVBUF = 8 << 20

IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6 = 1, 6, 17, 58
# IPv6 extension headers walked to find the transport protocol (RFC 8200 4.1).
IPV6_EXTENSIONS = frozenset({0, 43, 60, 135, 139, 140})
IPV6_FRAGMENT, IPV6_AH, IPV6_NONE = 44, 51, 59
PROTOCOL_NAMES = {IPPROTO_TCP: "TCP", IPPROTO_UDP: "UDP", IPPROTO_ICMP: "ICMP",
                  IPPROTO_ICMPV6: "ICMPv6"}  # fmt: skip

_BE32 = struct.Struct("!I")
_BE64X2 = struct.Struct("!QQ")
_PORTS = struct.Struct("!HH")
_IPV4 = struct.Struct("!BBH4xBB2x4s4s")
_IPV6 = struct.Struct("!4xHB1x16s16s")


@dataclass(frozen=True, slots=True)
class Drop:
    """One refused packet, as the kernel reported it.

    `sport`/`dport` are set for TCP and UDP, `icmp_type`/`icmp_code` for
    ICMP and ICMPv6, when the copied headers reach that far.  `uid`/`gid`
    are None for packets no user's socket sent (the kernel's own).
    `outdev` is an interface index (0: none); names are looked up only for
    the few drops that get written.  `timestamp` is the kernel's when it
    gives one (not on the output hook), else when it was read.
    """

    family: int  # 4 or 6
    protocol: int
    src: str
    dst: str
    length: int  # the whole packet's, from its IP header
    prefix: str
    timestamp: float
    sport: int | None = None
    dport: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None
    uid: int | None = None
    gid: int | None = None
    indev: int = 0
    outdev: int = 0
    seq: int | None = None

    @property
    def protocol_name(self) -> str:
        """As the kernel's LOG target writes it: TCP, UDP, ICMP, ICMPv6, or the number."""
        return PROTOCOL_NAMES.get(self.protocol, str(self.protocol))


@dataclass(frozen=True, slots=True)
class Message:
    """One netlink message of a datagram: its type and body (after the header)."""

    kind: int
    body: memoryview


def messages(data: bytes | memoryview) -> Iterator[Message]:
    """The netlink messages of one datagram, then Malformed if the rest of
    it could not be framed (see nlsock: the messages before it stand)."""
    view = memoryview(data)
    frames, malformed = nlsock.split(view)
    for kind, _, _, body, end in frames:
        yield Message(kind, view[body:end])
    if malformed:
        raise Malformed(malformed)


def error_code(message: Message) -> int:
    """The errno of an NLMSG_ERROR message (0 for an acknowledgement;
    nlsock.split makes sure the code is there)."""
    return -int(nlsock.ERROR.unpack_from(message.body)[0])


def attributes(body: memoryview) -> dict[int, memoryview]:
    """Top-level attributes of a message body (after the 4-byte nfgenmsg)."""
    found: dict[int, memoryview] = {}
    offset = 4
    end = len(body)
    if end < offset:
        raise Malformed("no nfgenmsg header")
    unpack = ATTR.unpack_from  # a local: ~20 attributes a drop, thousands of drops a second
    while offset + 4 <= end:
        length, kind = unpack(body, offset)
        if length < 4 or offset + length > end:
            raise Malformed(f"attribute {kind & NLA_TYPE_MASK} of length {length} overruns")
        found[kind & NLA_TYPE_MASK] = body[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return found


def decode(message: Message, received: float) -> Drop:
    """A packet message -> a Drop.  Malformed (with the reason) for anything else."""
    if message.kind != MSG_PACKET:
        raise Malformed(f"message type {message.kind:#x} is not an NFLOG packet")
    attrs = attributes(message.body)
    payload = attrs.get(NFULA_PAYLOAD)
    if payload is None:
        raise Malformed("no packet payload (is the group in copy-packet mode?)")
    version = payload[0] >> 4 if len(payload) else None
    if version == 4:
        ip = _ipv4(payload)
    elif version == 6:
        ip = _ipv6(payload)
    else:
        raise Malformed(f"payload is not an IP packet (version {version})")
    timestamp = received
    if (stamp := attrs.get(NFULA_TIMESTAMP)) is not None and len(stamp) >= 16:
        sec, usec = _BE64X2.unpack_from(stamp)
        timestamp = sec + usec / 1e6
    sport = dport = icmp_type = icmp_code = None
    if ip.protocol in (IPPROTO_TCP, IPPROTO_UDP) and len(ip.transport) >= 4:
        sport, dport = _PORTS.unpack_from(ip.transport)
    elif ip.protocol in (IPPROTO_ICMP, IPPROTO_ICMPV6) and len(ip.transport) >= 2:
        icmp_type, icmp_code = ip.transport[0], ip.transport[1]
    return Drop(
        family=ip.family,
        protocol=ip.protocol,
        src=ip.src,
        dst=ip.dst,
        length=ip.length,
        prefix=bytes(attrs.get(NFULA_PREFIX, b"")).split(b"\0", 1)[0].decode(errors="replace"),
        timestamp=timestamp,
        sport=sport,
        dport=dport,
        icmp_type=icmp_type,
        icmp_code=icmp_code,
        uid=_u32(attrs, NFULA_UID),
        gid=_u32(attrs, NFULA_GID),
        indev=_u32(attrs, NFULA_IFINDEX_INDEV) or 0,
        outdev=_u32(attrs, NFULA_IFINDEX_OUTDEV) or 0,
        seq=_u32(attrs, NFULA_SEQ),
    )


@dataclass(slots=True)
class _Network:
    """The IP header's part of a Drop, and the transport header's copied bytes.

    Not frozen: it lives for one decode, and a frozen class's __init__ (one
    object.__setattr__ a field) cost ~0.5 us of each drop's ~17 us."""

    family: int
    protocol: int
    src: str
    dst: str
    length: int
    transport: memoryview


def _u32(attrs: dict[int, memoryview], kind: int) -> int | None:
    value = attrs.get(kind)
    if value is None:
        return None
    if len(value) < 4:
        raise Malformed(f"attribute {kind} is {len(value)} bytes, not 4")
    return int(_BE32.unpack_from(value)[0])


def _ipv4(packet: memoryview) -> _Network:
    if len(packet) < 20:
        raise Malformed(f"IPv4 header truncated to {len(packet)} bytes")
    first, _tos, length, frag_hi, protocol, src, dst = _IPV4.unpack_from(packet)
    header = (first & 0x0F) * 4
    if header < 20:
        raise Malformed(f"IPv4 header length {header} is below 20")
    # Only the first fragment carries the transport header.
    fragment_offset = ((frag_hi & 0x1F) << 8) | packet[7]
    transport = packet[header:] if fragment_offset == 0 else packet[:0]
    ntop = socket.inet_ntop
    return _Network(4, protocol, ntop(AF_INET, src), ntop(AF_INET, dst), length, transport)


def _ipv6(packet: memoryview) -> _Network:
    if len(packet) < 40:
        raise Malformed(f"IPv6 header truncated to {len(packet)} bytes")
    payload_length, protocol, src, dst = _IPV6.unpack_from(packet)
    offset = 40
    transport = packet[:0]
    while True:
        if protocol in IPV6_EXTENSIONS or protocol == IPV6_AH:
            if offset + 2 > len(packet):
                break  # cut by the copy range: the protocol is the last known header
            units = packet[offset + 1]
            size = (units + 2) * 4 if protocol == IPV6_AH else (units + 1) * 8
            protocol = packet[offset]
            offset += size
        elif protocol == IPV6_FRAGMENT:
            if offset + 8 > len(packet):
                break
            later_fragment = (packet[offset + 2] << 8 | packet[offset + 3]) & 0xFFF8
            protocol = packet[offset]
            offset += 8
            if later_fragment:
                break
        else:
            if protocol != IPV6_NONE:
                transport = packet[offset:]
            break
    ntop = socket.inet_ntop
    return _Network(6, protocol, ntop(AF_INET6, src), ntop(AF_INET6, dst), payload_length + 40,
                    transport)  # fmt: skip


def config_message(group: int, *attrs: tuple[int, bytes], seq: int = 0) -> bytes:
    """An NFULNL_MSG_CONFIG request for `group`, asking for an acknowledgement."""
    body = struct.pack("!BBH", socket.AF_UNSPEC, NFNETLINK_V0, group)
    for kind, value in attrs:
        body += ATTR.pack(4 + len(value), kind) + value + b"\0" * (-len(value) % 4)
    return HEADER.pack(16 + len(body), MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def bind_messages(group: int, copy_range: int = COPY_RANGE) -> list[bytes]:
    """Bind the group, copy `copy_range` bytes of each packet, flush every
    message at once (the default batches for up to a second), number them."""
    return [
        config_message(group, (NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND])), seq=1),
        config_message(
            group,
            (NFULA_CFG_MODE, struct.pack("!IBx", copy_range, NFULNL_COPY_PACKET)),
            (NFULA_CFG_QTHRESH, _BE32.pack(1)),
            (NFULA_CFG_FLAGS, struct.pack("!H", NFULNL_CFG_F_SEQ)),
            seq=2,
        ),
    ]


def sequence_gap(expected: int | None, seq: int) -> int:
    """Messages the kernel numbered but never delivered, before `seq`."""
    return 0 if expected is None else (seq - expected) & 0xFFFFFFFF


@dataclass
class Batch:
    """What one read of the socket gave."""

    drops: list[Drop]
    malformed: list[str]  # why each skipped message was refused
    overruns: int = 0  # ENOBUFS: the kernel discarded messages
    lost: int = 0  # how many, from the sequence numbers
    more: bool = False  # stopped at the limit with data still queued


class NflogError(OSError):
    """The group could not be bound or configured; says which and why."""


class NflogSocket:
    """The group's socket: bound and configured on creation, then nonblocking."""

    def __init__(self, group: int, copy_range: int = COPY_RANGE, rcvbuf: int = RCVBUF) -> None:
        self.group = group
        self._expected: int | None = None
        self._buffer = bytearray(1 << 16)
        self.malformed = nlsock.Malformations("nflog")
        self.sock = nlsock.open_socket(NETLINK_NETFILTER, rcvbuf, blocking=True)
        try:
            self.sock.settimeout(2.0)
            for request in bind_messages(group, copy_range):
                self.sock.send(request)
                self._wait_ack(request)
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise

    def _wait_ack(self, request: bytes) -> None:
        seq = HEADER.unpack_from(request)[3]
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                raise NflogError(errno.ETIMEDOUT, f"NFLOG group {self.group}: no answer") from None
            for message in messages(data):
                if message.kind != NLMSG_ERROR:
                    continue  # a packet already: the bind took
                code = error_code(message)
                # The error message quotes the request's header after the code.
                quoted = message.body[4:20]
                if len(quoted) == 16 and HEADER.unpack_from(quoted)[3] != seq:
                    continue
                if code in (errno.EBUSY, errno.EPERM):
                    raise NflogError(
                        code,
                        f"NFLOG group {self.group} is bound by another process"
                        " (or this one lacks CAP_NET_ADMIN)",
                    )
                if code:
                    raise NflogError(
                        code, f"NFLOG group {self.group}: configuration refused: {os_error(code)}"
                    )
                return

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()  # the kernel unbinds the group when its socket closes

    def read(self, received: float, limit: int = 256) -> Batch:
        """Up to `limit` datagrams that are already queued; never blocks."""
        batch = Batch([], [])
        for _ in range(limit):
            try:
                size = self.sock.recv_into(self._buffer)
            except BlockingIOError:
                return batch
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                batch.overruns += 1
                continue
            self._take(memoryview(self._buffer)[:size], received, batch)
        batch.more = True
        return batch

    def _take(self, data: memoryview, received: float, batch: Batch) -> None:
        try:
            for message in messages(data):
                if message.kind in (NLMSG_DONE, NLMSG_NOOP):
                    continue
                if message.kind == NLMSG_OVERRUN:
                    batch.overruns += 1
                    continue
                try:
                    drop = decode(message, received)
                except Malformed as e:
                    self._malformed(str(e), batch)
                    continue
                if drop.seq is not None:
                    batch.lost += sequence_gap(self._expected, drop.seq)
                    self._expected = (drop.seq + 1) & 0xFFFFFFFF
                batch.drops.append(drop)
        except Malformed as e:
            self._malformed(str(e), batch)

    def _malformed(self, reason: str, batch: Batch) -> None:
        batch.malformed.append(reason)
        self.malformed.note(reason)


def os_error(code: int) -> str:
    return f"{errno.errorcode.get(code, str(code))} ({os.strerror(code)})"
