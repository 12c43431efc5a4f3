"""nftables' packet traces (`meta nftrace set 1`), read from the kernel.

A traced packet makes the kernel send one NFT_MSG_TRACE message to the
netlink group NFNLGRP_NFTRACE for every rule it meets that gives a verdict,
every chain it returns from, and every base chain's policy.  The first
message of each base chain a packet enters carries its headers.  `decode`
is pure; `open_socket` is the thin part.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from .nflog import NETLINK_NETFILTER, messages
from .nlsock import NLA_TYPE_MASK

SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNLGRP_NFTRACE = 9
SO_RCVBUFFORCE = 33  # asm-generic/socket.h; not in typeshed
NFT_MSG_TRACE = (10 << 8) | 17  # NFNL_SUBSYS_NFTABLES, NFT_MSG_TRACE
# enum nft_trace_attributes (linux/netfilter/nf_tables.h)
TABLE, CHAIN, RULE_HANDLE, TYPE, VERDICT, ID = 1, 2, 3, 4, 5, 6
NETWORK_HEADER, TRANSPORT_HEADER, IIF, OIF, NFPROTO, POLICY, CT_STATE = 8, 9, 10, 12, 15, 16, 21
NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 1, 2
# enum nft_trace_types
TRACE_TYPES = {1: "policy", 2: "return", 3: "rule"}
VERDICTS = {
    0: "drop",
    1: "accept",
    -1: "continue",
    -2: "break",
    -3: "jump",
    -4: "goto",
    -5: "return",
}
FAMILIES = {1: "inet", 2: "ip", 10: "ip6"}
CT_STATES = {1: "invalid", 2: "established", 4: "related", 8: "new", 64: "untracked"}


class TraceError(ValueError):
    """A trace message that could not be decoded."""


@dataclass(frozen=True)
class Event:
    """One trace message: what one packet met in one chain."""

    id: int
    family: str
    table: str
    chain: str
    kind: str  # "rule", "return" or "policy"
    verdict: str  # accept, drop, continue, jump, goto, return
    target: str = ""  # the chain of a jump or goto
    handle: int = 0  # the rule's handle (kind "rule")
    network: bytes = b""  # headers: only on a base chain's first message
    transport: bytes = b""
    iif: int = 0
    oif: int = 0
    ct_state: str = ""


def _attributes(data: bytes | memoryview) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4 or offset + length > len(data):
            raise TraceError(f"attribute {kind & NLA_TYPE_MASK} of length {length} overruns")
        found.setdefault(kind & NLA_TYPE_MASK, bytes(data[offset + 4 : offset + length]))
        offset += (length + 3) & ~3
    return found


def _be(value: bytes | None, signed: bool = False) -> int:
    return int.from_bytes(value or b"", "big", signed=signed)


def _text(value: bytes | None) -> str:
    return (value or b"").split(b"\0", 1)[0].decode("utf-8", "replace")


def decode(data: bytes | memoryview) -> list[Event]:
    """The trace messages of one datagram (other messages are skipped)."""
    events = []
    for message in messages(data):
        if message.kind != NFT_MSG_TRACE:
            continue
        if len(message.body) < 4:
            raise TraceError("trace message without its nfgenmsg header")
        attrs = _attributes(message.body[4:])
        verdict = _attributes(attrs.get(VERDICT, b""))
        code = _be(verdict.get(NFTA_VERDICT_CODE), signed=True)
        kind = TRACE_TYPES.get(_be(attrs.get(TYPE)), "unknown")
        if kind == "policy":
            code = _be(attrs.get(POLICY))
        state = _be(attrs.get(CT_STATE))
        events.append(
            Event(
                id=_be(attrs.get(ID)),
                family=FAMILIES.get(_be(attrs.get(NFPROTO)), "?"),
                table=_text(attrs.get(TABLE)),
                chain=_text(attrs.get(CHAIN)),
                kind=kind,
                verdict=VERDICTS.get(code, str(code)),
                target=_text(verdict.get(NFTA_VERDICT_CHAIN)),
                handle=_be(attrs.get(RULE_HANDLE)),
                network=attrs.get(NETWORK_HEADER, b""),
                transport=attrs.get(TRANSPORT_HEADER, b""),
                iif=_be(attrs.get(IIF)),
                oif=_be(attrs.get(OIF)),
                ct_state=",".join(n for bit, n in CT_STATES.items() if state & bit),
            )
        )
    return events


def open_socket(rcvbuf: int = 64 << 20) -> socket.socket:
    """A non-blocking socket subscribed to the traces of this network namespace."""
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, NETLINK_NETFILTER
    )
    try:
        sock.bind((0, 0))
        sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTRACE)
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
    except OSError:
        sock.close()
        raise
    return sock


def read_all(sock: socket.socket) -> list[Event]:
    """Every trace message waiting on the socket."""
    events: list[Event] = []
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return events
        events += decode(data)
