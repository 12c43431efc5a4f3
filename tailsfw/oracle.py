"""The independent oracle: what the specification says happens to a packet.

Written from shared/tails-network-filter.md (and, for what tailsfw does
stricter than Tails, from docs/policy.md), not from the compiler: it reads
the policy's values (who, which ports, which networks) and applies the
specification's rules in the specification's order, first match wins.  Each
rule carries its sentence, so that a verdict can say why.

It knows nothing of chains, maps, marks or the order the compiler chose for
speed; `tailsfwctl prove` compares it with what the kernel does.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from .classes import LOCAL, OTHER_INTERFACE, TCP, UDP, Packet
from .policy import Policy

# The specification's sentences (tails-network-filter.md), word for word.
RULE_1 = "Output (policy drop), in order: 1. Accept established (not related)."
RULE_2 = (
    "2. On `lo`: to 127.0.0.1, new TCP (SYN) [or] to 127.0.0.1 UDP 53 and 5353: "
    "the users the table names for the port."
)
RULE_2_OTHER = (
    "2. On `lo`: [...] any other port: amnesia (so amnesia reaches 9050, 9040, 951, 631 "
    "and the random local ports of its own programs)."
)
RULE_3 = "3. User `clearnet`, any interface but `lo`: all TCP, and UDP to port 53. Never loopback."
RULE_4 = "4. User `debian-tor`, any interface: new TCP (SYN), and UDP to port 53."
RULE_5_REFUSED = (
    "5. LAN (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16), every user: DNS (TCP and UDP 53) "
    "and NetBIOS name service (UDP 137) are rejected, because a LAN resolver can learn "
    "the user's public IP"
)
RULE_5_ACCEPTED = (
    "5. LAN (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16), every user: [...] everything "
    "else to the LAN is accepted."
)
RULE_6 = (
    "6. Everything else: reject, logged with the prefix `Dropped outbound packet: ` "
    "and the sender's UID and GID."
)
NAT = (
    "IPv4, nat (output): TCP to 127.192.0.0/10 is redirected to 127.0.0.1:9040 (automapped "
    ".onion addresses); UDP to 127.0.0.1:53 is redirected to 5353. Redirection happens before "
    "filtering, so the filter sees 127.0.0.1:9040 and :5353: only users allowed there can "
    "use automapped addresses or system DNS."
)
INPUT_4 = "IPv4 input (policy drop): accept established (not related); accept everything on `lo`."
IPV6 = (
    "IPv6: Tor does not carry IPv6. Input and output policy drop. Only the accessibility "
    "daemon on `lo` (::1 to ::1, TCP 4101) for amnesia and `Debian-gdm`, and its "
    "established replies. Everything else: logged and rejected (ICMPv6 port unreachable)."
)
# docs/policy.md: tailsfw's own, stricter than Tails.
LAN_OTHER = (
    "docs/policy.md: The refused ports hold for every transport with ports, not only TCP "
    "and UDP: UDP-Lite, SCTP and DCCP are refused on the ports of both lists."
)
LAN_CONNECTED = (
    'docs/policy.md: lan.mode "connected": only the parts of `networks` that are on-link '
    "on some interface."
)
DNS_NM = (
    'docs/policy.md: dns.clearnet "nm": the [[direct]] users\' DNS (port 53, UDP and TCP) '
    "goes only to the servers NetworkManager gave; while none is known, it is refused."
)
STRAY_TOR = (
    'docs/policy.md: dns.stray "tor": other users\' UDP port 53 datagrams to any address '
    "outside 127.0.0.0/8 are redirected to 127.0.0.1:tor_port."
)
# docs/how-it-works.md, "Riding another user's conntrack entry": stricter than Tails.
OWNED_FLOW = (
    "docs/how-it-works.md: Direct users' flows carry their owner's uid in the ct mark. A "
    "marked UDP flow takes only its owner's packets, while its owner has direct UDP; a "
    "marked TCP flow goes on while its owner has direct TCP. On `lo`, either goes on only "
    "while its owner's `loopback` is true."
)
# "Application network namespaces", word for word.
NS_HOST = (
    "Host side (Tails' ferm.conf, 6.x), IPv4 input: from `veth-tbb`, source 10.200.1.2 to "
    "10.200.1.1, TCP 9050 and 951: accept; likewise [each namespace's veth, guest, host and "
    "exposed ports]. Nothing else from a namespace reaches the host."
)
NS_CLEARNET = (
    "from `veth-clearnet` to 10.200.1.0/24: reject (the Unsafe Browser must not reach "
    "Tor's or onion-grater's listeners)."
)
NS_FORWARD = (
    "Host side for `clearnet`: forward: accept in from `veth-clearnet` [...]; nat "
    "postrouting: masquerade source 10.200.1.16/30; Tails 7.9 [...] also resets the TTL of "
    "packets forwarded from `veth-clearnet` to 64."
)
NS_REPLIES = (
    "Host side for `clearnet`: forward: accept [...] out to `veth-clearnet`; docs/how-it-works.md: "
    "out to `veth-clearnet` only established and related packets."
)
NS_DROPPED = (
    "Forward: policy drop; forward: accept in from `veth-clearnet` and out to `veth-clearnet` "
    "(everything else forwarded stays dropped); docs/how-it-works.md: here no new connection "
    "goes into the clearnet namespace, even through the host."
)
NS_APART = (
    "docs/how-it-works.md: forward (policy drop): in from `veth-clearnet` only, never to a "
    "namespace's /30 and never out to a namespace's veth (rejected)"
)
# docs/how-it-works.md: how tailsfw refuses what a namespace may not reach.
NS_REJECTED = (
    "docs/how-it-works.md: Everything else coming in on a namespace's veth is rejected "
    "(ICMP port unreachable, counted)"
)
# The spec's "10.200.1.0/24": clearnet reaches none of it, neither the
# host's addresses there (input) nor through the host (forward).
SPEC_NAMESPACES = ipaddress.IPv4Network("10.200.1.0/24")
OTHER_PORTED = {33, 132, 136}  # DCCP, SCTP, UDP-Lite
LOOPBACK_NET = ipaddress.ip_network("127.0.0.0/8")


@dataclass(frozen=True)
class Decision:
    verdict: str  # "accepted", "refused" (rejected, logged) or "dropped"
    rule: str  # which rule of the specification decided
    sentence: str
    redirect: int | None = None  # redirected to 127.0.0.1:PORT first
    inbound: str | None = None  # back in on `lo`: "accepted" or "dropped"
    forwarded: str = ""  # arrived and forwarded: "out on IFACE from SADDR ttl N"
    log: bool | None = None  # None: a refusal is logged ("reject" means: log, then reject)

    @property
    def logged(self) -> bool:
        return self.verdict == "refused" if self.log is None else self.log


@dataclass(frozen=True)
class World:
    """What the oracle reads besides the packet: the policy and the facts."""

    policy: Policy
    uids: Mapping[str, int]  # the policy's user keys -> uid
    connected: frozenset[ipaddress.IPv4Network] = frozenset()
    dns: frozenset[ipaddress.IPv4Address] = frozenset()


def user_uids(policy: Policy, accounts: Mapping[str, int]) -> dict[str, int]:
    """User key -> uid: the account's, or while it does not exist its fallback
    uid ("amnesia ... uid 1000 at early boot, before the account exists").
    A uid two keys would share stays the first's: "A missing user must never
    cost more than that user's own exceptions", and no more than them either."""
    found: dict[str, int] = {}
    existing = {accounts[u.account] for u in policy.users if u.account in accounts}
    for user in policy.users:
        uid = accounts.get(user.account)
        if uid is None and user.fallback_uid not in existing:
            uid = user.fallback_uid
        if uid is not None and uid not in found.values():
            found[user.key] = uid
    return found


def decide(world: World, p: Packet) -> Decision:
    """The specification's verdict for a packet of this class."""
    if p.inbound:  # arriving on eth0 or a namespace's veth
        return _arriving(world, p)
    if p.established:
        return _established(world, p)
    if p.family == "ipv6":
        return _ipv6(world, p)
    policy = world.policy
    users = {key for key, uid in world.uids.items() if uid == p.uid}
    daddr = ipaddress.IPv4Address(p.daddr)
    port = p.dport
    redirect = _redirect(world, p, users)
    if redirect is not None:
        daddr, port = ipaddress.IPv4Address("127.0.0.1"), redirect
    on_lo = p.oif == "lo" or redirect is not None
    inbound = "accepted" if on_lo else None

    def decided(verdict: str, rule: str, sentence: str) -> Decision:
        return Decision(
            verdict, rule, sentence, redirect, inbound if verdict == "accepted" else None
        )

    new_tcp = p.proto == TCP and p.syn
    if on_lo and str(daddr) == "127.0.0.1" and (new_tcp or p.proto == UDP):
        name = "tcp" if p.proto == TCP else "udp"
        for number, entry in enumerate(policy.local, 1):
            if entry.family != "ipv4" or entry.protocol != name:
                continue
            if entry.ports is not None and port not in entry.ports:
                continue
            why = RULE_2 if entry.ports is not None else RULE_2_OTHER
            where = f"[[local]] entry {number} ({name} {list(entry.ports or ['any'])})"
            if users & set(entry.allow):
                return decided("accepted", f"Tails rule 2, {where}", why)
            if users & set(entry.reject):
                return decided("refused", f"Tails rule 2, {where}", why)
    for rule in policy.direct:
        if rule.user not in users:
            continue
        sentence = RULE_4 if rule.loopback else RULE_3
        if not rule.loopback and on_lo:
            continue  # "Never loopback."
        tcp = p.proto == TCP and (rule.tcp == "any" or (rule.tcp == "new" and p.syn))
        udp = p.proto == UDP and port in rule.udp_ports
        if (tcp or udp) and policy.dns.clearnet == "nm" and port == 53:
            if daddr not in world.dns:
                continue
            sentence = DNS_NM
        if tcp or udp:
            return decided("accepted", f"Tails rules 3, 4 ([[direct]] {rule.user})", sentence)
    if _on_lan(world, daddr):
        lan = policy.lan
        refused = (
            (p.proto == TCP and port in lan.reject_tcp_ports)
            or (p.proto == UDP and port in lan.reject_udp_ports)
            or (p.proto in OTHER_PORTED and port in {*lan.reject_tcp_ports, *lan.reject_udp_ports})
        )
        if refused:
            why = LAN_OTHER if p.proto in OTHER_PORTED else RULE_5_REFUSED
            return decided("refused", "Tails rule 5", why)
        return decided("accepted", "Tails rule 5", RULE_5_ACCEPTED)
    return decided("refused", "Tails rule 6", RULE_6)


def _established(world: World, p: Packet) -> Decision:
    """Rule 1, and the owners of direct users' flows: a UDP flow marked with
    a uid is its owner's alone, a TCP flow's mark asks no uid; either lasts
    only while its owner has that protocol (and on `lo`, `loopback`)."""
    inbound = "accepted" if p.oif == "lo" else None
    if p.family == "ipv6" or p.mark == 0:
        return Decision("accepted", "Tails rule 1", RULE_1, inbound=inbound)
    rights = [(world.uids[r.user], r) for r in world.policy.direct if r.user in world.uids]
    if p.oif == "lo":
        rights = [(uid, r) for uid, r in rights if r.loopback]
    udp = {uid for uid, r in rights if r.udp_ports}
    tcp = {uid for uid, r in rights if r.tcp != "none"}
    if (p.proto == UDP and p.mark == p.uid and p.uid in udp) or (p.proto == TCP and p.mark in tcp):
        return Decision("accepted", "Tails rule 1, the flow's owner", OWNED_FLOW, inbound=inbound)
    return Decision("refused", "Tails rule 1, another user's flow", OWNED_FLOW)


def _redirect(world: World, p: Packet, users: set[str]) -> int | None:
    """nat output, before filtering: the port the packet is redirected to, if any."""
    daddr = ipaddress.IPv4Address(p.daddr)
    for r in world.policy.redirects:
        proto = TCP if r.protocol == "tcp" else UDP
        if p.proto == proto and daddr in r.destination and r.port in (None, p.dport):
            return r.to_port
    dns = world.policy.dns
    direct = {rule.user for rule in world.policy.direct}
    stray = p.proto == UDP and p.dport == 53 and daddr not in LOOPBACK_NET
    if dns.stray == "tor" and stray and not users & direct:
        return dns.tor_port
    return None


def _arriving(world: World, p: Packet) -> Decision:
    """A packet arriving from the network or from a namespace's veth: to the
    host (input) or through it (forward)."""
    if p.family == "ipv6":  # "Input and output policy drop"; "Forward: drop"
        return Decision("dropped", "Tails IPv6 rule", IPV6)
    namespaces = world.policy.namespaces
    daddr, saddr = ipaddress.IPv4Address(p.daddr), ipaddress.IPv4Address(p.saddr or "0.0.0.0")
    here = daddr in {ns.host for ns in namespaces} or str(daddr) == LOCAL["ipv4"][1]
    into = next((ns for ns in namespaces if daddr in ns.network), None)  # the route's veth
    ns = next((ns for ns in namespaces if ns.veth == p.oif), None)
    if ns is None:  # from the network
        if p.established and into is not None and into.clearnet and not here:
            out = f"out on {into.veth} from {saddr} ttl 63"
            return Decision("accepted", "namespaces, clearnet's replies", NS_REPLIES, forwarded=out)
        if here:
            return Decision("dropped", "Tails input", INPUT_4)
        return Decision("dropped", "Tails forward", NS_DROPPED)
    rule = f"namespace {ns.name}"
    if here:
        exposed = p.proto == TCP and p.dport in ns.expose
        if not ns.clearnet and (saddr, daddr) == (ns.guest, ns.host) and exposed:
            return Decision("accepted", f"{rule}, host side", NS_HOST)
        why = NS_CLEARNET if ns.clearnet and daddr in SPEC_NAMESPACES else NS_HOST
        return Decision("refused", f"{rule}, host side", f"{why} {NS_REJECTED}", log=False)
    if not ns.clearnet:
        return Decision("dropped", f"{rule}, forward", NS_DROPPED)
    if into is not None or daddr in SPEC_NAMESPACES:
        why = NS_APART if into is not None else NS_CLEARNET
        return Decision("refused", f"{rule}, forward", why, log=False)
    source = LOCAL["ipv4"][1] if saddr in ns.network else str(saddr)  # masqueraded
    out = f"out on {OTHER_INTERFACE} from {source} ttl 64"
    return Decision("accepted", f"{rule}, forward", NS_FORWARD, forwarded=out)


def _on_lan(world: World, daddr: ipaddress.IPv4Address) -> bool:
    lan = world.policy.lan
    if not any(daddr in net for net in lan.networks):
        return False
    return lan.mode == "rfc1918" or any(daddr in net for net in world.connected)


def _ipv6(world: World, p: Packet) -> Decision:
    """IPv6: only the [[local]] ipv6 entries, ::1 to ::1 on lo."""
    users = {key for key, uid in world.uids.items() if uid == p.uid}
    local = p.oif == "lo" and p.daddr == "::1" and p.saddr in (None, "::1")
    inbound = None
    if local:  # input: "Only the accessibility daemon on lo (::1 to ::1, TCP 4101)"
        ports = {
            port
            for e in world.policy.local
            if e.family == "ipv6" and e.protocol == "tcp" and e.allow
            for port in e.ports or ()
        }
        inbound = "accepted" if p.proto == TCP and p.dport in ports else "dropped"
    if local and p.proto == TCP and p.syn:
        for number, entry in enumerate(world.policy.local, 1):
            if entry.family != "ipv6" or entry.protocol != "tcp":
                continue
            if entry.ports is not None and p.dport not in entry.ports:
                continue
            where = f"Tails IPv6 rule, [[local]] entry {number}"
            if users & set(entry.allow):
                return Decision("accepted", where, IPV6, inbound=inbound)
            if users & set(entry.reject):
                return Decision("refused", where, IPV6)
    return Decision("refused", "Tails IPv6 rule", IPV6)
