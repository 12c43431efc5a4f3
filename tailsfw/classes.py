"""The classes of packets a ruleset tells apart, read from the ruleset itself.

Every match of the ruleset compares a packet's field with constants: a uid,
a protocol, a port, an address, a prefix, a range, a set or a map's keys.
Those constants cut each field's range of values into cells: between two
consecutive boundaries, every rule answers the same for every value.  A
packet class is one cell of each field; one packet per class, sent through
the kernel, shows what the ruleset does with every packet of that class.

Representatives: the lowest and the highest value of each address and port
cell (so both sides of every boundary are sent), one value of each uid and
protocol cell (the ruleset compares them for equality: the uids it names and
one it does not).  Besides new outgoing packets: packets of established
flows (every uid and ct mark cell, sampled over ports and protocols) and
packets arriving from the network.  Only this module reads the ruleset's
matches; it knows nothing of the compiler.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

Json = dict[str, Any]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# Protocol names nft may list instead of numbers.
PROTOCOLS = {
    "icmp": 1,
    "igmp": 2,
    "tcp": 6,
    "udp": 17,
    "dccp": 33,
    "gre": 47,
    "esp": 50,
    "ah": 51,
    "icmpv6": 58,
    "ipv6-icmp": 58,
    "sctp": 132,
    "udplite": 136,
}
NAMES = {1: "icmp", 6: "tcp", 17: "udp", 33: "dccp", 58: "icmpv6", 132: "sctp", 136: "udplite"}
TCP, UDP, ICMPV6 = 6, 17, 58
# Protocol numbers never used as a representative: the kernel reads them as
# IPv6 extension headers or handles them itself (IGMP, IPsec, tunnels).
AVOID_PROTO = frozenset({0, 2, 4, 41, 43, 44, 50, 51, 59, 60, 135, 139, 140, 255})
# Destinations the kernel rewrites or routes apart; an address cell's end in
# them is replaced by the nearest address of the cell outside them.
SPECIAL = {
    "ipv4": [ipaddress.ip_network("0.0.0.0/8"), ipaddress.ip_network("224.0.0.0/3")],
    "ipv6": [ipaddress.ip_network("::/128"), ipaddress.ip_network("ff00::/8")],
}
BITS = {"ipv4": 32, "ipv6": 128}
ADDRESS = {"ipv4": ipaddress.IPv4Address, "ipv6": ipaddress.IPv6Address}
LOOPBACK = {"ipv4": ipaddress.ip_network("127.0.0.0/8"), "ipv6": ipaddress.ip_network("::1/128")}
# The scratch namespace's own addresses (tailsfw/scratch.py gives them):
# the sources a class may name when the ruleset matches sources.
LOCAL = {"ipv4": ("127.0.0.1", "100.64.0.2"), "ipv6": ("::1", "2001:db8::2")}
OTHER_INTERFACE = "eth0"


@dataclass(frozen=True, order=True)
class Packet:
    """One packet class's representative: what is sent, as whom, where."""

    family: str  # "ipv4" or "ipv6"
    uid: int
    daddr: str
    proto: int
    dport: int | None  # bytes 2-3 of the transport header; None: the kernel writes them
    syn: bool = True  # TCP: SYN alone of FIN, SYN, RST, ACK (a new connection); else ACK
    oif: str = "lo"  # the interface the route takes: "lo" or OTHER_INTERFACE; inbound: in on
    saddr: str | None = None  # None: the kernel's choice
    established: bool = False  # a flow conntrack has seen both ways
    mark: int = 0  # the flow's ct mark (established only)
    inbound: bool = False  # arriving on oif from saddr, to daddr (here, or forwarded)

    def describe(self) -> str:
        proto = NAMES.get(self.proto, f"protocol {self.proto}")
        if self.proto == TCP:
            proto += " SYN" if self.syn else " ACK"
        where = self.daddr if self.dport is None else f"{self.daddr} port {self.dport}"
        source = f" from {self.saddr}" if self.saddr else ""
        flow = f", established (ct mark {self.mark})" if self.established else ""
        if self.inbound:
            flow = ", a reply" if self.established else ""
            return f"{proto} from {self.saddr} to {where} in on {self.oif}{flow}"
        return f"uid {self.uid} {proto} to {where}{source} on {self.oif}{flow}"


@dataclass
class Fields:
    """Each field's (low, high) spans the ruleset compares it with."""

    spans: dict[str, set[tuple[int, int]]] = field(default_factory=dict)
    syn: bool = False  # the ruleset reads TCP flags
    state: bool = False  # the ruleset reads conntrack's state
    interfaces: bool = False  # the ruleset reads the output interface

    def add(self, name: str, low: int, high: int) -> None:
        self.spans.setdefault(name, set()).add((low, high))


def _family(table_family: str) -> str:
    return "ipv6" if table_family == "ip6" else "ipv4"


def _field(left: Any, family: str) -> str | None:
    """The field a match's left side reads, as this module names it."""
    if not isinstance(left, dict):
        return None
    if "ct" in left:
        return {"mark": "mark", "state": "state"}.get(left["ct"]["key"])
    if "meta" in left:
        key = left["meta"]["key"]
        return {
            "skuid": "uid",
            "l4proto": "proto",
            "oif": "oif",
            "oifname": "oif",
            "nfproto": None,
        }.get(key)
    if "payload" in left:
        payload = left["payload"]
        name = payload.get("field")
        if name == "dport":
            return "dport"
        if name in ("saddr", "daddr") and payload.get("protocol") in ("ip", "ip6"):
            return f"{name}_{family}"
    return None


def _implied_proto(left: Any) -> int | None:
    """`tcp dport` also says the protocol is TCP."""
    if isinstance(left, dict) and "payload" in left:
        return PROTOCOLS.get(str(left["payload"].get("protocol")))
    return None


@dataclass(frozen=True)
class Link:
    """An interface of the scratch namespace besides `lo` and `eth0`: an
    application namespace's host veth, holding `host`, with the namespace's
    /30 `network` routed through it (its guest at `guest`)."""

    name: str
    host: str
    guest: str
    network: str


@dataclass(frozen=True)
class _Rule:
    table_family: str
    hooks: frozenset[str]  # the hooks whose base chains reach its chain
    iifs: frozenset[str] | None  # the input interfaces it can match (None: any)
    expr: tuple[Json, ...]


OUT_HOOKS = frozenset({"output", "postrouting"})
BACK_HOOKS = frozenset({"prerouting", "input"})  # what lo brings back
IN_HOOKS = frozenset({"prerouting", "input", "forward", "postrouting"})


def _iifs(expr: Iterable[Json]) -> frozenset[str] | None:
    """The input interfaces a rule's `iifname ==`/`iif ==` matches allow."""
    found: frozenset[str] | None = None
    for e in expr:
        m = e.get("match") if isinstance(e, dict) else None
        if not isinstance(m, dict) or m.get("op", "==") != "==":
            continue
        left, right = m["left"], m["right"]
        if not (isinstance(left, dict) and left.get("meta", {}).get("key") in ("iif", "iifname")):
            continue
        names = frozenset(right["set"] if isinstance(right, dict) and "set" in right else [right])
        found = names if found is None else found & names
    return found


def _targets(value: Any, named: dict[tuple[str, str], list[Any]], family: str) -> Iterator[str]:
    """The chains a rule's verdicts (and its verdict maps') jump or go to."""
    if isinstance(value, dict):
        for kind in ("jump", "goto"):
            if isinstance(value.get(kind), dict):
                yield value[kind]["target"]
        for item in value.values():
            yield from _targets(item, named, family)
    elif isinstance(value, list):
        for item in value:
            yield from _targets(item, named, family)
    elif isinstance(value, str) and value.startswith("@"):
        yield from _targets(named.get((family, value[1:]), []), named, family)


class _Reader:
    """Walks every rule and map of a ruleset (compiled or listed) for
    constants, each rule with the hooks that reach it and the input
    interfaces it can match: a rule that cannot see a packet cuts none of
    its fields."""

    def __init__(self, objects: Iterable[Json]) -> None:
        objects = [o for o in objects if "metainfo" not in o]
        self.named: dict[tuple[str, str], list[Any]] = {}
        hooks: dict[tuple[str, str, str], set[str]] = {}
        raw: list[Json] = []
        for obj in objects:
            kind, body = next(iter(obj.items()))
            if kind in ("set", "map"):
                self.named[(body["family"], body["name"])] = list(body.get("elem", []))
            elif kind == "chain":
                key = (body["family"], body["table"], body["name"])
                hooks.setdefault(key, set()).update([body["hook"]] if "hook" in body else [])
            elif kind == "rule":
                raw.append(body)
        changed = True
        while changed:  # the hooks flow down jumps and gotos to a fixed point
            changed = False
            for r in raw:
                mine = hooks.get((r["family"], r["table"], r["chain"]), set())
                for target in _targets(r["expr"], self.named, r["family"]):
                    theirs = hooks.setdefault((r["family"], r["table"], target), set())
                    if not mine <= theirs:
                        theirs |= mine
                        changed = True
        self.rules = [
            _Rule(
                r["family"],
                frozenset(hooks.get((r["family"], r["table"], r["chain"]), ())),
                _iifs(r["expr"]),
                tuple(r["expr"]),
            )
            for r in raw
        ]
        self.fields = {"ipv4": Fields(), "ipv6": Fields()}

    def read(self, sees: Callable[[_Rule], bool]) -> dict[str, Fields]:
        """The fields the rules `sees` keeps compare."""
        self.fields = {"ipv4": Fields(), "ipv6": Fields()}
        for rule in self.rules:
            if sees(rule):
                for expr in rule.expr:
                    self.expression(expr, rule.table_family)
        return self.fields

    def expression(self, expr: Json, table_family: str) -> None:
        family = _family(table_family)
        fields = self.fields[family]
        if "match" in expr:
            left, right = expr["match"]["left"], expr["match"]["right"]
            if isinstance(left, dict) and "&" in left:  # tcp flags & mask
                fields.syn = True
                fields.add("proto", TCP, TCP)
                return
            self.compare(family, left, right, table_family)
        elif "vmap" in expr:
            data = expr["vmap"]["data"]
            elements = self.elements(data, table_family)
            keys = [e[0] if isinstance(e, list) else e for e in elements]
            self.compare(family, expr["vmap"]["key"], {"set": keys}, table_family)

    def elements(self, right: Any, table_family: str) -> list[Any]:
        if isinstance(right, str) and right.startswith("@"):
            found = self.named.get((table_family, right[1:]), [])
            return [e["elem"]["val"] if isinstance(e, dict) and "elem" in e else e for e in found]
        if isinstance(right, dict) and "set" in right:
            return list(right["set"])
        return [right]

    def compare(self, family: str, left: Any, right: Any, table_family: str) -> None:
        values = self.elements(right, table_family)
        if isinstance(left, dict) and "concat" in left:
            parts = left["concat"]
            for value in values:
                value = value.get("concat", value) if isinstance(value, dict) else value
                if isinstance(value, list) and len(value) == len(parts):
                    for part, item in zip(parts, value, strict=True):
                        self.one(family, part, item)
            return
        for value in values:
            self.one(family, left, value)

    def one(self, family: str, left: Any, value: Any) -> None:
        fields = self.fields[family]
        implied = _implied_proto(left)
        if implied is not None:
            fields.add("proto", implied, implied)
        name = _field(left, family)
        if name == "oif":
            fields.interfaces = True
        elif name == "state":
            fields.state = True
        elif name is not None:
            span = _span(value, name)
            if span is not None:
                fields.add(name, *span)


def _span(value: Any, name: str) -> tuple[int, int] | None:
    """A constant as an inclusive (low, high) of integers."""
    if isinstance(value, dict) and "prefix" in value:
        net = ipaddress.ip_network(f"{value['prefix']['addr']}/{value['prefix']['len']}")
        return int(net.network_address), int(net.broadcast_address)
    if isinstance(value, dict) and "range" in value:
        low, high = (_span(v, name) for v in value["range"])
        return (low[0], high[1]) if low and high else None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value, value
    if isinstance(value, str):
        if name == "proto":
            number = PROTOCOLS.get(value)
            return (number, number) if number is not None else None
        if name.startswith(("daddr", "saddr")):
            net = ipaddress.ip_network(value, strict=False)
            return int(net.network_address), int(net.broadcast_address)
    return None


def cells(spans: Iterable[tuple[int, int]], top: int) -> list[tuple[int, int]]:
    """The cells [0, top] is cut into by the spans' boundaries."""
    bounds = {0, top + 1}
    for low, high in spans:
        bounds |= {low, high + 1}
    edges = sorted(b for b in bounds if 0 <= b <= top + 1)
    return list(zip(edges, (e - 1 for e in edges[1:]), strict=False))


def _addresses(family: str, spans: set[tuple[int, int]],
               avoid: Iterable[IPNetwork] = ()) -> list[str]:  # fmt: skip
    """Both ends of every address cell, moved out of the special ranges (and
    out of `avoid`'s)."""
    found: list[str] = []
    special = [(int(n.network_address), int(n.broadcast_address))
               for n in (*SPECIAL[family], *avoid)]  # fmt: skip
    for low, high in cells(spans, (1 << BITS[family]) - 1):
        for end, step in ((low, 1), (high, -1)):
            value = end
            moved = True
            while moved:  # out of one range may be into another
                moved = False
                for s_low, s_high in special:
                    if s_low <= value <= s_high:
                        value, moved = (s_high + 1 if step == 1 else s_low - 1), True
            if low <= value <= high:
                address = str(ADDRESS[family](value))
                if address not in found:
                    found.append(address)
    return found


def _ports(spans: set[tuple[int, int]]) -> list[int]:
    return sorted({end for cell in cells(spans, 65535) for end in cell})


def _one_each(spans: set[tuple[int, int]], top: int, avoid: frozenset[int]) -> list[int]:
    """One value of each cell: its lowest that is not to be avoided."""
    found = []
    for low, high in cells(spans, top):
        value = next((v for v in range(low, min(high, low + 300) + 1) if v not in avoid), None)
        if value is not None:
            found.append(value)
    return found


def _uids(spans: set[tuple[int, int]]) -> list[int]:
    """The uids the ruleset names, then one it does not (a second desktop user's)."""
    named = sorted({v for low, high in spans for v in range(low, min(high, low + 2) + 1)})
    other = next(u for u in range(1001, 1 << 31) if all(not lo <= u <= hi for lo, hi in spans))
    return [*named, other]


def _sees_out(rule: _Rule) -> bool:
    """A rule an outgoing packet can meet: on its way out, or back in on lo."""
    back = rule.hooks & BACK_HOOKS and (rule.iifs is None or "lo" in rule.iifs)
    return bool(rule.hooks & OUT_HOOKS or back)


def _sources(family: str, spans: set[tuple[int, int]] | None) -> list[str | None]:
    """The local sources of outgoing packets: one in each source cell that
    holds one (None, the kernel's choice, when the ruleset reads no source
    or every local address falls in one cell)."""
    if not spans:
        return [None]
    found: dict[tuple[int, int], str] = {}
    for address in LOCAL[family]:
        value = int(ipaddress.ip_address(address))
        cell = next(c for c in cells(spans, (1 << BITS[family]) - 1) if c[0] <= value <= c[1])
        found.setdefault(cell, address)
    return [None] if len(found) == 1 else list(found.values())


def derive(objects: Iterable[Json], links: Iterable[Link] = ()) -> list[Packet]:
    """Every class of packet the ruleset tells apart, one representative each:
    outgoing, established, and arriving on eth0 and on each link."""
    found: list[Packet] = []
    reader = _Reader(objects)
    # A family the ruleset says nothing of is still sent: an empty ruleset
    # lets everything through, and that must show.
    for family, fields in reader.read(_sees_out).items():
        spans = fields.spans
        daddrs = _addresses(family, spans.get(f"daddr_{family}", set()))
        saddrs = _sources(family, spans.get(f"saddr_{family}"))
        protos = _one_each(spans.get("proto", set()), 255, AVOID_PROTO)
        ports = _ports(spans.get("dport", set()))
        loopback = LOOPBACK[family]
        for uid in _uids(spans.get("uid", set())):
            for daddr in daddrs:
                local = ipaddress.ip_address(daddr) in loopback
                # Another address on lo: the host's own (IPv4 only: Tails has no
                # IPv6 address but ::1, and the kernel refuses to route the rest there).
                both = fields.interfaces and family == "ipv4"
                oifs = ["lo"] if local else ["lo", OTHER_INTERFACE] if both else [OTHER_INTERFACE]
                for oif, saddr, proto in _product(oifs, saddrs, protos):
                    if saddr == LOCAL[family][0] and not local:
                        continue  # the kernel sends from loopback only to loopback
                    found += _with_ports(family, uid, daddr, oif, saddr, proto, ports, fields.syn)
        if fields.state:
            found += _established(family, spans, daddrs, protos, ports)
    links = list(links)
    for interface in [OTHER_INTERFACE, *(link.name for link in links)]:
        found += _inbound(reader, interface, links)
    return found


def _inbound(reader: _Reader, interface: str, links: list[Link]) -> list[Packet]:
    """New packets arriving on `interface`, as the rules that can see them
    there cut them: from both ends of every source cell, to both ends of
    every destination cell and to every address the routing tells apart
    (each link's host and guest, eth0's own), every protocol and port cell;
    and, where those rules read conntrack's state, each link's guest
    receiving a reply.  No source is one of this host's addresses or
    loopback: the kernel drops those as martians before any chain."""

    def sees(rule: _Rule) -> bool:
        return bool(rule.hooks & IN_HOOKS) and (rule.iifs is None or interface in rule.iifs)

    found: list[Packet] = []
    for family, fields in reader.read(sees).items():
        spans = fields.spans
        hosts = [LOCAL[family][1]]
        routed = []  # each link's host (input) and guest (forwarded out on it)
        if family == "ipv4":
            hosts += [link.host for link in links]
            routed = [a for link in links for a in (link.host, link.guest)]
        martian = [LOOPBACK[family], *(ipaddress.ip_network(a) for a in hosts)]
        sources = _addresses(family, spans.get(f"saddr_{family}", set()), martian)
        targets = _addresses(family, spans.get(f"daddr_{family}", set()), [LOOPBACK[family]])
        targets += [a for a in [*routed, LOCAL[family][1]] if a not in targets]
        # TCP, UDP and ICMP besides: conntrack and nat tell them apart.
        kernel = {(TCP, TCP), (UDP, UDP), (1, 1)} if family == "ipv4" else set()
        protos = _one_each(spans.get("proto", set()) | kernel, 255, AVOID_PROTO)
        ports = _ports(spans.get("dport", set()))
        for saddr, daddr, proto in itertools.product(sources, targets, protos):
            # An echo request, well formed: th dport would read its checksum.
            dports: list[int | None] = [None] if proto in (1, ICMPV6) else list(ports)
            found += [
                Packet(family, 0, daddr, proto, dport, syn, interface, saddr, inbound=True)
                for dport in dports
                for syn in ((True, False) if proto == TCP and fields.syn else (True,))
            ]
        if fields.state and family == "ipv4" and interface == OTHER_INTERFACE:
            port = ports[len(ports) // 2]
            for link in links:  # replies to each link's guest, from the network
                for proto in (TCP, UDP):
                    found.append(Packet(family, 0, link.guest, proto, port, False, interface,
                                        sources[0], established=True, inbound=True))  # fmt: skip
    return found


def _established(family: str, spans: dict[str, set[tuple[int, int]]], daddrs: list[str],
                 protos: list[int], ports: list[int]) -> list[Packet]:  # fmt: skip
    """Packets of flows conntrack has seen both ways, for every uid and every
    ct mark cell (0, each mark the ruleset names, one it does not), to every
    address cell, over TCP, UDP and one protocol without ports, to one port.
    Not the full product: see docs/proof.md."""
    marks = _uids(spans.get("mark", set()) | {(0, 0)})
    other = next(p for p in protos if p not in (TCP, UDP, ICMPV6, 1, 33, 132, 136))
    found = []
    for uid in _uids(spans.get("uid", set())):
        for mark in marks:
            for daddr in daddrs:
                local = ipaddress.ip_address(daddr) in LOOPBACK[family]
                oif = "lo" if local else OTHER_INTERFACE
                saddr = LOCAL[family][0 if local else 1]
                for proto in (TCP, UDP, other):
                    port = None if proto == other else ports[len(ports) // 2]
                    found.append(Packet(family, uid, daddr, proto, port, proto != TCP, oif,
                                        saddr, established=True, mark=mark))  # fmt: skip
    return found


def _product(
    oifs: list[str], saddrs: list[str | None], protos: list[int]
) -> Iterator[tuple[str, str | None, int]]:
    for oif in oifs:
        for saddr in saddrs:
            for proto in protos:
                yield oif, saddr, proto


def _with_ports(
    family: str,
    uid: int,
    daddr: str,
    oif: str,
    saddr: str | None,
    proto: int,
    ports: list[int],
    syn: bool,
) -> list[Packet]:
    if family == "ipv6" and proto == ICMPV6:
        dports: list[int | None] = [None]  # the kernel writes ICMPv6's checksum there
    else:
        dports = list(ports)
    flags = (True, False) if proto == TCP and syn else (True,)
    return [
        Packet(family, uid, daddr, proto, dport, flag, oif, saddr)
        for dport in dports
        for flag in flags
    ]
