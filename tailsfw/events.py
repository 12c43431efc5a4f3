"""What the outside worlds report: one small frozen dataclass per kind of fact.

Each source (netlink, NetworkManager, files, nftables' own notifications,
the account database, the kernel's listing of our tables) yields these; the
daemon folds them into `Facts` (`updated`, here) or reacts to them.  Nothing
here does I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

from .facts import Facts
from .links import Snapshot

if TYPE_CHECKING:
    from .netnsfiles import NetnsId


@dataclass(frozen=True)
class LinksChanged:
    """netlink: the links and addresses, whole (a new snapshot)."""

    snapshot: Snapshot


@dataclass(frozen=True)
class DnsServers:
    """NetworkManager: the clearnet DNS servers, in its order, already checked.

    `refused` names every value that was not a usable IPv4 address, and why;
    `available` is False while NetworkManager (or the bus) is gone: the last
    good list then stays in force.
    """

    servers: tuple[ipaddress.IPv4Address, ...]
    refused: tuple[str, ...] = ()
    available: bool = True


@dataclass(frozen=True)
class FileChanged:
    """A file we keep (resolv.conf, ...) was changed, replaced or deleted by another."""

    path: Path


@dataclass(frozen=True)
class RulesetTouched:
    """Another process committed a change to a tailsfw table (or may have:
    `pid` 0 when notifications were lost and the kernel must be checked)."""

    pid: int
    process: str
    what: str


@dataclass(frozen=True)
class GuestTouched:
    """Another process committed a change to a namespace's tailsfw table
    (`pid` 0: notifications inside it were lost)."""

    name: str
    identity: NetnsId
    pid: int
    process: str
    what: str


@dataclass(frozen=True)
class AccountsChanged:
    """The account database, whole: account name -> uid, for every account in it
    (the policy picks the ones it names, in the pure `desired`)."""

    uids: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class KernelChecked:
    """The ruleset effect listed the kernel's tables, away from the loop: what
    they hold that differs from the ruleset in force ([]: nothing).  `notice`
    is the lost-notifications notice that asked for the check ("" when the
    status asked): a difference found then is tampering."""

    differences: tuple[str, ...]
    notice: str = ""


@dataclass(frozen=True)
class NamespacesPresent:
    """The network namespaces named in /run/netns, whole: (name, identity)
    of each namespace file, sorted by name."""

    namespaces: tuple[tuple[str, NetnsId], ...] = ()


Event = (
    LinksChanged
    | DnsServers
    | FileChanged
    | RulesetTouched
    | GuestTouched
    | AccountsChanged
    | KernelChecked
    | NamespacesPresent
)


class Source(Protocol):
    """One outside world.  `events()` reads the whole state first, then follows
    changes, and reads everything again after any gap; it never ends while
    the daemon runs, and never raises for the world's own failures."""

    name: str

    def events(self) -> AsyncIterator[Event]: ...


def updated(facts: Facts, event: Event) -> Facts:
    """`facts` with one event folded in; the same object if nothing changed."""
    if isinstance(event, LinksChanged):
        snapshot = event.snapshot
        names = snapshot.names
        if snapshot.connected == facts.connected and names == facts.interfaces:
            return facts
        return replace(
            facts, connected=snapshot.connected, interfaces=MappingProxyType(dict(names))
        )
    if isinstance(event, DnsServers):
        # While NetworkManager is gone, the last good list stays.
        if not event.available or (facts.dns_known and event.servers == facts.dns):
            return facts
        return replace(facts, dns=event.servers, dns_known=True)
    if isinstance(event, AccountsChanged):
        if event.uids == facts.uids:
            return facts
        return replace(facts, uids=MappingProxyType(dict(event.uids)))
    if isinstance(event, NamespacesPresent):
        if event.namespaces == facts.netns:
            return facts
        return replace(facts, netns=event.namespaces)
    return facts
