"""Crafting NFLOG messages as the kernel sends them (nfnetlink_log.c), for unit tests."""

from __future__ import annotations

import socket
import struct

from tailsfw.nflog import (
    MSG_PACKET,
    NFULA_GID,
    NFULA_IFINDEX_OUTDEV,
    NFULA_PACKET_HDR,
    NFULA_PAYLOAD,
    NFULA_PREFIX,
    NFULA_SEQ,
    NFULA_TIMESTAMP,
    NFULA_UID,
)

PREFIX = "Dropped outbound packet: "


def attr(kind: int, value: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(value), kind) + value + b"\0" * (-len(value) % 4)


def ipv4(protocol: int, src: str, dst: str, transport: bytes, *, fragment: int = 0,
         total: int | None = None, ihl: int = 5) -> bytes:  # fmt: skip
    options = b"\0" * ((ihl - 5) * 4)
    length = total if total is not None else 20 + len(options) + len(transport)
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, length, 1, fragment, 64, protocol, 0,
                         socket.inet_pton(socket.AF_INET, src),
                         socket.inet_pton(socket.AF_INET, dst))  # fmt: skip
    return header + options + transport


def ipv6(next_header: int, src: str, dst: str, rest: bytes, payload: int | None = None) -> bytes:
    header = struct.pack("!IHBB16s16s", 6 << 28, len(rest) if payload is None else payload,
                         next_header, 64, socket.inet_pton(socket.AF_INET6, src),
                         socket.inet_pton(socket.AF_INET6, dst))  # fmt: skip
    return header + rest


def ports(sport: int, dport: int) -> bytes:
    return struct.pack("!HH", sport, dport) + b"\0" * 16


def packet_message(
    payload: bytes | None,
    *,
    family: int = socket.AF_INET,
    prefix: str | None = PREFIX,
    uid: int | None = 1000,
    gid: int | None = 1001,  # never the uid: a uid/gid swap shows
    outdev: int | None = 2,
    seq: int | None = 0,
    timestamp: tuple[int, int] | None = None,
    group: int = 0,
) -> bytes:
    """One NFLOG packet message, attributes in the kernel's order."""
    body = struct.pack("!BBH", family, 0, group)
    body += attr(NFULA_PACKET_HDR, struct.pack("!HBx", 0x0800, 3))
    if prefix is not None:
        body += attr(NFULA_PREFIX, prefix.encode() + b"\0")
    if outdev is not None:
        body += attr(NFULA_IFINDEX_OUTDEV, struct.pack("!I", outdev))
    if timestamp is not None:
        body += attr(NFULA_TIMESTAMP, struct.pack("!QQ", *timestamp))
    if uid is not None:
        body += attr(NFULA_UID, struct.pack("!I", uid))
    if gid is not None:
        body += attr(NFULA_GID, struct.pack("!I", gid))
    if seq is not None:
        body += attr(NFULA_SEQ, struct.pack("!I", seq))
    if payload is not None:
        body += attr(NFULA_PAYLOAD, payload)
    return struct.pack("=IHHII", 16 + len(body), MSG_PACKET, 0, 0, 0) + body
