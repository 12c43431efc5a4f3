"""conntrack.delete against the kernel, in a throw-away network namespace:
the entries a cut names go, the others stay."""

from __future__ import annotations

import ipaddress
import socket
import struct

from tailsfw import conntrack
from tailsfw.classes import TCP, UDP, Packet
from tailsfw.flowcut import Cut
from tailsfw.scratch import flow_message, run_in_scratch

FLOWS = [
    Packet("ipv4", 110, "192.0.2.7", UDP, 53, saddr="10.0.0.2", established=True, mark=110),
    Packet("ipv4", 110, "192.0.2.7", UDP, 123, saddr="10.0.0.2", established=True, mark=110),
    Packet("ipv4", 107, "192.0.2.8", UDP, 53, saddr="10.0.0.2", established=True, mark=107),
    Packet("ipv4", 1000, "192.168.1.5", TCP, 80, saddr="192.168.1.2", established=True),
    Packet("ipv4", 1000, "10.200.1.2", TCP, 9050, saddr="10.200.1.1", established=True),
]


def left_after(cuts: list[Cut]) -> tuple[int, list[tuple[str, int, int]]]:
    """Make FLOWS in a scratch namespace, cut; (deleted, what is left)."""

    def job() -> tuple[int, list[tuple[str, int, int]]]:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, conntrack.NETLINK_NETFILTER) as s:
            for i, p in enumerate(FLOWS):
                s.send(flow_message(i, p, create=True))
                code = struct.unpack_from("=i", s.recv(4096), 16)[0]
                assert code == 0, f"flow {i} refused: {code}"
        deleted = conntrack.delete(cuts)
        left = conntrack.dump()
        return deleted, sorted((str(e.addresses[1]), e.dport or 0, e.mark) for e in left)

    return run_in_scratch(job, timeout=60)


def test_nothing_cut_leaves_every_entry() -> None:
    assert left_after([]) == (0, sorted([
        ("192.0.2.7", 53, 110), ("192.0.2.7", 123, 110), ("192.0.2.8", 53, 107),
        ("192.168.1.5", 80, 0), ("10.200.1.2", 9050, 0),
    ]))  # fmt: skip


def test_a_mark_and_a_port_cut_only_those() -> None:
    cut = Cut("", mark=110, proto=UDP, dports=frozenset({123}))
    deleted, left = left_after([cut])
    assert deleted == 1
    assert ("192.0.2.7", 123, 110) not in left and len(left) == 4


def test_networks_and_marks_cut_together() -> None:
    cuts = [
        Cut("", mark=107),
        Cut("", network=ipaddress.IPv4Network("192.168.1.0/24")),
        Cut("", network=ipaddress.IPv4Network("10.200.1.0/30")),
    ]
    deleted, left = left_after(cuts)
    assert deleted == 3
    assert left == [("192.0.2.7", 53, 110), ("192.0.2.7", 123, 110)]
