"""The application namespaces' rules, pure: the host's side, each guest's
ruleset, and the kernel settings of both.

Host side (in the host's `ip tailsfw` table, names matched by `iifname`, so
that the rules hold before the veths exist and whenever they are made again):
- input: from each veth exactly its guest address to its host address, TCP,
  the exposed ports; everything else from a namespace is rejected;
- forward: only in from a clearnet veth, never to a namespace's /30 nor out
  to a namespace's veth, with the TTL reset to 64 (Tails 7.9, tails#21617);
  back to it only its replies (stricter than Tails: no new connection into
  the clearnet namespace, even through the host);
- nat postrouting: the clearnet /30 masqueraded;
- output: the ICMP errors of those rejects, related, out to the veths.
IPv6 is never forwarded (the ip6 table's forward chain drops).

Guest side (an `ip tailsfw` table inside the namespace): 127.0.0.1:PORT on
`lo` DNATed to the host's address for each exposed port, masquerade on
`veth0` (so that the host sees the guest address), then anti-spoofing: after
that masquerade, nothing leaves `veth0` with another source.  A clearnet
guest also refuses every new connection from outside.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .nftjson import (
    ACCEPT,
    COUNTER,
    CT_STATE,
    LOAD_ORDER,
    Builder,
    Json,
    Ruleset,
    l4proto,
    match,
    meta,
    network,
    one_or_set,
    payload,
)
from .nspolicy import GUEST_VETH, Namespace, Transparent
from .policyread import RFC1918

if TYPE_CHECKING:
    from .netnsfiles import NetnsId

Setting = tuple[tuple[str, ...], str]  # (/proc/sys path parts, value)
LOOPBACK_NET = ipaddress.IPv4Network("127.0.0.0/8")
FORWARDED_TTL = 64
DROP: Json = {"drop": None}
REJECT: Json = {"reject": None}  # ICMP port unreachable: the application fails at once


@dataclass(frozen=True)
class Guest:
    """A policy namespace that is present, and its namespace file's identity:
    one made again under the same name is another guest."""

    ns: Namespace
    identity: NetnsId


APP_NETWORK = ipaddress.IPv4Network("10.200.1.0/24")  # Tails' namespaces' network


def _names(values: Iterable[str]) -> object:
    ordered = sorted(values)
    return ordered[0] if len(ordered) == 1 else {"set": ordered}


def _spans(nets: Iterable[ipaddress.IPv4Network]) -> list[object]:
    """Networks as the fewest contiguous spans, each written as nft lists it
    back (a prefix, or a range: nft merges adjacent set elements, so a set
    of /30s would read back as something else than what was loaded)."""
    merged: list[list[ipaddress.IPv4Address]] = []
    for net in ipaddress.collapse_addresses(nets):
        if merged and int(net.network_address) == int(merged[-1][1]) + 1:
            merged[-1][1] = net.broadcast_address
        else:
            merged.append([net.network_address, net.broadcast_address])
    spans: list[object] = []
    for low, high in merged:
        (*cidrs,) = ipaddress.summarize_address_range(low, high)
        spans.append(network(cidrs[0]) if len(cidrs) == 1 else {"range": [str(low), str(high)]})
    return spans


def host_input(b: Builder, namespaces: Sequence[Namespace]) -> None:
    """The input chain's rules for the namespaces (before its final drop)."""
    if not namespaces:
        return
    for ns in namespaces:
        if ns.expose:
            b.rule(
                "input",
                match(meta("iifname"), ns.veth),
                match(payload("ip", "saddr"), str(ns.guest)),
                match(payload("ip", "daddr"), str(ns.host)),
                match(payload("tcp", "dport"), one_or_set(ns.expose)),
                ACCEPT,
                comment=f"namespace {ns.name}",
            )
    veths = _names(ns.veth for ns in namespaces)
    b.rule("input", match(meta("iifname"), veths), COUNTER, REJECT,
           comment="namespaces: nothing else reaches the host")  # fmt: skip


def host_forward(b: Builder, namespaces: Sequence[Namespace]) -> None:
    """The forward chain's rules (before its final drop): clearnet only."""
    clearnet = [ns for ns in namespaces if ns.clearnet]
    if not clearnet:
        return
    iif = match(meta("iifname"), _names(ns.veth for ns in clearnet))
    # The spec's 10.200.1.0/24 whole, not only the namespaces' /30s: what is
    # not a namespace there now may be one later.
    for span in _spans([APP_NETWORK, *(ns.network for ns in namespaces)]):
        b.rule("forward", iif, match(payload("ip", "daddr"), span), COUNTER, REJECT,
               comment="clearnet: never to a namespace")  # fmt: skip
    b.rule("forward", iif, match(meta("oifname"), _names(ns.veth for ns in namespaces)),
           COUNTER, REJECT)  # fmt: skip
    ttl = {"mangle": {"key": payload("ip", "ttl"), "value": FORWARDED_TTL}}
    b.rule("forward", iif, ttl, ACCEPT, comment="clearnet: out, with TTL 64")
    b.rule(
        "forward",
        match(meta("oifname"), _names(ns.veth for ns in clearnet)),
        match(CT_STATE, ["established", "related"], "in"),
        ACCEPT,
        comment="clearnet: its replies",
    )


def related_out(namespaces: Sequence[Namespace]) -> list[Json] | None:
    """The rule that lets our rejects' ICMP errors out to the veths."""
    if not namespaces:
        return None
    return [match(meta("oifname"), _names(ns.veth for ns in namespaces)), l4proto("icmp"), ACCEPT]


def host_nat(b: Builder, namespaces: Sequence[Namespace]) -> None:
    """nat postrouting: each clearnet /30 leaves masqueraded."""
    clearnet = [ns for ns in namespaces if ns.clearnet]
    if not clearnet:
        return
    b.chain("nat_postrouting", "postrouting", kind="nat")
    for ns in clearnet:
        b.rule("nat_postrouting", match(payload("ip", "saddr"), network(ns.network)),
               match(meta("oifname"), ns.veth, "!="), {"masquerade": None},
               comment=f"namespace {ns.name}")  # fmt: skip


def transparent_nat(b: Builder, transparent: Transparent, uids: Mapping[str, int]) -> None:
    """nat output: the users' TCP to anything but RFC 1918 and loopback goes
    to the TransPort (their accept there is in the local verdict map)."""
    users = sorted(uids[u] for u in transparent.users if u in uids)
    if not users:
        return
    private = [network(n) for n in (*RFC1918, LOOPBACK_NET)]
    b.rule("nat_output", match(meta("skuid"), one_or_set(users)), l4proto("tcp"),
           match(payload("ip", "daddr"), {"set": private}, "!="),
           {"redirect": {"port": transparent.to_port}},
           comment="transparent proxying")  # fmt: skip


def guest_ruleset(ns: Namespace) -> Ruleset:
    """The ruleset inside the namespace (its own `ip tailsfw` table)."""
    b = Builder()
    b.table()
    b.chain("nat_output", "output", kind="nat")
    for port in ns.expose:
        b.rule("nat_output", match(meta("oifname"), "lo"),
               match(payload("ip", "daddr"), "127.0.0.1"), match(payload("tcp", "dport"), port),
               {"dnat": {"addr": str(ns.host), "port": port}},
               comment=f"127.0.0.1:{port} is the host's")  # fmt: skip
    b.chain("nat_postrouting", "postrouting", kind="nat")
    b.rule("nat_postrouting", match(meta("oifname"), GUEST_VETH), {"masquerade": None})
    # After the masquerade: DNATed connections have the guest address by now.
    b.chain("postrouting", "postrouting", policy="accept")
    b.rule("postrouting", match(meta("oifname"), GUEST_VETH),
           match(payload("ip", "saddr"), str(ns.guest), "!="), COUNTER, DROP,
           comment="no spoofing")  # fmt: skip
    if ns.clearnet:
        b.chain("input", "input")
        b.rule("input", match(CT_STATE, ["established", "related"], "in"), ACCEPT)
        b.rule("input", match(meta("iifname"), "lo"), ACCEPT)
        b.rule("input", COUNTER, DROP, comment="nothing connects in")
    objects = sorted(b.objects, key=lambda o: LOAD_ORDER.index(next(iter(o))))
    return Ruleset(objects=tuple(objects), warnings=())


def host_sysctls(namespaces: Sequence[Namespace], present: Collection[str]) -> tuple[Setting, ...]:
    """The host's forwarding settings for the veths in `present`, in order:
    `ip_forward` first (writing it sets every interface's `forwarding`), 1
    only while a clearnet veth exists; then 1 on clearnet veths, 0 on the
    others."""
    here = [ns for ns in namespaces if ns.veth in present]
    forward = "1" if any(ns.clearnet for ns in here) else "0"
    settings: list[Setting] = [(("net", "ipv4", "ip_forward"), forward)]
    for ns in sorted(here, key=lambda ns: ns.veth):
        value = "1" if ns.clearnet and forward == "1" else "0"
        settings.append((("net", "ipv4", "conf", ns.veth, "forwarding"), value))
    return tuple(settings)


# Inside every namespace: it forwards nothing, and 127.0.0.1 may be routed
# out (the DNAT of 127.0.0.1:PORT leaves by veth0 before its masquerade).
GUEST_SETTINGS: tuple[Setting, ...] = (
    (("net", "ipv4", "ip_forward"), "0"),
    (("net", "ipv4", "conf", "all", "forwarding"), "0"),
    (("net", "ipv4", "conf", "lo", "forwarding"), "0"),
    (("net", "ipv4", "conf", "all", "route_localnet"), "1"),
)
