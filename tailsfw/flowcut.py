"""Which established flows a commit forbids: pure.

Conntrack lets an established flow through on its first rule ("ct state
established"), so a flow a reload or a fact change forbids would outlive
its permission.  `cuts(old, new)` names, for a commit from `old` to `new`,
the conntrack entries to delete (`tailsfw.conntrack.delete` deletes them,
after the commit: never before, so nothing is ever less enforced):

- a direct user's UDP flows, marked with the owner's uid (see the
  compiler's `conntracked_chain`), when the user loses direct UDP, or the
  ones to the UDP ports it lost;
- in `lan.mode = "connected"`, the flows to or from an on-link LAN network
  that is gone;
- the flows to or from a namespace's addresses when the namespace is gone.

Direct users' TCP flows carry no mark: they are not cut (a new connection
is refused at once; an established one ends when it ends).
"""

from __future__ import annotations

import bisect
import ipaddress
from dataclasses import dataclass

from .compiler import lan_networks, resolve_users
from .desired import Desired

UDP = 17
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
    return [*_direct_udp(old, new), *_lans(old, new), *_namespaces(old, new)]


def _udp_rights(d: Desired) -> dict[int, frozenset[int]]:
    """uid -> the UDP ports its direct flows (marked with it) may use."""
    uids, _ = resolve_users(d.policy, d.facts)
    rights: dict[int, frozenset[int]] = {}
    for rule in d.policy.direct:
        if rule.user in uids and rule.udp_ports:
            rights[uids[rule.user]] = frozenset(rule.udp_ports)
    return rights


def _direct_udp(old: Desired, new: Desired) -> list[Cut]:
    before, after = _udp_rights(old), _udp_rights(new)
    found = []
    for uid, ports in sorted(before.items()):
        if uid not in after:
            found.append(Cut(f"uid {uid} lost direct UDP", mark=uid))
        elif lost := ports - after[uid]:
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


def _namespaces(old: Desired, new: Desired) -> list[Cut]:
    kept = {(ns.host, ns.guest) for ns in new.policy.namespaces}
    return [
        Cut(f"namespace {ns.name} gone", network=Network(f"{ns.host}/30", strict=False))
        for ns in old.policy.namespaces
        if (ns.host, ns.guest) not in kept
    ]
