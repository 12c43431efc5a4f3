"""flowcut: the established flows a commit forbids, and the ctnetlink
entries they match (decoded from the kernel's own message layout)."""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import struct
from types import MappingProxyType

import pytest

from tailsfw import conntrack, policy
from tailsfw.desired import Desired
from tailsfw.enforce import RulesetEffect
from tailsfw.facts import Facts
from tailsfw.flowcut import TCP, UDP, Cut, cuts
from tailsfw.nft import NftError

from .fakekernel import FakeKernel
from .test_compiler import DEFAULT, UIDS

SHIPPED = policy.load(DEFAULT)
FACTS = Facts(uids=MappingProxyType(UIDS))
CLEARNET, TOR = UIDS["clearnet"], UIDS["debian-tor"]
net = ipaddress.IPv4Network


def without_direct(pol: policy.Policy, user: str) -> policy.Policy:
    return dataclasses.replace(pol, direct=tuple(r for r in pol.direct if r.user != user))


def with_udp_ports(pol: policy.Policy, user: str, ports: tuple[int, ...]) -> policy.Policy:
    direct = tuple(dataclasses.replace(r, udp_ports=ports) if r.user == user else r
                   for r in pol.direct)  # fmt: skip
    return dataclasses.replace(pol, direct=direct)


def connected(pol: policy.Policy) -> policy.Policy:
    return dataclasses.replace(pol, lan=dataclasses.replace(pol.lan, mode="connected"))


def test_nothing_known_before_nothing_cut() -> None:
    assert cuts(None, Desired(SHIPPED, FACTS)) == []


def test_the_same_policy_cuts_nothing() -> None:
    assert cuts(Desired(SHIPPED, FACTS), Desired(SHIPPED, FACTS)) == []


def with_tcp(pol: policy.Policy, user: str, tcp: policy.TcpMode) -> policy.Policy:
    direct = tuple(dataclasses.replace(r, tcp=tcp) if r.user == user else r for r in pol.direct)
    return dataclasses.replace(pol, direct=direct)


def test_a_direct_user_removed_loses_its_marked_flows() -> None:
    """TCP and UDP alike: every flow marked with its uid."""
    found = cuts(Desired(SHIPPED, FACTS), Desired(without_direct(SHIPPED, "clearnet"), FACTS))
    assert found == [Cut(f"uid {CLEARNET} is no longer a direct user", mark=CLEARNET)]


def with_loopback(pol: policy.Policy, user: str, loopback: bool) -> policy.Policy:
    direct = tuple(dataclasses.replace(r, loopback=loopback) if r.user == user else r
                   for r in pol.direct)  # fmt: skip
    return dataclasses.replace(pol, direct=direct)


def test_loopback_taken_away_cuts_the_owners_flows_to_127() -> None:
    """debian-tor's `loopback` is true in the shipped policy."""
    closed = Desired(with_loopback(SHIPPED, "debian-tor", False), FACTS)
    assert cuts(Desired(SHIPPED, FACTS), closed) == [
        Cut(f"uid {TOR} lost loopback", mark=TOR, network=net("127.0.0.0/8"))
    ]
    assert cuts(closed, Desired(SHIPPED, FACTS)) == []


def test_tcp_taken_away_cuts_only_its_tcp_flows() -> None:
    found = cuts(Desired(SHIPPED, FACTS), Desired(with_tcp(SHIPPED, "clearnet", "none"), FACTS))
    assert found == [Cut(f"uid {CLEARNET} lost direct TCP", mark=CLEARNET, proto=TCP)]


def test_udp_taken_away_cuts_only_its_udp_flows() -> None:
    found = cuts(Desired(SHIPPED, FACTS), Desired(with_udp_ports(SHIPPED, "debian-tor", ()), FACTS))
    assert found == [Cut(f"uid {TOR} lost direct UDP", mark=TOR, proto=UDP)]


def test_tcp_and_udp_taken_away_leave_no_direct_user() -> None:
    after = with_udp_ports(with_tcp(SHIPPED, "clearnet", "none"), "clearnet", ())
    found = cuts(Desired(SHIPPED, FACTS), Desired(after, FACTS))
    assert found == [Cut(f"uid {CLEARNET} is no longer a direct user", mark=CLEARNET)]


@pytest.mark.parametrize(("before", "after"), [("any", "new"), ("new", "any"), ("none", "new")])
def test_tcp_any_and_new_cut_nothing_from_each_other(
    before: policy.TcpMode, after: policy.TcpMode
) -> None:
    """A connection opened by a SYN is what both allow; nothing granted, nothing cut."""
    old = Desired(with_tcp(SHIPPED, "clearnet", before), FACTS)
    assert cuts(old, Desired(with_tcp(SHIPPED, "clearnet", after), FACTS)) == []


def test_an_account_whose_uid_changed_loses_the_old_uids_flows() -> None:
    moved = Facts(uids=MappingProxyType({**UIDS, "clearnet": 4242}))
    found = cuts(Desired(SHIPPED, FACTS), Desired(SHIPPED, moved))
    assert found == [Cut(f"uid {CLEARNET} is no longer a direct user", mark=CLEARNET)]


def test_a_port_removed_cuts_only_that_port() -> None:
    before = Desired(with_udp_ports(SHIPPED, "debian-tor", (53, 123)), FACTS)
    found = cuts(before, Desired(SHIPPED, FACTS))
    assert found == [
        Cut(f"uid {TOR} lost direct UDP ports [123]", mark=TOR, proto=UDP, dports=frozenset({123}))
    ]


def test_a_port_added_cuts_nothing() -> None:
    after = Desired(with_udp_ports(SHIPPED, "debian-tor", (53, 123)), FACTS)
    assert cuts(Desired(SHIPPED, FACTS), after) == []


def test_an_account_gone_loses_its_flows() -> None:
    """The uid no longer names the user: its flows' mark grants nothing."""
    gone = {k: v for k, v in UIDS.items() if k != "clearnet"}
    found = cuts(Desired(SHIPPED, FACTS), Desired(SHIPPED, Facts(uids=MappingProxyType(gone))))
    assert [c.mark for c in found] == [CLEARNET]


def test_an_on_link_lan_gone_is_cut_in_connected_mode() -> None:
    pol = connected(SHIPPED)
    two = dataclasses.replace(FACTS, connected=frozenset({net("192.168.1.0/24"),
                                                          net("10.5.0.0/16")}))  # fmt: skip
    one = dataclasses.replace(FACTS, connected=frozenset({net("10.5.0.0/16")}))
    found = cuts(Desired(pol, two), Desired(pol, one))
    assert found == [Cut("LAN network 192.168.1.0/24 gone", network=net("192.168.1.0/24"))]
    assert cuts(Desired(pol, one), Desired(pol, two)) == []
    # rfc1918 mode: the LAN is the policy's, on-link or not.
    assert cuts(Desired(SHIPPED, two), Desired(SHIPPED, one)) == []


def test_a_lan_inside_a_wider_one_still_on_link_is_kept() -> None:
    pol = connected(SHIPPED)
    narrow = dataclasses.replace(FACTS, connected=frozenset({net("10.5.1.0/24")}))
    wide = dataclasses.replace(FACTS, connected=frozenset({net("10.5.0.0/16")}))
    assert cuts(Desired(pol, narrow), Desired(pol, wide)) == []


def nm_dns(pol: policy.Policy) -> policy.Policy:
    return dataclasses.replace(pol, dns=dataclasses.replace(pol.dns, clearnet="nm"))


def servers(*addresses: str) -> Facts:
    return dataclasses.replace(FACTS, dns=tuple(ipaddress.IPv4Address(a) for a in addresses),
                               dns_known=True)  # fmt: skip


def test_a_dns_server_networkmanager_dropped_is_cut_for_each_direct_user() -> None:
    """Both direct users have DNS (clearnet by UDP 53, Tor by TCP): the
    flows marked with each, to port 53 of the server gone, and no other."""
    pol = nm_dns(SHIPPED)
    found = cuts(Desired(pol, servers("192.0.2.53", "198.51.100.53")),
                 Desired(pol, servers("198.51.100.53")))  # fmt: skip
    why = "DNS server 192.0.2.53 no longer NetworkManager's"
    assert found == [
        Cut(f"{why}: uid {uid}", mark=uid, dports=frozenset({53}), network=net("192.0.2.53/32"))
        for uid in sorted((CLEARNET, TOR))
    ]
    assert cuts(Desired(pol, servers("198.51.100.53")),
                Desired(pol, servers("192.0.2.53", "198.51.100.53"))) == []  # fmt: skip
    # "any": NetworkManager's servers are not read, nothing to cut.
    assert cuts(Desired(SHIPPED, servers("192.0.2.53")), Desired(SHIPPED, servers())) == []


def test_dns_narrowed_to_networkmanagers_servers_cuts_every_dns_flow() -> None:
    found = cuts(Desired(SHIPPED, servers("192.0.2.53")), Desired(nm_dns(SHIPPED), servers()))
    assert [(c.mark, c.dports, c.network) for c in found] == [
        (uid, frozenset({53}), None) for uid in sorted((CLEARNET, TOR))
    ]


def test_a_dns_server_gone_with_its_user_is_cut_once() -> None:
    """The user's whole marked traffic goes: one cut, not one per server."""
    pol = nm_dns(SHIPPED)
    found = cuts(Desired(pol, servers("192.0.2.53")),
                 Desired(without_direct(pol, "clearnet"), servers()))  # fmt: skip
    assert [c.mark for c in found] == [CLEARNET, TOR]
    assert found[0] == Cut(f"uid {CLEARNET} is no longer a direct user", mark=CLEARNET)


def test_a_namespace_removed_cuts_its_slash_30() -> None:
    kept = tuple(ns for ns in SHIPPED.namespaces if ns.name != "tbb")
    (tbb,) = [ns for ns in SHIPPED.namespaces if ns.name == "tbb"]
    found = cuts(Desired(SHIPPED, FACTS),
                 Desired(dataclasses.replace(SHIPPED, namespaces=kept), FACTS))  # fmt: skip
    assert found == [Cut("namespace tbb gone", network=net(f"{tbb.host}/30", strict=False))]


def entry_message(src: str, dst: str, proto: int, dport: int, mark: int | None) -> bytes:
    """A dumped entry as the kernel lays it out (nfgenmsg, then attributes)."""
    a = conntrack.attr

    def direction(s: str, d: str, sport: int, dp: int) -> bytes:
        ip = a(1, socket.inet_aton(s)) + a(2, socket.inet_aton(d))
        l4 = a(1, bytes([proto])) + a(2, struct.pack("!H", sport)) + a(3, struct.pack("!H", dp))
        return a(1 | conntrack.NESTED, ip) + a(2 | conntrack.NESTED, l4)

    body = conntrack.NFGEN + a(1 | conntrack.NESTED, direction(src, dst, 40000, dport))
    body += a(2 | conntrack.NESTED, direction(dst, "100.64.0.2", dport, 40000))  # masqueraded
    if mark is not None:
        body += a(conntrack.CTA_MARK, struct.pack("!I", mark))
    return body


def test_an_entry_is_decoded_and_matched() -> None:
    entry = conntrack.decode(entry_message("10.200.1.18", "192.0.2.7", UDP, 123, 110))
    assert entry is not None
    assert (entry.proto, entry.dport, entry.mark) == (UDP, 123, 110)
    assert entry.matches(Cut("", mark=110))
    assert not entry.matches(Cut("", mark=107))
    assert entry.matches(Cut("", mark=110, proto=UDP, dports=frozenset({123})))
    assert not entry.matches(Cut("", mark=110, proto=UDP, dports=frozenset({53})))
    assert not entry.matches(Cut("", proto=6))
    assert entry.matches(Cut("", network=net("10.200.1.16/30")))  # the original source
    assert entry.matches(Cut("", network=net("100.64.0.0/24")))  # the reply's destination
    assert not entry.matches(Cut("", network=net("10.200.1.0/30")))


def test_a_tcp_cut_takes_the_owners_tcp_flows_and_leaves_its_udp() -> None:
    cut = Cut("", mark=110, proto=TCP)
    tcp = conntrack.decode(entry_message("10.0.0.2", "192.0.2.7", TCP, 443, 110))
    udp = conntrack.decode(entry_message("10.0.0.2", "192.0.2.7", UDP, 53, 110))
    others = conntrack.decode(entry_message("10.0.0.2", "192.0.2.7", TCP, 443, 107))
    assert tcp is not None and udp is not None and others is not None
    assert tcp.matches(cut) and not udp.matches(cut) and not others.matches(cut)


def test_an_unmarked_entry_has_mark_0_and_a_truncated_one_is_none() -> None:
    message = entry_message("10.0.0.1", "10.0.0.2", 6, 80, None)
    entry = conntrack.decode(message)
    assert entry is not None and entry.mark == 0
    assert not entry.matches(Cut("", mark=110))
    assert conntrack.decode(conntrack.NFGEN) is None


@pytest.mark.parametrize("cut_at", [5, 9, 30])
def test_a_truncated_entry_never_raises(cut_at: int) -> None:
    conntrack.decode(entry_message("10.0.0.1", "10.0.0.2", 6, 80, 3)[:cut_at])


def test_the_ruleset_effect_cuts_after_a_commit_never_after_a_refusal() -> None:
    async def listing() -> list[dict[str, object]]:
        return []

    kernel = FakeKernel()
    handed: list[list[Cut]] = []
    effect = RulesetEffect(kernel, listing, lambda c: handed.append(list(c)))
    effect.converge(Desired(SHIPPED, FACTS))
    assert handed == []
    kernel.refuse = lambda doc: "no"
    with pytest.raises(NftError):
        effect.converge(Desired(without_direct(SHIPPED, "clearnet"), FACTS))
    assert handed == []  # the old ruleset is in force: its flows stay allowed
    kernel.refuse = lambda doc: None
    effect.converge(Desired(without_direct(SHIPPED, "clearnet"), FACTS))
    assert handed == [[Cut(f"uid {CLEARNET} is no longer a direct user", mark=CLEARNET)]]
    assert kernel.documents  # committed before they were handed over
