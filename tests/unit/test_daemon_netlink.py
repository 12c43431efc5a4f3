"""Netlink messages -> links, addresses and connected networks (no socket)."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg  # type: ignore[import-untyped]
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg  # type: ignore[import-untyped]

from tailsfw.links import Link, Snapshot
from tailsfw.netlink import IFF_UP, State, address_of

Net = ipaddress.IPv4Network


def link(event: str, index: int, name: str, up: bool = True) -> Any:
    msg = ifinfmsg()
    msg["index"] = index
    msg["flags"] = IFF_UP if up else 0
    msg["attrs"] = [("IFLA_IFNAME", name)]
    msg["event"] = event
    return msg


def addr(event: str, index: int, cidr: str, peer: str | None = None) -> Any:
    iface = ipaddress.ip_interface(cidr)
    msg = ifaddrmsg()
    msg["index"] = index
    msg["family"] = socket.AF_INET if iface.version == 4 else socket.AF_INET6
    msg["prefixlen"] = iface.network.prefixlen
    local = str(iface.ip)
    msg["attrs"] = [("IFA_ADDRESS", peer or local), ("IFA_LOCAL", local)]
    msg["event"] = event
    return msg


def state(*messages: Any) -> State:
    s = State()
    for m in messages:
        s.update(m)
    return s


def test_connected_networks_come_from_each_address_prefix() -> None:
    s = state(
        link("RTM_NEWLINK", 1, "lo"),
        link("RTM_NEWLINK", 2, "eth0"),
        addr("RTM_NEWADDR", 1, "127.0.0.1/8"),
        addr("RTM_NEWADDR", 2, "192.168.1.7/24"),
        addr("RTM_NEWADDR", 2, "10.1.2.3/16"),
        addr("RTM_NEWADDR", 2, "2001:db8::7/64"),
    )
    snap = s.snapshot()
    assert snap.connected == {Net("127.0.0.0/8"), Net("192.168.1.0/24"), Net("10.1.0.0/16")}
    assert snap.names == {1: "lo", 2: "eth0"}


def test_point_to_point_addresses_give_the_peer_prefix() -> None:
    s = state(link("RTM_NEWLINK", 3, "ppp0"), addr("RTM_NEWADDR", 3, "10.64.0.5/32", "10.64.0.1"))
    assert s.snapshot().connected == {Net("10.64.0.1/32")}


def test_an_interface_that_is_down_connects_nothing() -> None:
    s = state(link("RTM_NEWLINK", 2, "eth0", up=False), addr("RTM_NEWADDR", 2, "192.168.1.7/24"))
    assert s.snapshot().connected == frozenset()
    s.update(link("RTM_NEWLINK", 2, "eth0", up=True))
    assert s.snapshot().connected == {Net("192.168.1.0/24")}


def test_deleted_addresses_and_links_are_gone() -> None:
    s = state(
        link("RTM_NEWLINK", 2, "eth0"),
        link("RTM_NEWLINK", 3, "wlan0"),
        addr("RTM_NEWADDR", 2, "192.168.1.7/24"),
        addr("RTM_NEWADDR", 3, "10.0.0.2/8"),
    )
    s.update(addr("RTM_DELADDR", 2, "192.168.1.7/24"))
    assert s.snapshot().connected == {Net("10.0.0.0/8")}
    # A link's removal takes its addresses, even if their removal was not seen.
    s.update(link("RTM_DELLINK", 3, "wlan0"))
    assert s.snapshot() == Snapshot(frozenset({Link(2, "eth0", True)}), frozenset())


def test_a_rename_keeps_the_index() -> None:
    s = state(link("RTM_NEWLINK", 2, "eth0"))
    s.update(link("RTM_NEWLINK", 2, "lan0"))
    assert s.snapshot().names == {2: "lan0"}


def test_a_full_read_replaces_everything() -> None:
    s = state(link("RTM_NEWLINK", 2, "eth0"), addr("RTM_NEWADDR", 2, "192.168.1.7/24"))
    s.load([link("RTM_NEWLINK", 1, "lo"), addr("RTM_NEWADDR", 1, "127.0.0.1/8")])
    assert s.snapshot().names == {1: "lo"}
    assert s.snapshot().connected == {Net("127.0.0.0/8")}


def test_replaying_events_over_a_newer_dump_converges() -> None:
    """Events queued while the dump ran are applied after it, in order."""
    add, delete = addr("RTM_NEWADDR", 2, "10.9.0.1/24"), addr("RTM_DELADDR", 2, "10.9.0.1/24")
    s = State()
    s.load([link("RTM_NEWLINK", 2, "eth0")])  # the dump already misses 10.9.0.1
    s.update(add)
    s.update(delete)
    assert s.snapshot().connected == frozenset()


def test_other_families_are_ignored() -> None:
    msg = addr("RTM_NEWADDR", 2, "192.168.1.7/24")
    msg["family"] = socket.AF_PACKET
    assert address_of(msg) is None
