"""The pure parts of `prove`/`explain`: the oracle, the classes, the trace decoder."""

from __future__ import annotations

import functools
import struct

import pytest

from tailsfw import nftrace, oracle, policy, prove, scratch
from tailsfw.classes import TCP, UDP, Packet, derive
from tests import prove_world
from tests.prove_world import ACCOUNTS, SHIPPED


@pytest.fixture(scope="module")
def world() -> oracle.World:
    return prove_world.shipped()[1]


@functools.cache
def shipped_classes() -> tuple[Packet, ...]:
    document, world = prove_world.shipped()
    return tuple(derive(prove.objects(document), prove.links_of(world.policy)))


def v4(
    uid: int, daddr: str, proto: int, port: int | None, syn: bool = True, oif: str = "eth0"
) -> Packet:
    return Packet("ipv4", uid, daddr, proto, port, syn, oif)


@pytest.mark.parametrize(
    ("packet", "verdict", "rule"),
    [
        (v4(1000, "127.0.0.1", TCP, 9050, oif="lo"), "accepted", "Tails rule 2"),
        (v4(1000, "127.0.0.1", TCP, 9063, oif="lo"), "refused", "Tails rule 2"),
        (v4(1000, "127.0.0.1", TCP, 9052, oif="lo"), "refused", "Tails rule 2"),
        (v4(0, "127.0.0.1", TCP, 9052, oif="lo"), "accepted", "Tails rule 2"),
        (v4(42, "127.0.0.1", UDP, 53, oif="lo"), "refused", "Tails rule 2"),
        (v4(1000, "127.0.0.1", TCP, 9050, syn=False, oif="lo"), "refused", "Tails rule 6"),
        (v4(120, "1.2.3.4", TCP, 443, syn=False), "accepted", "Tails rules 3, 4"),
        (v4(120, "127.0.0.2", TCP, 443, oif="lo"), "refused", "Tails rule 6"),  # never loopback
        (v4(121, "127.0.0.2", TCP, 443, oif="lo"), "accepted", "Tails rules 3, 4"),
        (v4(121, "1.2.3.4", TCP, 443, syn=False), "refused", "Tails rule 6"),
        (v4(121, "192.168.1.1", UDP, 53), "accepted", "Tails rules 3, 4"),  # Tor: LAN resolver
        (v4(1000, "192.168.1.1", UDP, 53), "refused", "Tails rule 5"),
        (v4(1000, "10.0.0.1", UDP, 137), "refused", "Tails rule 5"),
        (v4(1000, "10.0.0.1", TCP, 137), "accepted", "Tails rule 5"),
        (v4(1000, "172.16.0.1", 136, 53), "refused", "Tails rule 5"),  # UDP-Lite
        (v4(1000, "172.32.0.1", TCP, 80), "refused", "Tails rule 6"),
        (v4(1000, "1.2.3.4", 1, 0), "refused", "Tails rule 6"),
        (v4(1001, "127.0.0.1", TCP, 631, oif="lo"), "refused", "Tails rule 6"),
    ],
)
def test_the_oracle_follows_the_specification(
    world: oracle.World, packet: Packet, verdict: str, rule: str
) -> None:
    decision = oracle.decide(world, packet)
    assert (decision.verdict, decision.rule.split(" ([")[0].split(",")[0]) == (
        verdict,
        rule.split(",")[0],
    )
    assert decision.sentence


def test_redirects_come_before_filtering(world: oracle.World) -> None:
    onion = oracle.decide(world, v4(1000, "127.192.0.7", TCP, 80, oif="lo"))
    assert (onion.redirect, onion.verdict) == (9040, "accepted")
    assert oracle.decide(world, v4(1001, "127.192.0.7", TCP, 80, oif="lo")).verdict == "refused"
    dns = oracle.decide(world, v4(42, "127.0.0.1", UDP, 53, oif="lo"))
    assert (dns.redirect, dns.verdict) == (5353, "refused")


def test_ipv6_only_the_accessibility_daemon(world: oracle.World) -> None:
    ok = oracle.decide(world, Packet("ipv6", 123, "::1", TCP, 4101, True, "lo"))
    assert (ok.verdict, ok.inbound) == ("accepted", "accepted")
    assert (
        oracle.decide(world, Packet("ipv6", 0, "::1", TCP, 4101, True, "lo")).verdict == "refused"
    )
    assert (
        oracle.decide(world, Packet("ipv6", 123, "::1", TCP, 4102, True, "lo")).verdict == "refused"
    )


def test_a_missing_account_costs_only_its_own_rights() -> None:
    pol = policy.load(SHIPPED)
    uids = oracle.user_uids(pol, {"root": 0})
    assert uids == {"root": 0, "amnesia": 1000}
    # A fallback uid an existing account holds is not borrowed.
    assert "amnesia" not in oracle.user_uids(pol, {"root": 0, "htp": 1000})


def test_classes_cover_every_boundary_of_the_shipped_ruleset() -> None:
    packets = derive(prove.objects(prove_world.shipped()[0]))
    ipv4 = [p for p in packets if p.family == "ipv4" and not p.inbound]
    assert {p.uid for p in ipv4} == {*ACCOUNTS.values(), 1001}
    ports = {p.dport for p in ipv4}
    assert {52, 53, 54, 136, 137, 138, 9049, 9050, 9051, 9063, 9064, 0, 65535} <= ports
    addresses = {p.daddr for p in ipv4}
    assert {
        "9.255.255.255",
        "10.0.0.0",
        "10.255.255.255",
        "11.0.0.0",
        "127.0.0.1",
        "127.191.255.255",
        "127.192.0.0",
        "172.15.255.255",
        "172.32.0.0",
    } <= addresses
    assert {p.proto for p in ipv4} >= {1, 6, 17, 33, 132, 136} and len({p.proto for p in ipv4}) > 6
    assert {p.oif for p in ipv4 if p.daddr == "10.0.0.0"} == {"lo", "eth0"}
    assert {p.oif for p in ipv4 if p.daddr == "127.0.0.1"} == {"lo"}
    assert {p.syn for p in ipv4 if p.proto == TCP} == {True, False}
    ipv6 = [p for p in packets if p.family == "ipv6" and not p.inbound]
    assert {p.daddr for p in ipv6} >= {"::1", "::2"}
    assert {p.saddr for p in ipv6} == {"::1", "2001:db8::2"}


def _attr(kind: int, value: bytes) -> bytes:
    data = struct.pack("=HH", 4 + len(value), kind) + value
    return data + b"\0" * (-len(data) % 4)


def test_a_trace_message_decodes() -> None:
    verdict = _attr(1, struct.pack("!i", -3)) + _attr(2, b"refuse\0")
    body = b"\x02\x00\x00\x00" + b"".join(
        [
            _attr(nftrace.TABLE, b"tailsfw\0"),
            _attr(nftrace.CHAIN, b"output\0"),
            _attr(nftrace.ID, struct.pack("!I", 7)),
            _attr(nftrace.TYPE, struct.pack("!I", 3)),
            _attr(nftrace.RULE_HANDLE, struct.pack("!Q", 56)),
            _attr(nftrace.VERDICT | 0x8000, verdict),
            _attr(nftrace.NFPROTO, struct.pack("!I", 2)),
            _attr(nftrace.CT_STATE, struct.pack("!I", 8)),
        ]
    )
    message = struct.pack("=IHHII", 16 + len(body), nftrace.NFT_MSG_TRACE, 0, 0, 0) + body
    (event,) = nftrace.decode(message)
    assert (event.id, event.family, event.table, event.chain, event.kind) == (
        7,
        "ip",
        "tailsfw",
        "output",
        "rule",
    )
    assert (event.verdict, event.target, event.handle, event.ct_state) == (
        "jump",
        "refuse",
        56,
        "new",
    )
    with pytest.raises(nftrace.TraceError):
        overrun = body + struct.pack("=HH", 64, nftrace.CHAIN)  # says 64 bytes, holds none
        nftrace.decode(
            struct.pack("=IHHII", 16 + len(overrun), nftrace.NFT_MSG_TRACE, 0, 0, 0) + overrun
        )


def test_no_ruleset_is_loaded_outside_a_scratch_namespace() -> None:
    """Made anywhere but in run_in_scratch's child, a Scratch refuses before anything."""
    with pytest.raises(scratch.ScratchError, match="only by run_in_scratch"):
        scratch.Scratch({"nftables": []})


def test_established_flows_are_their_owners(world: oracle.World) -> None:
    def flow(uid: int, mark: int, family: str = "ipv4") -> str:
        daddr = "1.2.3.4" if family == "ipv4" else "2001:db8::1"
        packet = Packet(family, uid, daddr, UDP, 53, True, "eth0", None, True, mark)
        return oracle.decide(world, packet).verdict

    assert flow(1000, 0) == "accepted"  # rule 1
    assert flow(121, 121) == "accepted"  # Tor's own DNS flow
    assert flow(1000, 121) == "refused"  # riding Tor's flow
    assert flow(120, 121) == "refused"  # clearnet riding Tor's flow
    assert flow(1000, 1000) == "refused"  # amnesia owns no flows
    assert flow(1000, 121, "ipv6") == "accepted"


def test_an_owned_flow_on_lo_lasts_only_with_loopback(world: oracle.World) -> None:
    """clearnet (120) has `loopback = false`, Tor (121) true: a marked flow
    on lo is one a reload that took `loopback` away left behind."""

    def on_lo(uid: int) -> str:
        packet = Packet("ipv4", uid, "127.0.0.2", TCP, 443, False, "lo", None, True, uid)
        return oracle.decide(world, packet).verdict

    assert (on_lo(121), on_lo(120)) == ("accepted", "refused")


def test_established_classes_cover_every_mark() -> None:
    packets = [p for p in derive(prove.objects(prove_world.shipped()[0])) if p.established]
    assert {p.mark for p in packets if p.family == "ipv4"} == {0, 120, 121, 1001}
    assert {p.uid for p in packets} >= {0, 1000, 120, 121, 1001}


def test_inbound_classes_arrive_from_every_source_cell(world: oracle.World) -> None:
    packets = [p for p in shipped_classes() if p.inbound and p.oif == "eth0"]
    saddrs = {p.saddr for p in packets if p.family == "ipv4"}
    # Only the masquerade's 10.200.1.16/30 cuts the sources a packet from the
    # network can have: the namespaces' input rules never see it.
    assert saddrs == {"1.0.0.0", "10.200.1.15", "10.200.1.16", "10.200.1.19", "10.200.1.20",
                      "223.255.255.255"}  # fmt: skip
    assert {"100.64.0.2", "2001:db8::2", "10.200.1.1", "10.200.1.2"} <= {p.daddr for p in packets}
    new = [p for p in packets if not p.established]
    assert {oracle.decide(world, p).verdict for p in new} == {"dropped"}


def test_an_empty_ruleset_still_has_classes() -> None:
    """Nothing to cut the fields: one cell each, in both families, still sent."""
    packets = derive([])
    assert {p.family for p in packets} == {"ipv4", "ipv6"}
    assert {p.daddr for p in packets if p.family == "ipv4" and not p.inbound} == {
        "1.0.0.0", "223.255.255.255"}  # fmt: skip


def test_explain_reads_its_arguments() -> None:
    import argparse

    from tailsfw import explain

    def packet(destination: str, protocol: str) -> Packet:
        return explain.packet_of(argparse.Namespace(destination=destination, protocol=protocol), 7)

    assert packet("1.2.3.4", "udp/53") == Packet("ipv4", 7, "1.2.3.4", UDP, 53, True, "eth0")
    assert packet("127.0.0.1", "TCP/9050").oif == "lo"
    assert packet("::1", "icmpv6").dport is None
    assert packet("1.2.3.4", "47").proto == 47
    for destination, protocol, error in [
        ("example.org", "tcp/1", "not an IP address"),
        ("1.2.3.4", "tcp", "needs a port"),
        ("1.2.3.4", "tcp/70000", "port '70000'"),
        ("1.2.3.4", "quic/1", "protocol 'quic'"),
        ("1.2.3.4", "256", "protocol '256'"),
    ]:
        with pytest.raises(explain.UsageError, match=error):
            packet(destination, protocol)


def test_rules_are_named_in_nfts_words() -> None:
    from tailsfw import explain

    listing = [{"rule": {"family": "ip", "table": "tailsfw", "chain": "refuse", "handle": 19,
                         "comment": "Tails rule 6",
                         "expr": [{"counter": {}}, {"log": {}}, {"reject": None}]}}]  # fmt: skip
    text = (
        "table ip tailsfw { # handle 3\n\tchain refuse { # handle 3\n"
        '\t\tcounter packets 2 bytes 100 log group 0 reject comment "Tails rule 6" # handle 19\n'
    )
    rule = explain.rules_of(listing, text)[("ip", 19)]
    assert rule.text == 'counter log group 0 reject comment "Tails rule 6"'
    assert (rule.rejects, rule.logs, rule.comment) == (True, True, "Tails rule 6")


def test_a_rule_cuts_only_the_packets_it_can_see() -> None:
    """Each namespace's input rule cuts the packets arriving on its own veth,
    never another veth's, nor what the host sends."""
    packets = shipped_classes()
    out = [p for p in packets if p.family == "ipv4" and not p.inbound]
    assert not any(p.daddr.startswith("10.200.") for p in out)  # only input and forward read them
    assert {p.saddr for p in out if not p.established} == {None}  # no rule tells them apart

    def arriving(veth: str) -> list[Packet]:
        return [p for p in packets if p.inbound and p.oif == veth and p.family == "ipv4"]

    tbb, circuits = arriving("veth-tbb"), arriving("veth-onioncircs")
    assert {950, 951, 952, 9049, 9050, 9051} <= {p.dport for p in tbb}
    assert {p.dport for p in circuits} & {9049, 9050, 9051} == set()  # 951 only
    # Its guest, both sides of it, never a host address (a martian source).
    assert {"10.200.1.0", "10.200.1.2", "10.200.1.3"} <= {p.saddr for p in tbb}
    assert "10.200.1.6" not in {p.saddr for p in tbb}
    assert not {"10.200.1.1", "10.200.1.5", "100.64.0.2"} & {p.saddr for p in packets if p.inbound}
    # Every address the routing tells apart: each host and guest, eth0's own.
    guests_hosts = {f"10.200.1.{n}" for n in (1, 2, 5, 6, 9, 10, 13, 14, 17, 18)}
    assert guests_hosts | {"100.64.0.2", "1.0.0.0"} <= {p.daddr for p in tbb}
    assert {p.proto for p in arriving("veth-clearnet")} >= {1, 6, 17}
    replies = [p for p in packets if p.inbound and p.established]
    assert {(p.oif, p.daddr) for p in replies} == {
        ("eth0", f"10.200.1.{n}") for n in (2, 6, 10, 14, 18)
    }


def arrive(veth: str, saddr: str, daddr: str, proto: int = TCP, port: int | None = 9050,
           established: bool = False) -> Packet:  # fmt: skip
    return Packet("ipv4", 0, daddr, proto, port, True, veth, saddr, established, inbound=True)


TBB, CLEARNET = "veth-tbb", "veth-clearnet"
OUT = "out on eth0 from 100.64.0.2 ttl 64"


@pytest.mark.parametrize(
    ("packet", "verdict", "forwarded"),
    [
        (arrive(TBB, "10.200.1.2", "10.200.1.1"), "accepted", ""),
        (arrive(TBB, "10.200.1.2", "10.200.1.1", port=951), "accepted", ""),
        (arrive(TBB, "10.200.1.2", "10.200.1.1", port=9051), "refused", ""),
        (arrive(TBB, "10.200.1.2", "10.200.1.1", UDP, 9050), "refused", ""),
        (arrive(TBB, "10.200.1.6", "10.200.1.1"), "refused", ""),  # spoofed
        (arrive(TBB, "10.200.1.2", "10.200.1.5", port=951), "refused", ""),  # another host side
        (arrive(TBB, "10.200.1.2", "100.64.0.2"), "refused", ""),
        (arrive("veth-onioncircs", "10.200.1.6", "10.200.1.5"), "refused", ""),  # 951 only
        (arrive(TBB, "10.200.1.2", "1.2.3.4", port=443), "dropped", ""),
        (arrive(TBB, "10.200.1.2", "10.200.1.18", port=443), "dropped", ""),
        (arrive(CLEARNET, "10.200.1.18", "1.2.3.4", port=443), "accepted", OUT),
        (arrive(CLEARNET, "10.200.1.18", "192.168.1.1", UDP, 53), "accepted", OUT),  # the LAN
        (arrive(CLEARNET, "10.200.1.18", "1.2.3.4", 1, None), "accepted", OUT),
        (
            arrive(CLEARNET, "1.2.3.5", "1.2.3.4", port=443),
            "accepted",
            "out on eth0 from 1.2.3.5 ttl 64",
        ),
        (arrive(CLEARNET, "10.200.1.18", "10.200.1.2", port=443), "refused", ""),
        (arrive(CLEARNET, "10.200.1.18", "10.200.1.17"), "refused", ""),
        (arrive(CLEARNET, "10.200.1.18", "10.200.1.1"), "refused", ""),
        (arrive(CLEARNET, "10.200.1.18", "100.64.0.2"), "refused", ""),
        (arrive("eth0", "1.2.3.4", "10.200.1.18", port=443), "dropped", ""),
        (arrive("eth0", "1.2.3.4", "10.200.1.1"), "dropped", ""),
        (
            arrive("eth0", "1.2.3.4", "10.200.1.18", port=443, established=True),
            "accepted",
            "out on veth-clearnet from 1.2.3.4 ttl 63",
        ),
        (arrive("eth0", "1.2.3.4", "10.200.1.2", port=443, established=True), "dropped", ""),
    ],
)
def test_the_oracle_follows_the_namespaces_section(
    world: oracle.World, packet: Packet, verdict: str, forwarded: str
) -> None:
    decision = oracle.decide(world, packet)
    assert (decision.verdict, decision.forwarded) == (verdict, forwarded)
    assert not decision.logged  # counted, not logged: what a namespace sends is not the user's
    if decision.verdict == "refused" and packet.oif == CLEARNET and packet.daddr == "10.200.1.17":
        assert "10.200.1.0/24: reject" in decision.sentence


def test_ipv6_from_a_namespace_is_dropped(world: oracle.World) -> None:
    packet = Packet("ipv6", 0, "2001:db8::2", TCP, 9050, True, TBB, "::2", inbound=True)
    assert oracle.decide(world, packet).verdict == "dropped"
