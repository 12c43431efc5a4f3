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

import hashlib
import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .facts import Facts
from .policy import DirectRule, Family, LocalRule, Policy

TABLE = "tailsfw"
FAMILIES = {"ipv4": "ip", "ipv6": "ip6"}
# IP protocol numbers (IANA).  The ruleset holds numbers, never names: nft
# resolves names through /etc/protocols, which a minimal system lacks.
PROTO = {"icmp": 1, "tcp": 6, "udp": 17, "dccp": 33, "ipv6-icmp": 58, "sctp": 132, "udplite": 136}
# The transports whose header starts with source and destination ports (what
# `th dport` reads): a refused LAN port is refused on each of them.
PORTED = ("tcp", "udp", "dccp", "sctp", "udplite")
DNS_PORT = 53
# The set of NetworkManager's DNS servers (`dns.clearnet = "nm"`).
CLEARNET_DNS = "clearnet_dns"
LOOPBACK = {"ipv4": "127.0.0.1", "ipv6": "::1"}
# Tails' "syn": of these four flags only SYN is set (a new connection).
SYN_MASK = ["fin", "syn", "rst", "ack"]
LOAD_ORDER = ("table", "chain", "set", "map", "rule")
# Where everything refused goes.  Chain names avoid nft keywords ("reject",
# "related"), so that `nft list ruleset` output loads back with `nft -f`.
REFUSE = "refuse"

Json = dict[str, Any]


@dataclass(frozen=True)
class Ruleset:
    """The nftables objects of both tables, in load order, and what was left out."""

    objects: tuple[Json, ...]
    warnings: tuple[str, ...]

    def commands(self) -> list[Json]:
        """Replace every tailsfw table, in one transaction.

        `add` then `delete` removes an existing table and cannot fail when
        there is none; the new objects are added in the same batch, so the
        kernel swaps the old ruleset for the new one atomically.
        """
        tables = [o["table"] for o in self.objects if "table" in o]
        replace: list[Json] = []
        for table in tables:
            replace += [{"add": {"table": table}}, {"delete": {"table": table}}]
        return replace + [{"add": o} for o in self.objects]

    def changes_since(self, old: Ruleset) -> list[Json] | None:
        """The commands that turn `old` into this ruleset by set elements alone.

        None when anything but elements differs (then replace the tables);
        an empty list when nothing differs (then commit nothing).
        """
        if [_shape(o) for o in old.objects] != [_shape(o) for o in self.objects]:
            return None
        commands: list[Json] = []
        for before, after in zip(old.objects, self.objects, strict=True):
            kind = next(iter(after))
            if kind in ("set", "map") and before != after:
                body = after[kind]
                name = {k: body[k] for k in ("family", "table", "name")}
                commands.append({"flush": {kind: name}})
                if body.get("elem"):
                    commands.append({"add": {"element": {**name, "elem": body["elem"]}}})
        return commands

    def document(self, commands: list[Json] | None = None) -> Json:
        """A JSON document for libnftables: by default, the full replacement."""
        if commands is None:
            commands = self.commands()
        return {"nftables": [{"metainfo": {"json_schema_version": 1}}, *commands]}

    def to_json(self) -> str:
        return json.dumps(self.document(), indent=1, sort_keys=True)

    def digest(self) -> str:
        # Compact: json's C encoder (an indented dump is the pure-Python one,
        # ~4 ms a ruleset, paid on the daemon's loop after every commit).
        text = json.dumps(self.document(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def _shape(obj: Json) -> Json:
    """An object without its elements: what a set-only update cannot change."""
    kind, body = next(iter(obj.items()))
    return {kind: {k: v for k, v in body.items() if k != "elem"}}


def compile_policy(policy: Policy, facts: Facts) -> Ruleset:
    uids, warnings = _resolve_users(policy, facts)
    c = _Compiler(policy, uids, facts.dns)
    c.ipv4(_lan_networks(policy, facts))
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
    c = _Builder()
    for family in FAMILIES.values():
        c.family = family
        c.table()
        for hook in ("input", "forward", "output"):
            c.chain(hook, hook)
        for hook, key in (("input", "iif"), ("output", "oif")):
            c.rule(hook, _match(_meta(key), "lo"), ACCEPT, comment="lockdown: loopback only")
    warning = "lockdown: no policy could be loaded; everything but loopback is dropped"
    return Ruleset(objects=tuple(c.objects), warnings=(warning,))


def _resolve_users(policy: Policy, facts: Facts) -> tuple[dict[str, int], list[str]]:
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


def _lan_networks(policy: Policy, facts: Facts) -> list[ipaddress.IPv4Network]:
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


# -- nft JSON vocabulary -----------------------------------------------------


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _payload(protocol: str, field: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field}}


def _match(left: Any, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _flags(mask: Any, value: Any, op: str = "==") -> Json:
    return _match({"&": [_payload("tcp", "flags"), mask]}, value, op)


def _vmap(key: Any, data: Any) -> Json:
    return {"vmap": {"key": key, "data": data}}


def _jump(chain: str) -> Json:
    return {"jump": {"target": chain}}


ACCEPT: Json = {"accept": None}
CT_STATE: Json = {"ct": {"key": "state"}}
RETURN: Json = {"return": None}
COUNTER: Json = {"counter": None}


def _one_or_set(values: Sequence[int]) -> Any:
    return values[0] if len(values) == 1 else {"set": sorted(values)}


def _l4proto(name: str) -> Json:
    return _match(_meta("l4proto"), PROTO[name])


def _network(net: ipaddress.IPv4Network) -> Any:
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


# -- the compiler ------------------------------------------------------------


class _Builder:
    """nft objects, all in the current family's tailsfw table, in order."""

    def __init__(self) -> None:
        self.objects: list[Json] = []
        self.family = "ip"

    def _base(self) -> Json:
        return {"family": self.family, "table": TABLE}

    def table(self) -> None:
        self.objects.append({"table": {"family": self.family, "name": TABLE}})

    def chain(self, name: str, hook: str | None = None, kind: str = "filter") -> None:
        chain: Json = {**self._base(), "name": name}
        if hook is not None:
            # Base chains drop what no rule accepts; nat only rewrites.
            policy, prio = ("accept", -100) if kind == "nat" else ("drop", 0)
            chain.update(type=kind, hook=hook, prio=prio, policy=policy)
        self.objects.append({"chain": chain})

    def rule(self, chain: str, *expr: Json, comment: str | None = None) -> None:
        rule: Json = {**self._base(), "chain": chain, "expr": list(expr)}
        if comment:
            rule["comment"] = comment
        self.objects.append({"rule": rule})

    def vmap_object(
        self,
        name: str,
        key_type: Any,
        elements: Iterable[tuple[Any, Json]],
        flags: Sequence[str] = (),
    ) -> None:
        elems = [[_key(k), v] for k, v in elements]
        self.set_object(name, key_type, elems, flags, kind="map")

    def set_object(
        self,
        name: str,
        key_type: Any,
        elements: Iterable[Any],
        flags: Sequence[str] = (),
        kind: str = "set",
    ) -> None:
        body: Json = {**self._base(), "name": name, "type": key_type}
        if kind == "map":
            body["map"] = "verdict"
        if flags:
            body["flags"] = list(flags)
        elems = [_key(e) for e in elements]
        if elems:
            body["elem"] = elems
        self.objects.append({kind: body})


class _Compiler(_Builder):
    def __init__(
        self, policy: Policy, uids: Mapping[str, int], dns: Sequence[ipaddress.IPv4Address]
    ) -> None:
        super().__init__()
        self.policy = policy
        self.uids = uids
        self.dns = dns

    # shared pieces

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
            self.rule(REFUSE, _l4proto("tcp"), {"reject": {"type": "tcp reset"}})
            self.rule(REFUSE, {"reject": {"type": "icmpv6", "expr": "port-unreachable"}})

    def related_chain(self, name: str, direction: str, *final: Json) -> None:
        """RELATED is only accepted on lo, for the errors our own rejects send."""
        lo = _match(_meta(direction), "lo")
        self.chain(name)
        icmp = "icmp" if self.family == "ip" else "ipv6-icmp"
        self.rule(name, lo, _l4proto(icmp), ACCEPT)
        if self.family == "ip6":
            self.rule(name, lo, _flags("rst", "rst"), ACCEPT)
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
        not_lo = [_match(_meta("oif"), "lo", "!=")]
        if family == "ipv4":
            # A packet our nat redirected here (stray DNS, a [[redirect]] from
            # outside 127.0.0.0/8) goes out on lo, but the output hook still
            # names the interface of its first route: let only those through.
            # (`ct status ! dnat`: the form nft lists back, so verify compares it.)
            not_lo.append(_match({"ct": {"key": "status"}}, "dnat", "!"))
        self.rule("local", *not_lo, RETURN)
        if family == "ipv6":
            self.rule("local", _match(_payload("ip6", "saddr"), "::1", "!="), RETURN)
        if any(r.protocol == "tcp" for r in rules):
            self.rule("local", _flags(SYN_MASK, "syn", "!="), RETURN, comment="TCP: SYN only")
        proto_port_uid = {"concat": [_meta("l4proto"), _payload("th", "dport"), _meta("skuid")]}
        self.rule("local", _vmap(proto_port_uid, "@local_ports"), comment="Tails rule 2")
        if anyport:
            proto_uid = {"concat": [_meta("l4proto"), _meta("skuid")]}
            self.rule("local", _vmap(proto_uid, "@local_any"))
        return True

    def _local_verdicts(
        self, rules: Sequence[LocalRule]
    ) -> tuple[dict[tuple[int, int, int], Json], dict[tuple[int, int], Json]]:
        exact: dict[tuple[int, int, int], Json] = {}
        anyport: dict[tuple[int, int], Json] = {}
        for rule in rules:
            for verdict, users in ((ACCEPT, rule.allow), (_jump(REFUSE), rule.reject)):
                for uid in self._uids(users):
                    proto = PROTO[rule.protocol]
                    if rule.ports is None:
                        anyport.setdefault((proto, uid), verdict)
                    for port in rule.ports or ():
                        exact.setdefault((proto, port, uid), verdict)
        return exact, anyport

    def _uids(self, users: Iterable[str]) -> list[int]:
        return [self.uids[u] for u in users if u in self.uids]

    def conntracked_chain(self, owners: Sequence[int] | None) -> None:
        """Established and related traffic (Tails rule 1); related only on lo.

        IPv4 adds the owners of direct UDP flows.  Conntrack knows flows, not
        users: once clearnet's DNS query to a server is answered, any user
        who sends from the same port to the same server matches that
        established entry, and a UDP port is free again as soon as its socket
        closes (and visible in /proc/net/udp).  Direct UDP flows carry their
        owner's uid in the ct mark; only that user's packets may use them.
        TCP needs no mark: a new SYN never rides on an old entry, and an
        unprivileged user cannot send on another's socket.
        """
        name = "conntracked"
        self.chain(name)
        established = _match(CT_STATE, "established")
        mark = {"ct": {"key": "mark"}}
        if owners is None:
            self.rule(name, established, ACCEPT)
            self.rule(name, _jump("out_related"))
            return
        # Nearly all traffic: decided by the first rule.
        self.rule(name, established, _match(mark, 0), ACCEPT)
        self.rule(name, _match(CT_STATE, "related"), _jump("out_related"))
        for uid in owners:
            self.rule(name, _match(mark, uid), _match(_meta("skuid"), uid), ACCEPT)
        self.rule(name, _jump(REFUSE), comment="another user's flow")

    def direct_chain(self, rule: DirectRule, uid: int) -> str:
        # The key as it is: distinct keys give distinct chains (policy.USER_KEY).
        name = "direct_" + rule.user
        self.chain(name)
        if not rule.loopback:
            self.rule(name, _match(_meta("oif"), "lo"), RETURN, comment="never loopback")
        # The flow is marked with its owner: see `conntracked_chain`.
        owner = {"mangle": {"key": {"ct": {"key": "mark"}}, "value": uid}}
        tcp = {"any": [_l4proto("tcp")], "new": [_flags(SYN_MASK, "syn")], "none": None}[rule.tcp]
        udp_ports = rule.udp_ports
        if self.policy.dns.clearnet == "nm":
            # DNS only to NetworkManager's servers.  A miss in the set (none
            # known, or while a commit retires the old elements) returns.
            servers = _match(_payload("ip", "daddr"), "@" + CLEARNET_DNS)
            if DNS_PORT in udp_ports:
                self.rule(name, _match(_payload("udp", "dport"), DNS_PORT), servers, owner, ACCEPT)
            if tcp is not None:
                self.rule(name, _match(_payload("tcp", "dport"), DNS_PORT), servers, *tcp, ACCEPT)
            self.rule(name, _match(_payload("th", "dport"), DNS_PORT), RETURN,
                      comment="DNS: only NetworkManager's servers")  # fmt: skip
            udp_ports = tuple(p for p in udp_ports if p != DNS_PORT)
        if udp_ports:
            self.rule(name, _match(_payload("udp", "dport"), _one_or_set(udp_ports)), owner, ACCEPT)
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
        self.rule("lan_refused", _jump(REFUSE))
        self.chain("lan")
        refused = self.lan_refused_ports()
        common = [(proto, port) for proto, port in refused if proto in ("tcp", "udp")]
        other = [(proto, port) for proto, port in refused if (proto, port) not in common]
        for proto, port in common:
            dport = _match(_payload("th", "dport"), port)
            self.rule("lan", _l4proto(proto), dport, _jump("lan_refused"))
        if other:
            # The rarer transports behind one range comparison, so that TCP
            # and UDP in the refused span pay one comparison for them.
            numbers = sorted(PROTO[proto] for proto, _ in other)
            span = {"range": [numbers[0], numbers[-1]]}
            self.rule("lan", _match(_meta("l4proto"), span), _jump("lan_other"))
            self.chain("lan_other")
            for proto, port in other:
                dport = _match(_payload("th", "dport"), port)
                self.rule("lan_other", _l4proto(proto), dport, _jump("lan_refused"))
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

    # the two tables

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
        self.rule("input", _match(CT_STATE, "established"), ACCEPT)
        self.rule("input", _match(_meta("iif"), "lo"), ACCEPT)
        self.rule("input", COUNTER, {"drop": None})
        self.chain("forward", "forward")
        self.rule("forward", COUNTER, {"drop": None})
        self.reject_chain()
        self.related_chain("out_related", "oif", _jump(REFUSE))
        direct = [(self.uids[r.user], r) for r in self.policy.direct if r.user in self.uids]
        self.conntracked_chain(sorted(uid for uid, r in direct if r.udp_ports))
        has_local = self.local_chain("ipv4")
        # Rules 3 and 4: one read of the uid, one lookup, whatever the count.
        by_uid = sorted((uid, _jump(self.direct_chain(rule, uid))) for uid, rule in direct)
        dispatch = _vmap(_meta("skuid"), {"set": [list(e) for e in by_uid]}) if by_uid else None
        self.lan_chain(dispatch)
        connected = self.policy.lan.mode == "connected"
        if connected:
            self.set_object("lan", "ipv4_addr", map(_network, lan), flags=["interval"])
        if self.policy.dns.clearnet == "nm":
            self.set_object(CLEARNET_DNS, "ipv4_addr", [str(a) for a in sorted(set(self.dns))])

        self.chain("output", "output")
        self.conntracked_rule()
        daddr = _payload("ip", "daddr")
        if has_local:
            self.rule("output", _match(daddr, LOOPBACK["ipv4"]), _jump("local"),
                      comment="Tails rule 2")  # fmt: skip
        # The LAN before the direct users: the LAN path then never reads the
        # uid, and `lan_refused` keeps Tails' order for the refused ports.
        ports = [port for _, port in self.lan_refused_ports()]
        for net in self.policy.lan.networks:
            # In "connected" mode the set holds what is on-link; the policy's
            # network first spares every other packet the lookup.
            to_lan = [_match(daddr, _network(net))]
            if connected:
                to_lan.append(_match(daddr, "@lan"))
            if ports:
                # Most LAN packets are outside the refused ports' span: one
                # range comparison accepts them here, without a jump (for
                # other protocols `th dport` reads other bytes; the LAN
                # accepts those protocols anyway).
                span = _match(_payload("th", "dport"), {"range": [min(ports), max(ports)]}, "!=")
                self.rule("output", *to_lan, span, ACCEPT)
            self.rule("output", *to_lan, _jump("lan"))
        if dispatch is not None:
            self.rule("output", dispatch, comment="Tails rules 3, 4")
        self.rule("output", _jump(REFUSE))
        self.nat_chain([uid for uid, _ in direct])

    def ipv6(self) -> None:
        self.family = "ip6"
        self.table()
        self.related_chain("in_related", "iif", COUNTER, {"drop": None})
        self.chain("input", "input")
        self.rule("input", _match(CT_STATE, "established"), ACCEPT, comment="Tails rule 1")
        self.rule("input", _match(CT_STATE, "related"), _jump("in_related"))
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
                _match(_meta("iif"), "lo"),
                _match(_payload("ip6", "saddr"), "::1"),
                _match(_payload("ip6", "daddr"), "::1"),
                _match(_payload("tcp", "dport"), _one_or_set(ports)),
                ACCEPT,
            )
        self.rule("input", COUNTER, {"drop": None})
        self.chain("forward", "forward")
        self.rule("forward", COUNTER, {"drop": None})
        self.reject_chain()
        self.related_chain("out_related", "oif", _jump(REFUSE))
        self.conntracked_chain(None)
        has_local = self.local_chain("ipv6")
        self.chain("output", "output")
        self.conntracked_rule()
        if has_local:
            self.rule("output", _match(_payload("ip6", "daddr"), LOOPBACK["ipv6"]), _jump("local"))
        self.rule("output", _jump(REFUSE))

    def conntracked_rule(self) -> None:
        """One comparison sends established and related packets aside.

        A plain comparison, not a verdict map: while a transaction commits,
        a packet still walking the old rules can miss in the old maps, and
        established traffic must not be refused for it.
        """
        both = _match(CT_STATE, ["established", "related"], "in")
        self.rule("output", both, _jump("conntracked"), comment="Tails rule 1")

    def nat_chain(self, direct_uids: Sequence[int]) -> None:
        self.chain("nat_output", "output", kind="nat")
        daddr = _payload("ip", "daddr")
        for r in self.policy.redirects:
            expr = [_match(daddr, _network(r.destination)), _l4proto(r.protocol)]
            if r.port is not None:
                expr.append(_match(_payload("th", "dport"), r.port))
            self.rule("nat_output", *expr, {"redirect": {"port": r.to_port}})
        if self.policy.dns.stray == "tor":
            # Everyone but the direct users: their DNS is theirs to send.
            expr = [
                _match(_payload("udp", "dport"), DNS_PORT),
                _match(daddr, _network(ipaddress.IPv4Network("127.0.0.0/8")), "!="),
            ]
            if direct_uids:
                expr.append(_match(_meta("skuid"), _one_or_set(sorted(direct_uids)), "!="))
            self.rule("nat_output", *expr, {"redirect": {"port": self.policy.dns.tor_port}},
                      comment="stray DNS to Tor's DNS port")  # fmt: skip


def _key(key: Any) -> Any:
    """Tuples are concatenations; anything else is already nft JSON."""
    return {"concat": list(key)} if isinstance(key, tuple) else key
