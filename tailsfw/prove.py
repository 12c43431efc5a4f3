"""`tailsfwctl prove`: every class of packet, decided by the kernel, checked
against the specification.

The classes come from the ruleset itself (tailsfw/classes.py); one packet of
each is sent through the kernel in a scratch namespace (tailsfw/explain.py,
tailsfw/scratch.py); each verdict is compared with the oracle's
(tailsfw/oracle.py).  Every difference is printed with explain's detail.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from . import classes, explain, oracle
from .classes import Packet
from .policy import Policy

Json = dict[str, Any]


@dataclass(frozen=True)
class Difference:
    packet: Packet
    seen: explain.Seen
    decision: oracle.Decision

    def lines(self) -> list[str]:
        return explain.detail(self.packet, self.seen, self.decision)


@dataclass(frozen=True)
class Report:
    classes: int
    seconds: float
    differences: tuple[Difference, ...]

    def summary(self) -> str:
        count = len(self.differences)
        return (
            f"tailsfwctl: {self.classes} classes of packets checked in the kernel in "
            f"{self.seconds:.1f} s: {count} difference{'s' * (count != 1)} "
            "from the specification"
        )


def objects(document: Json) -> list[Json]:
    """The objects a document adds (a compiled ruleset's or a listing's)."""
    found = []
    for command in document["nftables"]:
        kind = next(iter(command))
        if kind == "add":
            found.append(command["add"])
        elif kind not in ("delete", "metainfo", "flush"):
            found.append(command)
    return found


def prove(
    document: Json, world: oracle.World, select: Callable[[list[Packet]], Iterable[Packet]] = list
) -> Report:
    """Send one packet of every class (or of those `select` keeps) and compare."""
    start = time.monotonic()
    links = links_of(world.policy)
    packets = list(select(classes.derive(objects(document), links)))
    seen = explain.probe(document, packets, links)
    differences = tuple(
        Difference(packet, kernel, decision)
        for packet, kernel in zip(packets, seen, strict=True)
        if not explain.agrees(kernel, decision := oracle.decide(world, packet))
    )
    return Report(len(packets), time.monotonic() - start, differences)


def links_of(pol: Policy) -> list[classes.Link]:
    """The scratch namespace's links: each application namespace's host veth."""
    return [
        classes.Link(ns.veth, str(ns.host), str(ns.guest), str(ns.network)) for ns in pol.namespaces
    ]


def world_of(pol: Policy, connected: frozenset[ipaddress.IPv4Network]) -> oracle.World:
    """The oracle's world: the policy, its users' uids now, the on-link networks."""
    from . import users

    return oracle.World(pol, oracle.user_uids(pol, users.lookup_uids(pol)), connected)
