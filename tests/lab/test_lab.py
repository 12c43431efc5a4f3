"""Tests of the lab itself, with no firewall loaded in the host.

They pin what the firewall tests rely on: an unfiltered host reaches every
peer address and protocol, every such packet is counted, local traffic is
not, the peer reaches the host's inbound listeners, and run_as really
switches user.  The lab is shared by the whole session: each test first
removes whatever ruleset an earlier test file loaded into the host.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.lab.command import PYTHON
from tests.lab.kernel import abort_connections
from tests.lab.topology import (
    HOST_INBOUND_PORT,
    HOST_TCP_PORTS,
    HOST_V4,
    HOST_V6,
    INTERNET_V4,
    INTERNET_V6,
    PEER_LAN_V4,
    Lab,
)
from tests.lab.traffic import late_answer


@pytest.fixture(autouse=True)
def unfiltered(lab: Lab) -> Iterator[None]:
    """No ruleset in the host, whatever ran before (test files in any order),
    and no connection its rules held back."""
    abort_connections(lab.host_ns, lab.peer_ns)
    lab.host(["nft", "flush", "ruleset"])
    yield


@pytest.mark.parametrize(
    ("proto", "family", "dst", "port", "detail"),
    [
        ("tcp", 4, INTERNET_V4[0], 443, f"443 {INTERNET_V4[0]}:443\n"),
        ("udp", 4, PEER_LAN_V4, 5000, "5000\n"),
        ("icmp", 4, INTERNET_V4[1], None, f"echo reply from {INTERNET_V4[1]}"),
        ("tcp", 6, INTERNET_V6[0], 80, f"80 [{INTERNET_V6[0]}]:80\n"),
        ("udp", 6, INTERNET_V6[0], 53, "53\n"),
        ("icmp", 6, INTERNET_V6[0], None, f"echo reply from {INTERNET_V6[0]}"),
    ],
)
def test_unfiltered_host_reaches_the_peer(
    lab: Lab, proto: str, family: int, dst: str, port: int | None, detail: str
) -> None:
    probe = lab.probe("amnesia", proto, family, dst, port)
    assert (probe.result, probe.detail) == ("open", detail)
    assert probe.arrived >= 1


@pytest.mark.parametrize("family", [4, 6])
def test_raw_packets_are_sent_and_counted(lab: Lab, family: int) -> None:
    dst = INTERNET_V4[0] if family == 4 else INTERNET_V6[0]
    probe = lab.probe("amnesia", "raw", family, dst)
    assert probe.result == "sent", probe.detail
    assert probe.arrived == 1


@pytest.mark.parametrize("proto", ["udplite", "sctp", "dccp"])
def test_raw_packets_with_ports_are_sent_and_counted(lab: Lab, proto: str) -> None:
    probe = lab.probe("amnesia", proto, 4, PEER_LAN_V4, 53)
    assert probe.result == "sent", probe.detail
    assert probe.arrived == 1


@pytest.mark.parametrize(
    ("proto", "family", "detail"),
    [
        ("tcp", 4, f"{HOST_INBOUND_PORT} {HOST_V4}:{HOST_INBOUND_PORT}\n"),
        ("udp", 4, f"{HOST_INBOUND_PORT}\n"),
        ("icmp", 4, f"echo reply from {HOST_V4}"),
        ("tcp", 6, f"{HOST_INBOUND_PORT} [{HOST_V6}]:{HOST_INBOUND_PORT}\n"),
        ("udp", 6, f"{HOST_INBOUND_PORT}\n"),
        ("icmp", 6, f"echo reply from {HOST_V6}"),
    ],
)
def test_the_peer_reaches_the_unfiltered_hosts_listeners(
    lab: Lab, proto: str, family: int, detail: str
) -> None:
    """What the input chain tests rely on: without a ruleset, new inbound
    traffic is answered (and the answer counted)."""
    dst = HOST_V4 if family == 4 else HOST_V6
    probe = lab.probe_from_peer(proto, family, dst, HOST_INBOUND_PORT)
    assert (probe.result, probe.detail) == ("open", detail)
    assert probe.arrived >= 1


def test_an_unfiltered_host_answers_a_late_answer_with_icmp(lab: Lab) -> None:
    """What the RELATED test relies on: the late answer makes the host send
    an ICMP error, which the peer counts."""
    assert late_answer(lab, "amnesia", PEER_LAN_V4, 5999, HOST_V4, 40123) == 1


def test_tcp_probe_counts_exactly_its_own_packets(lab: Lab) -> None:
    # SYN, ACK (+ ACK of the greeting and FIN, possibly merged) and the RST:
    # always the same small number, never anything from an earlier probe.
    counts = {lab.probe("amnesia", "tcp", 4, INTERNET_V4[1], 80).arrived for _ in range(3)}
    assert len(counts) == 1
    assert 3 <= counts.pop() <= 5


def test_udp_to_a_closed_peer_port_is_refused(lab: Lab) -> None:
    probe = lab.probe("amnesia", "udp", 4, INTERNET_V4[0], 9)
    assert probe.result == "refused", probe.detail
    assert probe.arrived == 1


@pytest.mark.parametrize("port", HOST_TCP_PORTS)
def test_local_listeners_answer_without_a_packet_to_the_peer(lab: Lab, port: int) -> None:
    probe = lab.probe("amnesia", "tcp", 4, "127.0.0.1", port)
    assert probe.result == "open", probe.detail
    assert probe.detail.startswith(f"{port} 127.0.0.1:{port}")
    assert probe.arrived == 0


def test_local_ipv6_and_udp_listeners(lab: Lab) -> None:
    tcp6 = lab.probe("amnesia", "tcp", 6, "::1", 4101)
    udp = lab.probe("amnesia", "udp", 4, "127.0.0.1", 5353)
    assert (tcp6.result, tcp6.detail) == ("open", "4101 [::1]:4101\n")
    assert (udp.result, udp.detail) == ("open", "5353\n")


def test_nothing_listening_locally_is_refused_at_once(lab: Lab) -> None:
    probe = lab.probe("amnesia", "tcp", 4, "127.0.0.1", 12345)
    assert probe.result == "refused", probe.detail
    assert probe.arrived == 0
    udp53 = lab.probe("amnesia", "udp", 4, "127.0.0.1", 53)  # only nat reaches 5353
    assert udp53.result == "refused", udp53.detail


def test_counter_counts_what_the_host_sends(lab: Lab) -> None:
    # Independent of probe.py: three raw packets sent by root in the host.
    send = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 253)\n"
        f"for _ in range(3): s.sendto(b'x', ({PEER_LAN_V4!r}, 0))"
    )
    before = lab.peer_packets()
    lab.host([PYTHON, "-c", send])
    assert lab.peer_packets() - before == 3


@pytest.mark.parametrize("role", ["amnesia", "debian-tor", "_apt", "Debian-gdm", "other"])
def test_run_as_switches_user(lab: Lab, role: str) -> None:
    account = lab.accounts[role]
    done = lab.run_as(role, ["id", "-u", "-n"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == account.name
    assert lab.run_as(role, ["id", "-u"]).stdout.strip() == str(account.uid)
    assert lab.run_as(role, ["id", "-G"]).stdout.split() == [str(account.gid)]


def test_accounts_are_named_after_roles(lab: Lab) -> None:
    assert lab.accounts["root"].uid == 0
    assert lab.accounts["Debian-gdm"].name == "tfwt-debian-gdm"
    assert lab.accounts["_apt"].name == "tfwt--apt"
    assert lab.accounts["other"].name == "tfwt-other"
    uids = [account.uid for account in lab.accounts.values()]
    assert len(set(uids)) == len(uids)


def test_run_as_root_is_root(lab: Lab) -> None:
    assert lab.run_as("root", ["id", "-u"]).stdout.strip() == "0"


def test_users_get_net_raw_as_ambient_capability(lab: Lab) -> None:
    status = lab.run_as("amnesia", ["cat", "/proc/self/status"]).stdout
    caps = dict(line.split(":\t") for line in status.splitlines() if line.startswith("Cap"))
    net_raw = 1 << 13
    assert int(caps["CapAmb"], 16) == net_raw
    assert int(caps["CapEff"], 16) == net_raw


def test_probe_rejects_unknown_protocols(lab: Lab) -> None:
    with pytest.raises(ValueError, match="ipx"):
        lab.probe("amnesia", "ipx", 4, PEER_LAN_V4, 80)
