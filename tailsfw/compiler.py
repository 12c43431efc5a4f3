"""The compiler, pure: (policy, facts) -> the nftables JSON ruleset.

No I/O here.  The same policy and facts always give the same ruleset, with
sorted elements and stable names, so rulesets can be compared and hashed.

Shape of the IPv4 output path, in Tails' rule order (the hot path; see
docs/how-it-works.md):

    output:  ct state established,related jump conntracked     rule 1
             ip daddr 127.0.0.1 jump local                     rule 2
             meta skuid <clearnet|debian-tor> jump direct_...   rules 3, 4
             ip daddr <each LAN network> jump lan              rule 5
             jump refuse                                       rule 6

The few things every packet meets are plain comparisons; the per-port,
per-user allowlists of `local` are verdict maps, one lookup whatever their
size.

One invariant keeps replacements leak-free: a lookup that misses never leads
to accept.  While a transaction commits, a packet still walking the old
rules sees the old maps' elements already retired; every miss must then end
in `refuse`, as it does here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence

from . import nsrules
from .facts import Facts
from .nftjson import (
    ACCEPT,
    COUNTER,
    CT_STATE,
    LOAD_ORDER,
    RETURN,
    Builder,
    Json,
    flags,
    jump,
    l4proto,
    match,
    meta,
    network,
    one_or_set,
    payload,
    vmap,
)
from .nftjson import (
    FAMILIES as FAMILIES,
)
from .nftjson import (
    PROTO as PROTO,
)
from .nftjson import (
    TABLE as TABLE,
)
from .nftjson import (
    Ruleset as Ruleset,
)
from .policy import DirectRule, Family, LocalRule, Policy

# The transports whose header starts with source and destination ports (what
# `th dport` reads): a refused LAN port is refused on each of them.
PORTED = ("tcp", "udp", "dccp", "sctp", "udplite")
DNS_PORT = 53
# The set of NetworkManager's DNS servers (`dns.clearnet = "nm"`).
CLEARNET_DNS = "clearnet_dns"
LOOPBACK = {"ipv4": "127.0.0.1", "ipv6": "::1"}
# Tails' "syn": of these four flags only SYN is set (a new connection).
SYN_MASK = ["fin", "syn", "rst", "ack"]
# Where everything refused goes.  Chain names avoid nft keywords ("reject",
# "related"), so that `nft list ruleset` output loads back with `nft -f`.
REFUSE = "refuse"


def compile_policy(policy: Policy, facts: Facts) -> Ruleset:
    uids, warnings = resolve_users(policy, facts)
    c = _Compiler(policy, uids, facts.dns)
    c.ipv4(lan_networks(policy, facts))
    c.ipv6()
    # nft resolves names as it reads: chains before the maps that jump to
    # them, maps before the rules that look them up.
    objects = sorted(c.objects, key=lambda o: LOAD_ORDER.index(next(iter(o))))
    return Ruleset(objects=tuple(objects), warnings=tuple(warnings))


def lockdown() -> Ruleset:
    """Drop everything but loopback, in both families: the fail-closed ruleset.

    Loaded by tailsfwd when it starts with no tailsfw ruleset in force and
    cannot load its policy.  It depends on nothing (no policy, no facts), so
    it cannot fail for the reason the policy did.
    """
    c = Builder()
    for family in FAMILIES.values():
        c.family = family
        c.table()
        for hook in ("input", "forward", "output"):
            c.chain(hook, hook)
        for hook, key in (("input", "iif"), ("output", "oif")):
            c.rule(hook, match(meta(key), "lo"), ACCEPT, comment="lockdown: loopback only")
    warning = "lockdown: no policy could be loaded; everything but loopback is dropped"
    return Ruleset(objects=tuple(c.objects), warnings=(warning,))


def resolve_users(policy: Policy, facts: Facts) -> tuple[dict[str, int], list[str]]:
    """User key -> uid.  A user with no uid is left out, with a warning."""
    taken = {facts.uids[u.account]: u.key for u in policy.users if u.account in facts.uids}
    uids: dict[str, int] = {}
    warnings: list[str] = []
    owner: dict[int, str] = {}  # uid -> the first user key given it
    for user in policy.users:
        uid = facts.uids.get(user.account)
        if uid is not None and owner.setdefault(uid, user.key) != user.key:
            # Two accounts with one uid: one uid can't carry both users' rights
            # (that would be their union); the first user in the policy keeps it.
            warnings.append(
                f"user {user.key!r}: account {user.account!r} has uid {uid}, which is user "
                f"{owner[uid]!r}'s too: its exceptions are left out, everything else is enforced"
            )
        elif uid is not None:
            uids[user.key] = uid
        elif user.fallback_uid is None:
            warnings.append(
                f"user {user.key!r}: account {user.account!r} does not exist and has no "
                "fallback uid: its exceptions are left out, everything else is enforced"
            )
        elif user.fallback_uid in taken:
            warnings.append(
                f"user {user.key!r}: account {user.account!r} does not exist and its "
                f"fallback uid {user.fallback_uid} belongs to user {taken[user.fallback_uid]!r}: "
                "its exceptions are left out, everything else is enforced"
            )
        else:
            uids[user.key] = user.fallback_uid
            warnings.append(
                f"user {user.key!r}: account {user.account!r} does not exist yet: "
                f"using its fallback uid {user.fallback_uid}"
            )
    return uids, warnings


def lan_networks(policy: Policy, facts: Facts) -> list[ipaddress.IPv4Network]:
    """The policy's LAN networks; in "connected" mode only their on-link parts.

    In integers, not ipaddress' subnet_of and collapse_addresses: with 2,000
    on-link networks (a storm of interfaces) those took 180 ms a commit.
    """
    if policy.lan.mode == "rfc1918":
        return list(policy.lan.networks)
    lans = [_span(lan) for lan in policy.lan.networks]
    spans = []
    for net in facts.connected:
        low, high = _span(net)
        for lan_low, lan_high in lans:
            if lan_low <= low and high <= lan_high:  # the on-link part of a LAN network
                spans.append((low, high))
            elif low <= lan_low and lan_high <= high:  # a LAN network inside an on-link one
                spans.append((lan_low, lan_high))
    return _cover(spans)


def _span(net: ipaddress.IPv4Network) -> tuple[int, int]:
    low = int(net.network_address)
    return low, low + (1 << (32 - net.prefixlen)) - 1


def _cover(spans: list[tuple[int, int]]) -> list[ipaddress.IPv4Network]:
    """The fewest networks covering the union of inclusive address spans, in order."""
    merged: list[list[int]] = []
    for low, high in sorted(spans):
        if merged and low <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], high)
        else:
            merged.append([low, high])
    return [
        net
        for low, high in merged
        for net in ipaddress.summarize_address_range(
            ipaddress.IPv4Address(low), ipaddress.IPv4Address(high)
        )
    ]


# -- the compiler ------------------------------------------------------------


class _Common(Builder):
    """What both tables build: the refuse, related, conntracked and local
    chains, and the output rule to conntracked."""

    def __init__(
        self, policy: Policy, uids: Mapping[str, int], dns: Sequence[ipaddress.IPv4Address]
    ) -> None:
        super().__init__()
        self.policy = policy
        self.uids = uids
        self.dns = dns

    def reject_chain(self) -> None:
        """One place where everything refused is counted, logged and rejected."""
        log = {"log": {"prefix": self.policy.log.prefix, "group": self.policy.log.group}}
        self.chain(REFUSE)
        if self.family == "ip":
            # ICMP port unreachable: programs fail at once with "connection refused".
            self.rule(REFUSE, COUNTER, log, {"reject": None}, comment="Tails rule 6")
        else:
            # An ICMPv6 error is only honoured by TCP on its next SYN (1 s
            # later): answer TCP with a reset so it fails at once, as in IPv4.
            self.rule(REFUSE, COUNTER, log, comment="Tails rule 6")
            self.rule(REFUSE, l4proto("tcp"), {"reject": {"type": "tcp reset"}})
            self.rule(REFUSE, {"reject": {"type": "icmpv6", "expr": "port-unreachable"}})

    def related_chain(
        self, name: str, direction: str, *final: Json, also: list[Json] | None = None
    ) -> None:
        """RELATED is only accepted on lo, for the errors our own rejects send
        (and `also`: the namespaces' veths, for the rejects of their packets)."""
        lo = match(meta(direction), "lo")
        self.chain(name)
        icmp = "icmp" if self.family == "ip" else "ipv6-icmp"
        self.rule(name, lo, l4proto(icmp), ACCEPT)
        if self.family == "ip6":
            self.rule(name, lo, flags("rst", "rst"), ACCEPT)
        if also is not None:
            self.rule(name, *also)
        self.rule(name, *final)

    def local_chain(self, family: Family) -> bool:
        """New connections to the loopback address, by protocol, port and user.

        Two verdict maps: (protocol, port, uid) for the ports the policy
        names, then (protocol, uid) for "any port".  What neither decides
        returns to the output chain and meets the rules that follow.
        """
        rules = [r for r in self.policy.local if r.family == family]
        if not rules:
            return False
        exact, anyport = self._local_verdicts(rules)
        self.vmap_object(
            "local_ports",
            ["inet_proto", "inet_service", "uid"],
            ((k, exact[k]) for k in sorted(exact)),
        )
        if anyport:
            self.vmap_object(
                "local_any", ["inet_proto", "uid"], ((k, anyport[k]) for k in sorted(anyport))
            )
        self.chain("local")
        not_lo = [match(meta("oif"), "lo", "!=")]
        if family == "ipv4":
            # A packet our nat redirected here (stray DNS, a [[redirect]] from
            # outside 127.0.0.0/8) goes out on lo, but the output hook still
            # names the interface of its first route: let only those through.
            # (`ct status ! dnat`: the form nft lists back, so verify compares it.)
            not_lo.append(match({"ct": {"key": "status"}}, "dnat", "!"))
        self.rule("local", *not_lo, RETURN)
        if family == "ipv6":
            self.rule("local", match(payload("ip6", "saddr"), "::1", "!="), RETURN)
        if any(r.protocol == "tcp" for r in rules):
            self.rule("local", flags(SYN_MASK, "syn", "!="), RETURN, comment="TCP: SYN only")
        proto_port_uid = {"concat": [meta("l4proto"), payload("th", "dport"), meta("skuid")]}
        self.rule("local", vmap(proto_port_uid, "@local_ports"), comment="Tails rule 2")
        if anyport:
            proto_uid = {"concat": [meta("l4proto"), meta("skuid")]}
            self.rule("local", vmap(proto_uid, "@local_any"))
        return True

    def _local_verdicts(
        self, rules: Sequence[LocalRule]
    ) -> tuple[dict[tuple[int, int, int], Json], dict[tuple[int, int], Json]]:
        exact: dict[tuple[int, int, int], Json] = {}
        anyport: dict[tuple[int, int], Json] = {}
        for rule in rules:
            for verdict, users in ((ACCEPT, rule.allow), (jump(REFUSE), rule.reject)):
                for uid in self._uids(users):
                    proto = PROTO[rule.protocol]
                    if rule.ports is None:
                        anyport.setdefault((proto, uid), verdict)
                    for port in rule.ports or ():
                        exact.setdefault((proto, port, uid), verdict)
        if rules and rules[0].family == "ipv4":
            # Transparent proxying's accept at the TransPort, after what the
            # [[local]] entries decide (the loader refuses a reject there).
            transparent = self.policy.transparent
            for uid in self._uids(transparent.users):
                exact.setdefault((PROTO["tcp"], transparent.to_port, uid), ACCEPT)
        return exact, anyport

    def _uids(self, users: Iterable[str]) -> list[int]:
        return [self.uids[u] for u in users if u in self.uids]

    def conntracked_chain(self, owners: Sequence[tuple[int, DirectRule]] | None) -> None:
        """Established and related traffic (Tails rule 1); related only on lo.

        IPv4 adds the owners of direct users' flows, which carry their
        owner's uid in the ct mark (`direct_chain`), so that a flow is
        accepted only while its owner still has the right it was opened
        with, and `flowcut` can find it.  Conntrack knows flows, not users:
        once clearnet's DNS query to a server is answered, any user who
        sends from the same port to the same server matches that
        established entry, and a UDP port is free again as soon as its
        socket closes (and visible in /proc/net/udp): a marked UDP flow
        takes only its owner's packets.  A marked TCP flow asks no uid: the
        kernel sends some of its packets with no owner to read (an orphaned
        socket's last data and FIN, TIME_WAIT's ACK, a reset; and the local
        server's replies of a loopback flow carry the server's uid), and no
        other user's socket can send on a connected TCP 4-tuple.
        """
        name = "conntracked"
        self.chain(name)
        established = match(CT_STATE, "established")
        mark = {"ct": {"key": "mark"}}
        if owners is None:
            self.rule(name, established, ACCEPT)
            self.rule(name, jump("out_related"))
            return
        # Nearly all traffic: decided by the first rule.
        self.rule(name, established, match(mark, 0), ACCEPT)
        self.rule(name, match(CT_STATE, "related"), jump("out_related"))
        for uid, rule in owners:
            # On `lo` only while its owner may use it (a flow it opened there
            # before a reload took `loopback` away).
            owned = [match(mark, uid)]
            if not rule.loopback:
                owned.append(match(meta("oif"), "lo", "!="))
            # TCP first: Tor's own connections, the bulk of marked traffic.
            if rule.tcp != "none":
                self.rule(name, *owned, l4proto("tcp"), ACCEPT)
            if rule.udp_ports:
                self.rule(name, *owned, l4proto("udp"), match(meta("skuid"), uid), ACCEPT)
        self.rule(name, jump(REFUSE), comment="another user's flow")

    def conntracked_rule(self) -> None:
        """One comparison sends established and related packets aside.

        A plain comparison, not a verdict map: while a transaction commits,
        a packet still walking the old rules can miss in the old maps, and
        established traffic must not be refused for it.
        """
        both = match(CT_STATE, ["established", "related"], "in")
        self.rule("output", both, jump("conntracked"), comment="Tails rule 1")


class _Ipv4Paths(_Common):
    """IPv4's own paths out: the direct users' chains, the LAN's chains and
    the nat chain (redirects, stray DNS)."""

    def direct_chain(self, rule: DirectRule, uid: int) -> str:
        # The key as it is: distinct keys give distinct chains (policy.USER_KEY).
        name = "direct_" + rule.user
        self.chain(name)
        if not rule.loopback:
            self.rule(name, match(meta("oif"), "lo"), RETURN, comment="never loopback")
        # Every flow accepted here is marked with its owner: see `conntracked_chain`.
        owner = {"mangle": {"key": {"ct": {"key": "mark"}}, "value": uid}}
        tcp = {"any": [l4proto("tcp")], "new": [flags(SYN_MASK, "syn")], "none": None}[rule.tcp]
        if tcp is not None:
            tcp.append(owner)
        udp_ports = rule.udp_ports
        if self.policy.dns.clearnet == "nm":
            # DNS only to NetworkManager's servers.  A miss in the set (none
            # known, or while a commit retires the old elements) returns.
            servers = match(payload("ip", "daddr"), "@" + CLEARNET_DNS)
            if DNS_PORT in udp_ports:
                self.rule(name, match(payload("udp", "dport"), DNS_PORT), servers, owner, ACCEPT)
            if tcp is not None:
                self.rule(name, match(payload("tcp", "dport"), DNS_PORT), servers, *tcp, ACCEPT)
            self.rule(name, match(payload("th", "dport"), DNS_PORT), RETURN,
                      comment="DNS: only NetworkManager's servers")  # fmt: skip
            udp_ports = tuple(p for p in udp_ports if p != DNS_PORT)
        if udp_ports:
            self.rule(name, match(payload("udp", "dport"), one_or_set(udp_ports)), owner, ACCEPT)
        if tcp is not None:
            self.rule(name, *tcp, ACCEPT)
        return name

    def lan_chain(self, direct: Json | None) -> None:
        """Every user reaches the LAN, but for DNS and NetBIOS (Tails rule 5).

        Direct users come before the LAN in Tails' order, so a refused port
        asks their map first (the LAN path itself never reads the uid: that
        takes a lock on the socket, the dearest thing on this path).  Plain
        comparisons decide, never a lookup: this chain ends in accept, and
        while a transaction commits, a packet walking the old rules can miss
        in an old set (the kernel retires its elements first); a miss here
        let LAN DNS out (seen in the lab: 1 run in 20 of 200 re-applies).
        """
        self.chain("lan_refused")
        if direct is not None:
            self.rule("lan_refused", direct)
        self.rule("lan_refused", jump(REFUSE))
        self.chain("lan")
        refused = self.lan_refused_ports()
        common = [(proto, port) for proto, port in refused if proto in ("tcp", "udp")]
        other = [(proto, port) for proto, port in refused if (proto, port) not in common]
        for proto, port in common:
            dport = match(payload("th", "dport"), port)
            self.rule("lan", l4proto(proto), dport, jump("lan_refused"))
        if other:
            # The rarer transports behind one range comparison, so that TCP
            # and UDP in the refused span pay one comparison for them.
            numbers = sorted(PROTO[proto] for proto, _ in other)
            span = {"range": [numbers[0], numbers[-1]]}
            self.rule("lan", match(meta("l4proto"), span), jump("lan_other"))
            self.chain("lan_other")
            for proto, port in other:
                dport = match(payload("th", "dport"), port)
                self.rule("lan_other", l4proto(proto), dport, jump("lan_refused"))
        self.rule("lan", ACCEPT, comment="Tails rule 5")

    def lan_refused_ports(self) -> list[tuple[str, int]]:
        """(transport, port) refused on the LAN: TCP's ports, UDP's ports, and
        both on every other transport with ports (UDP-Lite, SCTP, DCCP), so
        that no transport reaches a LAN resolver."""
        lan = self.policy.lan
        both = sorted(set(lan.reject_tcp_ports) | set(lan.reject_udp_ports))
        return (
            [("tcp", p) for p in lan.reject_tcp_ports]
            + [("udp", p) for p in lan.reject_udp_ports]
            + [(proto, p) for p in both for proto in PORTED if proto not in ("tcp", "udp")]
        )

    def nat_chain(self, direct_uids: Sequence[int]) -> None:
        self.chain("nat_output", "output", kind="nat")
        daddr = payload("ip", "daddr")
        for r in self.policy.redirects:
            expr = [match(daddr, network(r.destination)), l4proto(r.protocol)]
            if r.port is not None:
                expr.append(match(payload("th", "dport"), r.port))
            self.rule("nat_output", *expr, {"redirect": {"port": r.to_port}})
        if self.policy.dns.stray == "tor":
            # Everyone but the direct users: their DNS is theirs to send.
            expr = [
                match(payload("udp", "dport"), DNS_PORT),
                match(daddr, network(ipaddress.IPv4Network("127.0.0.0/8")), "!="),
            ]
            if direct_uids:
                expr.append(match(meta("skuid"), one_or_set(sorted(direct_uids)), "!="))
            self.rule("nat_output", *expr, {"redirect": {"port": self.policy.dns.tor_port}},
                      comment="stray DNS to Tor's DNS port")  # fmt: skip


class _Compiler(_Ipv4Paths):
    """The two tables, each in Tails' rule order, from the pieces above."""

    def ipv4(self, lan: Sequence[ipaddress.IPv4Network]) -> None:
        """The IPv4 table; its output chain follows Tails' rule order.

        Dispatch is by plain comparisons (measured, bench/datapath.py): a
        hash or interval lookup costs ~40 ns here, as much as ten
        comparisons, and the policy names only a few direct users and LAN
        networks.  The per-port, per-user allowlists of `local` are maps.
        """
        self.family = "ip"
        self.table()
        self.chain("input", "input")
        self.rule("input", match(CT_STATE, "established"), ACCEPT)
        self.rule("input", match(meta("iif"), "lo"), ACCEPT)
        namespaces = self.policy.namespaces
        nsrules.host_input(self, namespaces)
        self.rule("input", COUNTER, {"drop": None})
        self.chain("forward", "forward")
        nsrules.host_forward(self, namespaces)
        self.rule("forward", COUNTER, {"drop": None})
        self.reject_chain()
        self.related_chain("out_related", "oif", jump(REFUSE), also=nsrules.related_out(namespaces))
        direct = [(self.uids[r.user], r) for r in self.policy.direct if r.user in self.uids]
        self.conntracked_chain(sorted(direct, key=lambda owner: owner[0]))
        has_local = self.local_chain("ipv4")
        # Rules 3 and 4: one read of the uid, one lookup, whatever the count.
        by_uid = sorted((uid, jump(self.direct_chain(rule, uid))) for uid, rule in direct)
        dispatch = vmap(meta("skuid"), {"set": [list(e) for e in by_uid]}) if by_uid else None
        self.lan_chain(dispatch)
        connected = self.policy.lan.mode == "connected"
        if connected:
            self.set_object("lan", "ipv4_addr", map(network, lan), flags=["interval"])
        if self.policy.dns.clearnet == "nm":
            self.set_object(CLEARNET_DNS, "ipv4_addr", [str(a) for a in sorted(set(self.dns))])

        self.chain("output", "output")
        self.conntracked_rule()
        daddr = payload("ip", "daddr")
        if has_local:
            self.rule("output", match(daddr, LOOPBACK["ipv4"]), jump("local"),
                      comment="Tails rule 2")  # fmt: skip
        # The LAN before the direct users: the LAN path then never reads the
        # uid, and `lan_refused` keeps Tails' order for the refused ports.
        ports = [port for _, port in self.lan_refused_ports()]
        for net in self.policy.lan.networks:
            # In "connected" mode the set holds what is on-link; the policy's
            # network first spares every other packet the lookup.
            to_lan = [match(daddr, network(net))]
            if connected:
                to_lan.append(match(daddr, "@lan"))
            if ports:
                # Most LAN packets are outside the refused ports' span: one
                # range comparison accepts them here, without a jump (for
                # other protocols `th dport` reads other bytes; the LAN
                # accepts those protocols anyway).
                span = match(payload("th", "dport"), {"range": [min(ports), max(ports)]}, "!=")
                self.rule("output", *to_lan, span, ACCEPT)
            self.rule("output", *to_lan, jump("lan"))
        if dispatch is not None:
            self.rule("output", dispatch, comment="Tails rules 3, 4")
        self.rule("output", jump(REFUSE))
        self.nat_chain([uid for uid, _ in direct])
        nsrules.transparent_nat(self, self.policy.transparent, self.uids)
        nsrules.host_nat(self, namespaces)

    def ipv6(self) -> None:
        self.family = "ip6"
        self.table()
        self.related_chain("in_related", "iif", COUNTER, {"drop": None})
        self.chain("input", "input")
        self.rule("input", match(CT_STATE, "established"), ACCEPT, comment="Tails rule 1")
        self.rule("input", match(CT_STATE, "related"), jump("in_related"))
        ports = sorted(
            {
                p
                for r in self.policy.local
                if r.family == "ipv6" and r.protocol == "tcp" and r.allow
                for p in r.ports or ()
            }
        )
        if ports:
            self.rule(
                "input",
                match(meta("iif"), "lo"),
                match(payload("ip6", "saddr"), "::1"),
                match(payload("ip6", "daddr"), "::1"),
                match(payload("tcp", "dport"), one_or_set(ports)),
                ACCEPT,
            )
        self.rule("input", COUNTER, {"drop": None})
        self.chain("forward", "forward")
        self.rule("forward", COUNTER, {"drop": None})
        self.reject_chain()
        self.related_chain("out_related", "oif", jump(REFUSE))
        self.conntracked_chain(None)
        has_local = self.local_chain("ipv6")
        self.chain("output", "output")
        self.conntracked_rule()
        if has_local:
            self.rule("output", match(payload("ip6", "daddr"), LOOPBACK["ipv6"]), jump("local"))
        self.rule("output", jump(REFUSE))
