"""A scratch network namespace where the kernel decides packets' fate, traced.

`run_in_scratch(job)` forks a child that moves into a new network namespace
of its own (the caller's is never touched: the child checks it left before
it changes anything), and runs the job there.  The namespace goes when the
child exits.

`Scratch(document, links)` gives the namespace `lo`, `eth0` and one
interface per link (each application namespace's host veth, `veth-NAME`),
all tun devices: what is written to one arrives on it, what the kernel
sends through one is read back, never sent anywhere.  The namespace
forwards (its own `ip_forward`), so that the forward chain decides what
arrives from a link.  It loads the ruleset and adds `meta nftrace set 1`
in front (its own table, hooked before every other chain).

`Scratch.send(packets)` sends each packet class's representative: from a
raw socket opened as the class's uid (the kernel's `meta skuid` reads the
socket's opener), or written to the tun device it arrives on; and reads
the traces back: which chains and rules each packet met, on its way out
and, on `lo`, on its way back in; and, for what it forwarded, how the
packet left (interface, source, TTL).
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from . import nftrace
from .classes import ICMPV6, OTHER_INTERFACE, TCP, UDP, Link, Packet
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


FORWARDING = (
    ("ipv4/ip_forward", "1"),
    ("ipv4/conf/all/rp_filter", "0"),
    ("ipv4/conf/default/rp_filter", "0"),
    ("ipv6/conf/all/forwarding", "1"),  # the ip6 forward chain decides, not the routing
)


def _link_setup(links: Sequence[Link]) -> str:
    """Each link up with its host address; its /30 routed through it (as a
    route, not the address's prefix: no broadcast address, every address
    of the /30 is a class like the others)."""
    return "".join(
        f"link set {k.name} up\naddress add {k.host}/32 dev {k.name}\n"
        f"route add {k.network} dev {k.name}\n"
        for k in links
    )


def _tun(name: str) -> int:
    """A tun device: what is written to it arrives on it; what the kernel
    sends through it is read back (never sent anywhere)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


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
    left: str = ""  # arrived and forwarded: "out on IFACE from SADDR ttl N"


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

    def __init__(self, document: Json, links: Sequence[Link] = ()) -> None:
        if not _left or _netns_inode() == _left:
            raise ScratchError("a scratch namespace is made only by run_in_scratch")
        # This namespace's own settings (never the caller's: checked above).
        # It forwards, so that the forward chain decides what the links
        # send; no reverse-path filter: spoofed sources are classes too.
        for name, value in FORWARDING:
            Path("/proc/sys/net", name).write_text(value)
        self.tuns = {name: _tun(name) for name in [OTHER_INTERFACE, *(k.name for k in links)]}
        self.tun = self.tuns[OTHER_INTERFACE]
        subprocess.run(["ip", "-batch", "-"], input=SETUP + _link_setup(links), text=True,
                       check=True, capture_output=True)  # fmt: skip
        self.left: dict[int, str] = {}
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
        for kind in ((False, False), (True, False), (False, True), (True, True)):
            indices = [i for i, p in enumerate(packets) if (p.established, p.inbound) == kind]
            for start in range(0, len(indices), BATCH):
                chunk = indices[start : start + BATCH]
                done = self._batch([packets[i] for i in chunk])
                outcomes.update(zip(chunk, done, strict=True))
        return [outcomes[i] for i in range(len(packets))]

    def _batch(self, packets: list[Packet]) -> list[Outcome]:
        self._drain(0)  # what earlier batches sent through the devices
        self.left = {}
        errors = [self._send_one(i, p) for i, p in enumerate(packets)]
        if any(p.inbound for p in packets):
            time.sleep(0.05)  # what the tun device received is processed in softirq
            self._drain(len(packets))
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
                self.left.get(i, ""),
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
        if p.inbound:
            # Each its own flow: two sources masqueraded to one (a protocol
            # without ports) would clash in conntrack, and the second be dropped.
            self._flush_conntrack()
        if p.established:
            self._add_flow(index, p)
        if p.inbound:  # written to a tun device: the kernel receives it on that interface
            os.write(self.tuns[p.oif], ip_header(p, probe_bytes(index, p)))
            # Read at once what it sent on (a device holds 500 packets).
            self._drain(index + 1)
            return ""
        sock = self._socket(p)
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

    def _drain(self, count: int) -> None:
        """Read what the kernel sent through the tun devices; each of the
        first `count` probes' way out is kept: the interface, its source,
        its TTL."""
        for name, fd in self.tuns.items():
            while True:
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if len(data) < 20 or data[0] >> 4 != 4:
                    continue
                index = _index(data[9], data[(data[0] & 15) * 4 :])
                if index is not None and index < count:
                    source = socket.inet_ntoa(data[12:16])
                    self.left[index] = f"out on {name} from {source} ttl {data[8]}"

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
    """IPCTNL_MSG_CT_NEW: the probe's flow, seen both ways (TCP: established).
    An inbound probe is the reply: the flow was begun by its destination."""
    sport = 20000 + index % BATCH
    attrs = (
        _nla(1 | NESTED, _tuple(p, sport, p.inbound))  # CTA_TUPLE_ORIG
        + _nla(2 | NESTED, _tuple(p, sport, not p.inbound))  # CTA_TUPLE_REPLY
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


def _checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    data += b"\0" * (len(data) % 2)
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ip_header(p: Packet, payload: bytes) -> bytes:
    """An IP header from p.saddr to p.daddr around the payload (inbound
    probes), TTL 64; an IPv4 TCP probe gets its checksum (conntrack reads a
    wrong one as invalid, and nat then leaves the packet alone)."""
    if p.family == "ipv6":
        src, dst = (socket.inet_pton(socket.AF_INET6, a) for a in (p.saddr or "", p.daddr))
        return struct.pack("!IHBB", 6 << 28, len(payload), p.proto, 64) + src + dst + payload
    src, dst = (socket.inet_aton(a) for a in (p.saddr or "", p.daddr))
    if p.proto == TCP:
        pseudo = src + dst + struct.pack("!BBH", 0, TCP, len(payload))
        payload = payload[:16] + struct.pack("!H", _checksum(pseudo + payload)) + payload[18:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, p.proto, 0,
                         src, dst)  # fmt: skip
    return header[:10] + struct.pack("!H", _checksum(header)) + header[12:] + payload


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
    if p.proto == 1:  # an echo request; without a port, its own checksum there
        body = struct.pack("!I", index) + tag
        if p.dport is None:
            dport = _checksum(struct.pack("!BBH", 8, 0, 0) + body)
        return struct.pack("!BBH", 8, 0, dport) + body
    if p.proto == UDP:  # conntrack reads a wrong length as invalid (and nat skips it)
        return struct.pack("!HHHH", sport, dport, 16, 0) + tag
    return struct.pack("!HHI", sport, dport, 0) + tag


def _which(event: nftrace.Event, count: int, hook: str) -> tuple[int, str] | None:
    """The probe a traced packet is, by the tag in its transport header."""
    protocol = event.network[9] if event.family == "ip" else _ipv6_next(event.network)
    index = _index(protocol, event.transport)
    return (index, hook) if index is not None and index < count else None


def _index(protocol: int, th: bytes) -> int | None:
    """The probe's index, from the tag in its transport header (nat may
    rewrite its ports and ICMP's identifier, never the tag)."""
    if len(th) < 16 or th[8:12] != MAGIC:
        return None
    return int.from_bytes(th[4:8] if protocol == TCP else th[12:16], "big")


def _ipv6_next(header: bytes) -> int:
    return header[6] if len(header) > 6 else -1
