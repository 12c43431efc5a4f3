"""The namespaces' rules: the host's side in the compiled ruleset, each
guest's ruleset, and the kernel settings, rule by rule."""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

import pytest

from tailsfw import nsrules, policy
from tailsfw.nftjson import Ruleset
from tailsfw.nspolicy import Namespace, Transparent

from .test_compiler import DEFAULT, UIDS, build, named, objects, rules

ACCEPT = {"accept": None}
REJECT = {"reject": None}
COUNTER = {"counter": None}


def m(key: Any, right: Any, op: str = "==") -> dict[str, Any]:
    if key in ("iifname", "oifname", "skuid", "l4proto"):
        key = {"meta": {"key": key}}
    elif isinstance(key, tuple):
        key = {"payload": {"protocol": key[0], "field": key[1]}}
    return {"match": {"op": op, "left": key, "right": right}}


VETHS = {"set": sorted(["veth-tbb", "veth-onioncircs", "veth-tca", "veth-onionshare",
                        "veth-clearnet"])}  # fmt: skip


@pytest.fixture(scope="module")
def pol() -> policy.Policy:
    return policy.load(DEFAULT)


def namespace(pol: policy.Policy, name: str) -> Namespace:
    (ns,) = [ns for ns in pol.namespaces if ns.name == name]
    return ns


def test_input_from_each_veth_is_exactly_its_guest_to_its_host_and_ports(
    pol: policy.Policy,
) -> None:
    got = rules(build(pol), "ip", "input")
    assert got[2:] == [
        [m("iifname", "veth-tbb"), m(("ip", "saddr"), "10.200.1.2"),
         m(("ip", "daddr"), "10.200.1.1"), m(("tcp", "dport"), {"set": [951, 9050]}), ACCEPT],
        [m("iifname", "veth-onioncircs"), m(("ip", "saddr"), "10.200.1.6"),
         m(("ip", "daddr"), "10.200.1.5"), m(("tcp", "dport"), 951), ACCEPT],
        [m("iifname", "veth-tca"), m(("ip", "saddr"), "10.200.1.10"),
         m(("ip", "daddr"), "10.200.1.9"), m(("tcp", "dport"), 951), ACCEPT],
        [m("iifname", "veth-onionshare"), m(("ip", "saddr"), "10.200.1.14"),
         m(("ip", "daddr"), "10.200.1.13"), m(("tcp", "dport"), {"set": [951, 9050]}), ACCEPT],
        # clearnet has no accept: everything from it, and the rest, refused.
        [m("iifname", VETHS), COUNTER, REJECT],
        [COUNTER, {"drop": None}],
    ]  # fmt: skip


def test_forward_is_clearnet_out_with_ttl_64_and_its_replies_only(pol: policy.Policy) -> None:
    iif = m("iifname", "veth-clearnet")
    got = rules(build(pol), "ip", "forward")
    # Tails' 10.200.1.0/24 whole (the five /30s are in it), as nft lists it
    # back (verify compares the listing): 10.200.1.20 is never reached either.
    namespaces = {"prefix": {"addr": "10.200.1.0", "len": 24}}
    assert got == [
        [iif, m(("ip", "daddr"), namespaces), COUNTER, REJECT],
        [iif, m("oifname", VETHS), COUNTER, REJECT],
        [iif, {"mangle": {"key": {"payload": {"protocol": "ip", "field": "ttl"}}, "value": 64}},
         ACCEPT],
        [m("oifname", "veth-clearnet"),
         m({"ct": {"key": "state"}}, ["established", "related"], "in"), ACCEPT],
        [COUNTER, {"drop": None}],
    ]  # fmt: skip
    # Nothing is ever forwarded over IPv6.
    assert rules(build(pol), "ip6", "forward") == [[COUNTER, {"drop": None}]]


def test_the_clearnet_namespace_is_masqueraded(pol: policy.Policy) -> None:
    rs = build(pol)
    chain = named(rs, "chain", "ip", "nat_postrouting")
    assert (chain["type"], chain["hook"], chain["prio"]) == ("nat", "postrouting", 100)
    assert rules(rs, "ip", "nat_postrouting") == [
        [m(("ip", "saddr"), {"prefix": {"addr": "10.200.1.16", "len": 30}}),
         m("oifname", "veth-clearnet", "!="), {"masquerade": None}],
    ]  # fmt: skip


def test_our_rejects_icmp_errors_go_out_to_the_veths_only(pol: policy.Policy) -> None:
    out_related = rules(build(pol), "ip", "out_related")
    assert out_related[1] == [m("oifname", VETHS), m("l4proto", 1), ACCEPT]


def test_no_namespace_no_rule(pol: policy.Policy) -> None:
    rs = build(dataclasses.replace(pol, namespaces=()))
    text = str(rs.objects)
    assert "veth" not in text and "masquerade" not in text and "ttl" not in text


def test_forward_rejects_cover_tails_network_and_every_namespace(pol: policy.Policy) -> None:
    """10.200.1.0/24 whole, and a namespace a policy puts elsewhere."""
    tbb = dataclasses.replace(namespace(pol, "tbb"), host=ipaddress.IPv4Address("10.201.0.1"),
                              guest=ipaddress.IPv4Address("10.201.0.2"))  # fmt: skip
    two = (tbb, namespace(pol, "clearnet"))
    got = rules(build(dataclasses.replace(pol, namespaces=two)), "ip", "forward")
    assert [r[1] for r in got[:2]] == [
        m(("ip", "daddr"), {"prefix": {"addr": "10.200.1.0", "len": 24}}),
        m(("ip", "daddr"), {"prefix": {"addr": "10.201.0.0", "len": 30}}),
    ]


def test_without_clearnet_nothing_is_forwarded_or_masqueraded(pol: policy.Policy) -> None:
    services = tuple(ns for ns in pol.namespaces if not ns.clearnet)
    rs = build(dataclasses.replace(pol, namespaces=services))
    assert rules(rs, "ip", "forward") == [[COUNTER, {"drop": None}]]
    assert not [c for c in objects(rs, "chain", "ip") if c["name"] == "nat_postrouting"]


def guest(rs: Ruleset, chain: str) -> list[list[dict[str, Any]]]:
    return [o["rule"]["expr"] for o in rs.objects if "rule" in o and o["rule"]["chain"] == chain]


def test_the_tbb_guest_dnats_its_exposed_ports_masquerades_and_forbids_spoofing(
    pol: policy.Policy,
) -> None:
    rs = nsrules.guest_ruleset(namespace(pol, "tbb"))
    lo = m("oifname", "lo")
    local = m(("ip", "daddr"), "127.0.0.1")
    assert guest(rs, "nat_output") == [
        [lo, local, m(("tcp", "dport"), 951), {"dnat": {"addr": "10.200.1.1", "port": 951}}],
        [lo, local, m(("tcp", "dport"), 9050), {"dnat": {"addr": "10.200.1.1", "port": 9050}}],
    ]
    assert guest(rs, "nat_postrouting") == [[m("oifname", "veth0"), {"masquerade": None}]]
    assert guest(rs, "postrouting") == [
        [m("oifname", "veth0"), m(("ip", "saddr"), "10.200.1.2", "!="), COUNTER, {"drop": None}]
    ]
    chains = {o["chain"]["name"]: o["chain"] for o in rs.objects if "chain" in o}
    # The anti-spoofing check comes after the masquerade (srcnat, 100).
    assert chains["postrouting"]["prio"] > chains["nat_postrouting"]["prio"] == 100
    assert "input" not in chains  # a services guest: Tails filters nothing in


def test_the_clearnet_guest_lets_nothing_connect_in(pol: policy.Policy) -> None:
    rs = nsrules.guest_ruleset(namespace(pol, "clearnet"))
    assert guest(rs, "nat_output") == []
    chain = next(o["chain"] for o in rs.objects if o.get("chain", {}).get("name") == "input")
    assert (chain["hook"], chain["policy"]) == ("input", "drop")
    assert guest(rs, "input") == [
        [m({"ct": {"key": "state"}}, ["established", "related"], "in"), ACCEPT],
        [m("iifname", "lo"), ACCEPT],
        [COUNTER, {"drop": None}],
    ]


def test_ip_forward_is_on_only_while_a_clearnet_veth_exists(pol: policy.Policy) -> None:
    ns = pol.namespaces
    assert nsrules.host_sysctls(ns, set()) == ((("net", "ipv4", "ip_forward"), "0"),)
    assert nsrules.host_sysctls(ns, {"veth-tbb", "eth0"}) == (
        (("net", "ipv4", "ip_forward"), "0"),
        (("net", "ipv4", "conf", "veth-tbb", "forwarding"), "0"),
    )
    assert nsrules.host_sysctls(ns, {"veth-tbb", "veth-clearnet"}) == (
        (("net", "ipv4", "ip_forward"), "1"),  # first: it resets every interface
        (("net", "ipv4", "conf", "veth-clearnet", "forwarding"), "1"),
        (("net", "ipv4", "conf", "veth-tbb", "forwarding"), "0"),
    )


def test_guests_forward_nothing_and_route_their_loopback_out() -> None:
    assert dict(nsrules.GUEST_SETTINGS) == {
        ("net", "ipv4", "ip_forward"): "0",
        ("net", "ipv4", "conf", "all", "forwarding"): "0",
        ("net", "ipv4", "conf", "lo", "forwarding"): "0",
        ("net", "ipv4", "conf", "all", "route_localnet"): "1",
    }


def test_transparent_proxying_redirects_the_users_tcp_and_accepts_it(pol: policy.Policy) -> None:
    assert "transparent" not in str(build(pol).objects)  # off as shipped
    on = dataclasses.replace(pol, transparent=Transparent(users=("amnesia",)))
    rs = build(on)
    private = {"set": [{"prefix": {"addr": a, "len": n}} for a, n in
                       (("10.0.0.0", 8), ("172.16.0.0", 12), ("192.168.0.0", 16),
                        ("127.0.0.0", 8))]}  # fmt: skip
    assert rules(rs, "ip", "nat_output")[-1] == [
        m("skuid", UIDS["amnesia"]), m("l4proto", 6), m(("ip", "daddr"), private, "!="),
        {"redirect": {"port": 9040}},
    ]  # fmt: skip
    ports = named(rs, "map", "ip", "local_ports")["elem"]
    assert [{"concat": [6, 9040, 1000]}, ACCEPT] in ports
