"""A scratch network namespace where the kernel decides packets' fate, traced.

`run_in_scratch(job)` forks a child that moves into a new network namespace
of its own (the caller's is never touched: the child checks it left before
it changes anything), gives it `lo` and one other interface (`eth0`, a tun
device: what is routed there is only counted, never sent anywhere), loads
the ruleset, adds `meta nftrace set 1` in front (its own table, hooked
before every other chain), and runs the job.  The namespace goes when the
child exits.

`Scratch.send(packets)` sends each packet class's representative from a raw
socket opened as the class's uid (the kernel's `meta skuid` reads the
socket's opener), and reads the traces back: which chains and rules each
packet met, on its way out and, on `lo`, on its way back in.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import pickle
import select
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from . import nftrace
from .classes import ICMPV6, TCP, UDP, Packet
from .nft import Nft

T = TypeVar("T")
Json = dict[str, Any]
CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
SO_BINDTODEVICE = 25
TRACE_TABLE = "tailsfw_trace"
MAGIC = b"TFWP"  # bytes 8-11 of every probe's transport header
BATCH = 2048
SETUP = """link set lo up
link set eth0 up
address add 100.64.0.2/32 dev eth0
route add default dev eth0
address add 2001:db8::2/128 dev eth0 nodad
route add ::/0 dev eth0
"""
# Input is traced too: what `lo` brings back, and anything else arriving.
TRACE = [
    {"add": {"table": {"family": "inet", "name": TRACE_TABLE}}},
    *(
        {
            "add": {
                "chain": {
                    "family": "inet",
                    "table": TRACE_TABLE,
                    "name": hook,
                    "type": "filter",
                    "hook": hook,
                    "prio": -400,
                    "policy": "accept",
                }
            }
        }
        for hook in ("output", "prerouting")
    ),
    *(
        {
            "add": {
                "rule": {
                    "family": "inet",
                    "table": TRACE_TABLE,
                    "chain": hook,
                    "expr": [{"mangle": {"key": {"meta": {"key": "nftrace"}}, "value": 1}}],
                }
            }
        }
        for hook in ("output", "prerouting")
    ),
]


class ScratchError(RuntimeError):
    """The scratch namespace could not be made, or the job in it failed."""


@dataclass(frozen=True)
class Step:
    """One trace message of a packet in a tailsfw table."""

    family: str
    chain: str
    kind: str  # "rule", "return" or "policy"
    verdict: str
    target: str = ""
    handle: int = 0
    ct_state: str = ""


@dataclass(frozen=True)
class Outcome:
    """What the kernel did with one packet."""

    error: str  # why it could not be sent ("" if sent; EPERM is a refusal, not an error)
    output: tuple[Step, ...]
    input: tuple[Step, ...]
    arrived: bool = False  # it came in (from lo or the network), whatever chains it met


_libc = ctypes.CDLL(None, use_errno=True)
# The network namespace this process left for a scratch one (0: never left):
# a Scratch is made only where it differs, so that no ruleset is ever loaded
# into the caller's namespace by mistake.
_left = 0


def _netns_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def run_in_scratch(job: Callable[[], T], timeout: float = 900.0) -> T:
    """job(), run by a child process in a network namespace of its own."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(reader)
        code = 0
        try:
            home = _netns_inode()
            if _libc.unshare(CLONE_NEWNET) != 0:
                raise ScratchError(f"unshare: {os.strerror(ctypes.get_errno())}")
            if _netns_inode() == home:
                raise ScratchError("still in the caller's network namespace")
            global _left
            _left = home
            result: Any = job()
        except BaseException as e:  # carried to the parent whole
            result, code = ScratchError(f"{type(e).__name__}: {e}"), 1
        with os.fdopen(writer, "wb") as out:
            pickle.dump(result, out)
        os._exit(code)
    os.close(writer)
    data = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([reader], [], [], left)[0]:
                raise ScratchError(f"the scratch namespace's job took over {timeout:.0f} s")
            chunk = os.read(reader, 1 << 20)
            if not chunk:
                break
            data += chunk
    except BaseException:
        os.kill(pid, 9)  # our own child, by its id: its namespace goes with it
        raise
    finally:
        os.close(reader)
        os.waitpid(pid, 0)
    if not data:
        raise ScratchError("the scratch namespace's process died without an answer")
    result = pickle.loads(bytes(data))  # our own child's bytes
    if isinstance(result, ScratchError):
        raise result
    return result  # type: ignore[no-any-return]


class Scratch:
    """Inside the scratch namespace: the ruleset loaded and traced, packets sent."""

    def __init__(self, document: Json) -> None:
        if not _left or _netns_inode() == _left:
            raise ScratchError("a scratch namespace is made only by run_in_scratch")
        self.tun = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(self.tun, TUNSETIFF, struct.pack("16sH", b"eth0", IFF_TUN | IFF_NO_PI))
        subprocess.run(
            ["ip", "-batch", "-"], input=SETUP, text=True, check=True, capture_output=True
        )
        self.nft = Nft()
        self.nft.apply(document)
        self.nft.apply({"nftables": TRACE})
        self.trace = nftrace.open_socket()
        self.sockets: dict[tuple[str, int, int, str, str | None], socket.socket] = {}
        self.conntrack = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)

    def send(self, packets: list[Packet]) -> list[Outcome]:
        """Each packet's outcome, in order.  New, established and inbound
        packets go in batches of their own kind, conntrack flushed between:
        one class's flow must not be another's (a protocol without ports has
        one flow per pair of addresses, whatever the uid)."""
        outcomes: dict[int, Outcome] = {}
        for kind in ((False, False), (True, False), (False, True)):
            indices = [i for i, p in enumerate(packets) if (p.established, p.inbound) == kind]
            for start in range(0, len(indices), BATCH):
                chunk = indices[start : start + BATCH]
                done = self._batch([packets[i] for i in chunk])
                outcomes.update(zip(chunk, done, strict=True))
        return [outcomes[i] for i in range(len(packets))]

    def _batch(self, packets: list[Packet]) -> list[Outcome]:
        errors = [self._send_one(i, p) for i, p in enumerate(packets)]
        if any(p.inbound for p in packets):
            time.sleep(0.05)  # what the tun device received is processed in softirq
        steps: dict[tuple[int, str], list[Step]] = {}
        current: dict[int, tuple[int, str] | None] = {}
        seen: set[tuple[int, str]] = set()
        for event in nftrace.read_all(self.trace):
            if event.network:  # a base chain's first message: which packet is this?
                if event.table == TRACE_TABLE:
                    key = _which(event, len(packets), "output" if event.oif else "input")
                    current[event.id] = key if key not in seen else None
                    if key is not None:
                        seen.add(key)
                        steps.setdefault(key, [])
                if event.table == TRACE_TABLE:
                    continue
            key = current.get(event.id)
            entered = event.kind == "rule" and not event.handle  # a chain's packet dump
            if key is not None and event.table != TRACE_TABLE and not entered:
                steps.setdefault(key, []).append(
                    Step(
                        event.family,
                        event.chain,
                        event.kind,
                        event.verdict,
                        event.target,
                        event.handle,
                        event.ct_state,
                    )
                )
        self._flush_conntrack()
        return [
            Outcome(
                errors[i],
                tuple(steps.get((i, "output"), ())),
                tuple(steps.get((i, "input"), ())),
                (i, "input") in steps,
            )
            for i in range(len(packets))
        ]

    def _socket(self, p: Packet) -> socket.socket:
        key = (p.family, p.uid, p.proto, p.oif, p.saddr)
        sock = self.sockets.get(key)
        if sock is None:
            af = socket.AF_INET6 if p.family == "ipv6" else socket.AF_INET
            # meta skuid reads the fsuid the socket was opened with.
            _libc.setfsuid(p.uid)
            try:
                sock = socket.socket(af, socket.SOCK_RAW, p.proto)
            finally:
                _libc.setfsuid(0)
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, p.oif.encode())
            if p.saddr is not None:
                sock.bind((p.saddr, 0))
            self.sockets[key] = sock
        return sock

    def _send_one(self, index: int, p: Packet) -> str:
        if p.inbound:  # written to the tun device: the kernel receives it on eth0
            os.write(self.tun, ip_header(p, probe_bytes(index, p)))
            return ""
        sock = self._socket(p)
        if p.established:
            self._add_flow(index, p)
        # An ICMP error a reject sent to an earlier probe is pending on the
        # socket, and would be this send's answer (the packet unsent).
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        try:
            target: tuple[Any, ...] = (p.daddr, 0, 0, 0) if p.family == "ipv6" else (p.daddr, 0)
            sock.sendto(probe_bytes(index, p), target)
        except OSError as e:
            if e.errno != errno.EPERM:  # EPERM: a chain dropped it
                return errno.errorcode.get(e.errno or 0, str(e))
        return ""

    def _add_flow(self, index: int, p: Packet) -> None:
        """A conntrack entry that has seen the probe's flow both ways, with its mark."""
        code = self._conntrack_ask(flow_message(index, p, create=True))
        if code == -errno.EEXIST:  # a protocol without ports: one flow per address pair
            code = self._conntrack_ask(flow_message(index, p, create=False))
        if code:
            raise ScratchError(f"conntrack refused the flow of {p.describe()}: "
                               f"{os.strerror(-code)}")  # fmt: skip

    def _conntrack_ask(self, message: bytes) -> int:
        """Send one request, return its answer's error code (0: done)."""
        self.conntrack.send(message)
        return int(struct.unpack_from("=i", self.conntrack.recv(4096), 16)[0])

    def _flush_conntrack(self) -> None:
        """Forget the flows the batch made: the next one starts new, and the
        table never fills (a full table drops packets before any chain)."""
        header = struct.pack("=IHHII", 20, (1 << 8) | 2, 0x1 | 0x4, 0, 0)
        self.conntrack.send(header + struct.pack("=BBH", 0, 0, 0))
        self.conntrack.recv(4096)


def _nla(kind: int, value: bytes) -> bytes:
    data = struct.pack("=HH", 4 + len(value), kind) + value
    return data + b"\0" * (-len(data) % 4)


def _tuple(p: Packet, sport: int, reply: bool) -> bytes:
    """CTA_TUPLE_IP and CTA_TUPLE_PROTO (linux/netfilter/nfnetlink_conntrack.h)."""
    af = socket.AF_INET6 if p.family == "ipv6" else socket.AF_INET
    src, dst = socket.inet_pton(af, p.saddr or ""), socket.inet_pton(af, p.daddr)
    if reply:
        src, dst = dst, src
    first = 3 if p.family == "ipv6" else 1  # CTA_IP_V6_SRC or CTA_IP_V4_SRC
    ip = _nla(first, src) + _nla(first + 1, dst)
    proto = _nla(1, bytes([p.proto]))
    if p.proto in (TCP, UDP):
        ports = (p.dport or 0, sport) if reply else (sport, p.dport or 0)
        proto += _nla(2, struct.pack("!H", ports[0])) + _nla(3, struct.pack("!H", ports[1]))
    return _nla(1 | NESTED, ip) + _nla(2 | NESTED, proto)


NESTED = 0x8000


def flow_message(index: int, p: Packet, create: bool) -> bytes:
    """IPCTNL_MSG_CT_NEW: the probe's flow, seen both ways (TCP: established)."""
    sport = 20000 + index % BATCH
    attrs = (
        _nla(1 | NESTED, _tuple(p, sport, False))  # CTA_TUPLE_ORIG
        + _nla(2 | NESTED, _tuple(p, sport, True))  # CTA_TUPLE_REPLY
        # CTA_STATUS: SEEN_REPLY and ASSURED; with the bits the kernel has
        # set by then (CONFIRMED, SRC_ and DST_NAT_DONE), else it says EBUSY.
        + _nla(3, struct.pack("!I", 0x2 | 0x4 | 0x8 | 0x80 | 0x100))
        + _nla(7, struct.pack("!I", 600))  # CTA_TIMEOUT
        + _nla(8, struct.pack("!I", p.mark))  # CTA_MARK
    )
    if p.proto == TCP:  # CTA_PROTOINFO_TCP: state ESTABLISHED, window checks off
        liberal = struct.pack("BB", 0x08, 0x08)
        tcp = _nla(1, bytes([3])) + _nla(4, liberal) + _nla(5, liberal)
        attrs += _nla(4 | NESTED, _nla(1 | NESTED, tcp))
    af = socket.AF_INET6 if p.family == "ipv6" else socket.AF_INET
    body = struct.pack("=BBH", af, 0, 0) + attrs
    flags = 0x1 | 0x4 | (0x400 | 0x200 if create else 0)  # REQUEST, ACK, CREATE, EXCL
    return struct.pack("=IHHII", 16 + len(body), (1 << 8) | 0, flags, 0, 0) + body


def ip_header(p: Packet, payload: bytes) -> bytes:
    """An IP header from p.saddr to p.daddr around the payload (inbound probes)."""
    if p.family == "ipv6":
        src, dst = (socket.inet_pton(socket.AF_INET6, a) for a in (p.saddr or "", p.daddr))
        return struct.pack("!IHBB", 6 << 28, len(payload), p.proto, 64) + src + dst + payload
    src, dst = (socket.inet_aton(a) for a in (p.saddr or "", p.daddr))
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, p.proto, 0,
                         src, dst)  # fmt: skip
    total = sum(struct.unpack("!10H", header))
    total = (total & 0xFFFF) + (total >> 16)
    checksum = ~((total & 0xFFFF) + (total >> 16)) & 0xFFFF
    return header[:10] + struct.pack("!H", checksum) + header[12:] + payload


def probe_bytes(index: int, p: Packet) -> bytes:
    """The transport header and payload of one probe, tagged with its index."""
    dport = p.dport or 0
    tag = MAGIC + struct.pack("!I", index)
    sport = 20000 + index % BATCH
    if p.proto == TCP:
        flags = 0x02 if p.syn else 0x10  # SYN, or ACK
        return struct.pack("!HHI4sBBHHH", sport, dport, index, MAGIC, 5 << 4, flags, 1024, 0, 0)
    if p.family == "ipv6" and p.proto == ICMPV6:
        return struct.pack("!BBHI", 128, 0, 0, index) + tag  # echo request
    if p.proto == 1:
        return struct.pack("!BBHI", 8, 0, dport, index) + tag  # echo request
    if p.proto == UDP:  # conntrack reads a wrong length as invalid (and nat skips it)
        return struct.pack("!HHHH", sport, dport, 16, 0) + tag
    return struct.pack("!HHI", sport, dport, 0) + tag


def _which(event: nftrace.Event, count: int, hook: str) -> tuple[int, str] | None:
    """The probe a traced packet is, by the tag in its transport header."""
    th = event.transport
    if len(th) < 16 or th[8:12] != MAGIC:
        return None
    protocol = event.network[9] if event.family == "ip" else _ipv6_next(event.network)
    raw = th[4:8] if protocol == TCP else th[12:16]
    index = int.from_bytes(raw, "big")
    return (index, hook) if index < count else None


def _ipv6_next(header: bytes) -> int:
    return header[6] if len(header) > 6 else -1
