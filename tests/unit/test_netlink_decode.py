"""tailsfw's rtnetlink decoder against messages encoded by pyroute2."""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg  # type: ignore[import-untyped]
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg  # type: ignore[import-untyped]

from tailsfw import netlink, nlsock
from tailsfw.netlink import IFF_UP, State


def encoded(msg: Any, kind: int, seq: int = 0) -> bytes:
    msg["header"]["type"] = kind
    msg["header"]["sequence_number"] = seq
    msg.encode()
    return bytes(msg.data)


def link(kind: int, index: int, name: str, up: bool = True) -> bytes:
    msg = ifinfmsg()
    msg["index"], msg["flags"] = index, IFF_UP if up else 0
    # Odd-sized attributes first: each must be found at its aligned offset.
    msg["attrs"] = [("IFLA_QDISC", "pfifo"), ("IFLA_IFNAME", name), ("IFLA_TXQLEN", 1000)]
    return encoded(msg, kind)


def addr(kind: int, index: int, family: int, address: str, prefixlen: int, local: str) -> bytes:
    msg = ifaddrmsg()
    msg["index"], msg["family"], msg["prefixlen"] = index, family, prefixlen
    msg["attrs"] = [("IFA_LABEL", "x"), ("IFA_ADDRESS", address), ("IFA_LOCAL", local)]
    return encoded(msg, kind)


def test_links_and_addresses_of_one_datagram() -> None:
    data = b"".join([
        link(netlink.RTM_NEWLINK, 2, "eth0"),
        addr(netlink.RTM_NEWADDR, 2, socket.AF_INET, "10.64.0.1", 32, "10.64.0.5"),
        addr(netlink.RTM_NEWADDR, 2, socket.AF_INET6, "2001:db8::7", 64, "2001:db8::7"),
        link(netlink.RTM_NEWLINK, 3, "br0", up=False),
        link(netlink.RTM_DELLINK, 3, "br0", up=False),
    ])  # fmt: skip
    messages, done = netlink.decode(data)
    assert not done
    assert [m["event"] for m in messages] == [
        "RTM_NEWLINK", "RTM_NEWADDR", "RTM_NEWADDR", "RTM_NEWLINK", "RTM_DELLINK",
    ]  # fmt: skip
    state = State()
    for m in messages:
        state.update(m)
    snap = state.snapshot()
    assert snap.names == {2: "eth0"}
    assert {(a.local, str(a.prefix)) for a in snap.addresses} == {
        ("10.64.0.5", "10.64.0.1/32"),
        ("2001:db8::7", "2001:db8::7/64"),
    }


def test_the_end_of_a_dump_and_a_refusal() -> None:
    done = struct.pack("=IHHIIi", 20, nlsock.NLMSG_DONE, 2, 7, 0, 0)
    assert netlink.decode(done, seq=7) == ([], True)
    assert netlink.decode(done, seq=8) == ([], False)  # another dump's end
    refused = struct.pack("=IHHIIi", 20, nlsock.NLMSG_ERROR, 0, 7, 0, -1)
    with pytest.raises(netlink.NetlinkError, match="EPERM"):
        netlink.decode(refused, seq=7)


def test_a_truncated_message_is_an_error() -> None:
    data = link(netlink.RTM_NEWLINK, 2, "eth0")
    with pytest.raises(ValueError, match="truncated"):
        netlink.decode(data[:-4])


def test_dump_requests() -> None:
    request = netlink.dump_request(netlink.RTM_GETADDR, 2)
    length, kind, flags, seq, _ = nlsock.HEADER.unpack_from(request)
    assert (length, kind, flags, seq) == (len(request), netlink.RTM_GETADDR, 0x301, 2)
