"""Which established flows a commit forbids: pure.

Conntrack lets an established flow through on its first rule ("ct state
established"), so a flow a reload or a fact change forbids would outlive
its permission.  `cuts(old, new)` names, for a commit from `old` to `new`,
the conntrack entries to delete (`tailsfw.conntrack.delete` deletes them,
after the commit: never before, so nothing is ever less enforced):

- a direct user's flows, marked with the owner's uid (see the compiler's
  `conntracked_chain`): all of them when the uid is no longer a direct
  user's (its entry removed, its account gone), its flows to 127.0.0.0/8
  when it loses `loopback`, its TCP flows when it loses direct TCP, its UDP
  flows when it loses direct UDP, or the ones to the UDP ports it lost;
- in `lan.mode = "connected"`, the flows to or from an on-link LAN network
  that is gone;
- in `dns.clearnet = "nm"`, a direct user's DNS flows to a server
  NetworkManager no longer gives (all of its DNS flows when a reload
  narrows "any" to "nm": "any" named no server);
- the flows to or from a namespace's addresses when the namespace is gone.

`tcp = "any"` and `"new"` cut nothing from each other: a connection opened
by a SYN is what both allow (a flow "any" picked up midway is not told
apart).
"""

from __future__ import annotations

import bisect
import ipaddress
from dataclasses import dataclass

from .compiler import lan_networks, resolve_users
from .desired import Desired

TCP, UDP = 6, 17
DNS = frozenset({53})
LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
Network = ipaddress.IPv4Network


@dataclass(frozen=True)
class Cut:
    """The conntrack entries that match every field given (None: any)."""

    why: str
    mark: int | None = None
    proto: int | None = None
    dports: frozenset[int] | None = None  # the original direction's destination port
    network: Network | None = None  # an address of either direction in it


def cuts(old: Desired | None, new: Desired) -> list[Cut]:
    """The flows `old` allowed that `new` forbids (nothing known before: none)."""
    if old is None:
        return []
    return [*_direct(old, new), *_lans(old, new), *_dns(old, new), *_namespaces(old, new)]


@dataclass(frozen=True)
class _Rights:
    """What a direct user's marked flows may be."""

    tcp: bool
    udp_ports: frozenset[int]
    loopback: bool


def _rights(d: Desired) -> dict[int, _Rights]:
    """uid -> what its direct flows (marked with it) may be."""
    uids, _ = resolve_users(d.policy, d.facts)
    rights: dict[int, _Rights] = {}
    for rule in d.policy.direct:
        if rule.user in uids and (rule.tcp != "none" or rule.udp_ports):
            rights[uids[rule.user]] = _Rights(
                rule.tcp != "none", frozenset(rule.udp_ports), rule.loopback
            )
    return rights


def _direct(old: Desired, new: Desired) -> list[Cut]:
    before, after = _rights(old), _rights(new)
    found = []
    for uid, had in sorted(before.items()):
        has = after.get(uid)
        if has is None:
            found.append(Cut(f"uid {uid} is no longer a direct user", mark=uid))
            continue
        if had.loopback and not has.loopback:
            # The ruleset refuses the rest on `lo` (`conntracked_chain`).
            found.append(Cut(f"uid {uid} lost loopback", mark=uid, network=LOOPBACK))
        if had.tcp and not has.tcp:
            found.append(Cut(f"uid {uid} lost direct TCP", mark=uid, proto=TCP))
        if had.udp_ports and not has.udp_ports:
            found.append(Cut(f"uid {uid} lost direct UDP", mark=uid, proto=UDP))
        elif lost := had.udp_ports - has.udp_ports:
            found.append(Cut(f"uid {uid} lost direct UDP ports {sorted(lost)}", mark=uid,
                             proto=UDP, dports=frozenset(lost)))  # fmt: skip
    return found


def _lans(old: Desired, new: Desired) -> list[Cut]:
    if old.policy.lan.mode != "connected":
        return []  # rfc1918 mode: the LAN networks are the policy's, on-link or not
    before = lan_networks(old.policy, old.facts)
    # In integers and by bisection: 2,000 on-link networks gone in a storm
    # must not cost the loop seconds (lan_networks' spans never overlap).
    spans = sorted((int(n.network_address), int(n.broadcast_address))
                   for n in lan_networks(new.policy, new.facts))  # fmt: skip
    lows = [low for low, _ in spans]

    def kept(net: Network) -> bool:
        i = bisect.bisect_right(lows, int(net.network_address)) - 1
        return i >= 0 and spans[i][1] >= int(net.broadcast_address)

    return [Cut(f"LAN network {net} gone", network=net) for net in before if not kept(net)]


def _dns(old: Desired, new: Desired) -> list[Cut]:
    """Marked flows to port 53 (the direct chains' DNS rules mark them), per
    owner that keeps its rights: `_direct` cuts the others whole."""
    if new.policy.dns.clearnet != "nm":
        return []
    owners = sorted(_rights(old).keys() & _rights(new).keys())
    if old.policy.dns.clearnet != "nm":
        why = "DNS narrowed to NetworkManager's servers"
        return [Cut(f"{why}: uid {uid}", mark=uid, dports=DNS) for uid in owners]
    gone = sorted(set(old.facts.dns) - set(new.facts.dns))
    return [
        Cut(f"DNS server {server} no longer NetworkManager's: uid {uid}", mark=uid,
            dports=DNS, network=Network(server))
        for server in gone
        for uid in owners
    ]  # fmt: skip


def _namespaces(old: Desired, new: Desired) -> list[Cut]:
    kept = {(ns.host, ns.guest) for ns in new.policy.namespaces}
    return [
        Cut(f"namespace {ns.name} gone", network=Network(f"{ns.host}/30", strict=False))
        for ns in old.policy.namespaces
        if (ns.host, ns.guest) not in kept
    ]
