"""The compiler: the structure of the ruleset, and why each piece is there."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from tailsfw import policy
from tailsfw.compiler import Ruleset, compile_policy, lockdown
from tailsfw.facts import Facts

DEFAULT = Path(__file__).parents[2] / "etc" / "tailsfw" / "policy.toml"
UIDS = {
    "root": 0, "amnesia": 1000, "clearnet": 110, "debian-tor": 107, "_apt": 42, "proxy": 13,
    "nobody": 65534, "tails-upgrade-frontend": 120, "htp": 121,
    "tails-iuk-get-target-file": 122, "Debian-gdm": 123,
}  # fmt: skip
ACCEPT = {"accept": None}
REJECT = {"jump": {"target": "refuse"}}


@pytest.fixture(scope="module")
def pol() -> policy.Policy:
    return policy.load(DEFAULT)


def build(pol: policy.Policy, **uids: int | None) -> Ruleset:
    merged = {k: v for k, v in {**UIDS, **uids}.items() if v is not None}
    return compile_policy(pol, Facts(uids=MappingProxyType(merged)))


def objects(rs: Ruleset, kind: str, family: str) -> list[dict[str, Any]]:
    return [o[kind] for o in rs.objects if kind in o and o[kind]["family"] == family]


def named(rs: Ruleset, kind: str, family: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects(rs, kind, family) if o["name"] == name]
    return found


def elements(rs: Ruleset, family: str, name: str) -> dict[Any, Any]:
    """A map's elements as {key: verdict}, concatenations as tuples."""
    out = {}
    for key, verdict in named(rs, "map", family, name).get("elem", []):
        if isinstance(key, dict) and "concat" in key:
            key = tuple(key["concat"])
        elif isinstance(key, dict):
            key = f"{key['prefix']['addr']}/{key['prefix']['len']}"
        out[key] = verdict
    return out


def rules(rs: Ruleset, family: str, chain: str) -> list[list[dict[str, Any]]]:
    return [r["expr"] for r in objects(rs, "rule", family) if r["chain"] == chain]


def test_only_the_tailsfw_tables_are_touched(pol: policy.Policy) -> None:
    rs = build(pol)
    assert [o["table"] for o in rs.objects if "table" in o] == [
        {"family": "ip", "name": "tailsfw"},
        {"family": "ip6", "name": "tailsfw"},
    ]
    for obj in rs.objects:
        (body,) = obj.values()
        assert body.get("table", body.get("name")) == "tailsfw"
    # The replacement deletes and re-adds exactly these tables, in one batch.
    cmds = rs.commands()
    assert [next(iter(c)) for c in cmds[:4]] == ["add", "delete", "add", "delete"]
    assert all("table" in c[next(iter(c))] for c in cmds[:4])


def test_every_base_filter_chain_drops_by_default(pol: policy.Policy) -> None:
    rs = build(pol)
    for family in ("ip", "ip6"):
        base = {c["name"]: c for c in objects(rs, "chain", family) if "hook" in c}
        for name, chain in base.items():
            expected = "accept" if chain["type"] == "nat" else "drop"
            assert chain["policy"] == expected, (family, name)
        # ... and ends in a counted verdict, so no packet falls off uncounted.
        for name in ("input", "forward"):
            assert rules(rs, family, name)[-1] == [{"counter": None}, {"drop": None}]
        assert rules(rs, family, "output")[-1] == [REJECT]
    assert set(c["name"] for c in objects(rs, "chain", "ip6") if "hook" in c) == {
        "input",
        "forward",
        "output",
    }  # no nat for IPv6


def test_rejects_are_counted_and_logged_with_the_policy_prefix(pol: policy.Policy) -> None:
    rs = build(pol)
    log = {"log": {"prefix": "Dropped outbound packet: ", "group": 0}}
    assert rules(rs, "ip", "refuse") == [[{"counter": None}, log, {"reject": None}]]
    v6 = rules(rs, "ip6", "refuse")
    assert v6[0] == [{"counter": None}, log]
    assert v6[1][-1] == {"reject": {"type": "tcp reset"}}


def match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def jump(chain: str) -> dict[str, Any]:
    return {"jump": {"target": chain}}


STATE = {"ct": {"key": "state"}}
MARK = {"ct": {"key": "mark"}}
SKUID = {"meta": {"key": "skuid"}}
DADDR = {"payload": {"protocol": "ip", "field": "daddr"}}


def owner(uid: int) -> dict[str, Any]:
    """`ct mark set UID`: the flow is the direct user's own."""
    return {"mangle": {"key": MARK, "value": uid}}


def prefix(net: str) -> dict[str, Any]:
    addr, length = net.split("/")
    return {"prefix": {"addr": addr, "len": int(length)}}


def test_output_follows_tails_rule_order(pol: policy.Policy) -> None:
    """Rules 1 to 6, in order; every packet meets plain comparisons only,
    and the uid is read once, only by packets that no earlier rule took."""
    out = rules(build(pol), "ip", "output")
    assert out[0] == [match(STATE, ["established", "related"], "in"), jump("conntracked")]
    assert out[1] == [match(DADDR, "127.0.0.1"), jump("local")]
    outside_refused = match(TH_DPORT, {"range": [53, 137]}, "!=")
    lan = []
    for net in ("192.168.0.0/16", "10.0.0.0/8", "172.16.0.0/12"):  # the policy's order
        lan += [
            [match(DADDR, prefix(net)), outside_refused, ACCEPT],  # most LAN packets
            [match(DADDR, prefix(net)), jump("lan")],
        ]
    assert out[2:8] == lan
    assert out[8] == [DIRECT_DISPATCH]
    assert out[9] == [REJECT]


DIRECT_DISPATCH = {
    "vmap": {
        "key": SKUID,
        "data": {"set": [[107, jump("direct_debian-tor")], [110, jump("direct_clearnet")]]},
    }
}


def test_a_direct_users_flows_are_its_own_while_its_rights_last(pol: policy.Policy) -> None:
    """Conntrack knows flows, not users: clearnet's answered DNS flow must
    not carry another user's datagrams from the same port.  A marked flow is
    accepted only by the protocol its owner still has; TCP asks no uid (an
    orphaned socket's FIN, TIME_WAIT's ACK and a loopback server's replies
    have none of the owner's)."""
    rs = build(pol)
    assert [UDP_DPORT_53, owner(107), ACCEPT] in rules(rs, "ip", "direct_debian-tor")
    assert rules(rs, "ip", "conntracked") == [
        [match(STATE, "established"), match(MARK, 0), ACCEPT],  # nearly all traffic
        [match(STATE, "related"), jump("out_related")],
        [match(MARK, 107), match(L4PROTO, 6), ACCEPT],  # Tor's connections
        [match(MARK, 107), match(L4PROTO, 17), match(SKUID, 107), ACCEPT],
        # clearnet's `loopback` is false: none of its flows on lo.
        [match(MARK, 110), NOT_LO, match(L4PROTO, 6), ACCEPT],
        [match(MARK, 110), NOT_LO, match(L4PROTO, 17), match(SKUID, 110), ACCEPT],
        [REJECT],
    ]


def test_a_user_without_direct_tcp_owns_no_tcp_flow(pol: policy.Policy) -> None:
    """Its marked TCP flows (opened before a reload took TCP away) meet the
    final refuse at the commit itself."""
    direct = tuple(dataclasses.replace(r, tcp="none") if r.user == "clearnet" else r
                   for r in pol.direct)  # fmt: skip
    rs = build(dataclasses.replace(pol, direct=direct))
    conntracked = rules(rs, "ip", "conntracked")
    assert [match(MARK, 110), NOT_LO, match(L4PROTO, 6), ACCEPT] not in conntracked
    assert [match(MARK, 110), NOT_LO, match(L4PROTO, 17), match(SKUID, 110), ACCEPT] in conntracked
    assert rules(rs, "ip", "direct_clearnet") == [
        [OIF_LO, RETURN],
        [UDP_DPORT_53, owner(110), ACCEPT],
    ]


def test_a_lookup_miss_never_leads_to_accept(pol: policy.Policy) -> None:
    """While a transaction commits, packets on the old rules miss in the old
    maps: a chain that ends in accept must decide by plain comparisons."""
    for rs in (build(pol), connected(pol, "192.168.77.0/24")):
        for family in ("ip", "ip6"):
            for chain in {r["chain"] for r in objects(rs, "rule", family)}:
                body = rules(rs, family, chain)
                if body[-1] == [ACCEPT]:
                    text = repr(body)
                    assert "vmap" not in text and "@" not in text and "'set'" not in text, chain


L4PROTO = {"meta": {"key": "l4proto"}}
TH_DPORT = {"payload": {"protocol": "th", "field": "dport"}}
UDP_DPORT_53 = match({"payload": {"protocol": "udp", "field": "dport"}}, 53)
TCP_DPORT_53 = match({"payload": {"protocol": "tcp", "field": "dport"}}, 53)
NOT_LO = match({"meta": {"key": "oif"}}, "lo", "!=")
OIF_LO = match({"meta": {"key": "oif"}}, "lo")
# Tails' "syn": of these four flags only SYN (a new connection), never SYN+ACK.
SYN_ONLY = match({"&": [{"payload": {"protocol": "tcp", "field": "flags"}},
                        ["fin", "syn", "rst", "ack"]]}, "syn")  # fmt: skip


def test_only_clearnet_and_debian_tor_leave_by_themselves(pol: policy.Policy) -> None:
    """Whole chains, operators and masks included: an inverted test must fail here."""
    rs = build(pol)
    # clearnet never on loopback; Tor only new TCP connections and DNS.
    assert rules(rs, "ip", "direct_clearnet") == [
        [OIF_LO, RETURN],
        [UDP_DPORT_53, owner(110), ACCEPT],
        [match(L4PROTO, 6), owner(110), ACCEPT],
    ]
    assert rules(rs, "ip", "direct_debian-tor") == [
        [UDP_DPORT_53, owner(107), ACCEPT],
        [SYN_ONLY, owner(107), ACCEPT],
    ]
    direct = [c["name"] for c in objects(rs, "chain", "ip") if c["name"].startswith("direct")]
    assert sorted(direct) == ["direct_clearnet", "direct_debian-tor"]
    assert "skuid" not in repr(rules(rs, "ip6", "output"))


RETURN = {"return": None}


def test_lan_refuses_dns_and_netbios_on_every_transport_with_ports(pol: policy.Policy) -> None:
    """TCP's and UDP's own ports, and both on UDP-Lite, SCTP and DCCP: a LAN
    resolver is reached by no transport.  Plain comparisons only (the chain
    ends in accept)."""
    rs = build(pol)

    def refusing(pairs: Any) -> list[Any]:
        return [[match(L4PROTO, p), match(TH_DPORT, n), jump("lan_refused")] for p, n in pairs]

    assert rules(rs, "ip", "lan") == [
        *refusing([(6, 53), (17, 53), (17, 137)]),
        # The rarer transports behind one range comparison: off TCP's and UDP's path.
        [match(L4PROTO, {"range": [33, 136]}), jump("lan_other")],
        [ACCEPT],
    ]
    others = [(p, port) for port in (53, 137) for p in (33, 132, 136)]
    assert sorted(rules(rs, "ip", "lan_other"), key=repr) == sorted(refusing(others), key=repr)
    # Tails rules 3 and 4 come before rule 5: a refused LAN port still asks
    # the direct users' chains.
    assert rules(rs, "ip", "lan_refused") == [[DIRECT_DISPATCH], [REJECT]]


def test_ipv6_allows_only_the_accessibility_daemon_on_loopback(pol: policy.Policy) -> None:
    rs = build(pol)
    daddr6 = {"payload": {"protocol": "ip6", "field": "daddr"}}
    assert rules(rs, "ip6", "output")[1:] == [[match(daddr6, "::1"), jump("local")], [REJECT]]
    assert elements(rs, "ip6", "local_ports") == {
        (6, 4101, 1000): ACCEPT,
        (6, 4101, 123): ACCEPT,
    }


def test_nat_has_only_the_two_redirects(pol: policy.Policy) -> None:
    assert rules(build(pol), "ip", "nat_output") == [
        [match(DADDR, prefix("127.192.0.0/10")), match(L4PROTO, 6), {"redirect": {"port": 9040}}],
        [match(DADDR, "127.0.0.1"), match(L4PROTO, 17), match(TH_DPORT, 53),
         {"redirect": {"port": 5353}}],
    ]  # fmt: skip


def test_local_ports_first_match_and_any_port(pol: policy.Policy) -> None:
    rs = build(pol)
    exact = elements(rs, "ip", "local_ports")
    assert exact[(6, 9050, 42)] == ACCEPT  # _apt to Tor's SocksPort
    assert exact[(6, 9063, 1000)] == REJECT  # amnesia rejected before "any port"
    assert exact[(6, 9052, 1000)] == REJECT
    assert exact[(17, 53, 42)] == REJECT  # _apt never resolves on its own
    assert exact[(17, 5353, 121)] == ACCEPT
    assert (6, 9050, 1000) not in exact  # amnesia reaches 9050 by "any port"
    assert elements(rs, "ip", "local_any") == {(6, 1000): ACCEPT}


def test_same_input_same_document(pol: policy.Policy) -> None:
    a = build(pol)
    reordered = dict(reversed(list(UIDS.items())))
    b = compile_policy(pol, Facts(uids=MappingProxyType(reordered)))
    assert a.to_json() == b.to_json()
    assert a.digest() == b.digest()


def test_a_missing_user_costs_only_its_own_exceptions(pol: policy.Policy) -> None:
    full = build(pol)
    rs = build(pol, htp=None)
    assert any("'htp'" in w and "left out" in w for w in rs.warnings)
    exact = elements(rs, "ip", "local_ports")
    assert [k for k in exact if k[2] == 121] == []
    # Everything that does not name htp is unchanged.
    others = {k: v for k, v in elements(full, "ip", "local_ports").items() if k[2] != 121}
    assert exact == others
    assert rules(rs, "ip", "output") == rules(full, "ip", "output")


def test_a_missing_account_with_a_fallback_uid_uses_it(pol: policy.Policy) -> None:
    rs = build(pol, amnesia=None)
    assert elements(rs, "ip", "local_any") == {(6, 1000): ACCEPT}
    assert any("fallback uid 1000" in w for w in rs.warnings)
    taken = build(pol, amnesia=None, htp=1000)
    assert any("belongs to user 'htp'" in w for w in taken.warnings)
    assert "local_any" not in [m["name"] for m in objects(taken, "map", "ip")]


def connected(pol: policy.Policy, *nets: str) -> Ruleset:
    lan = policy.Lan(pol.lan.networks, pol.lan.reject_tcp_ports, pol.lan.reject_udp_ports,
                     mode="connected")  # fmt: skip
    strict = policy.Policy(pol.source, pol.log, pol.users, pol.local, pol.direct, lan,
                           pol.redirects)  # fmt: skip
    facts = Facts(uids=MappingProxyType(UIDS),
                  connected=frozenset(ipaddress.IPv4Network(n) for n in nets))  # fmt: skip
    return compile_policy(strict, facts)


def test_connected_lan_mode_keeps_only_on_link_private_networks(pol: policy.Policy) -> None:
    rs = connected(pol, "192.168.77.0/24", "198.51.100.0/24", "10.1.0.0/16", "10.1.2.0/24")
    assert named(rs, "set", "ip", "lan")["elem"] == [
        prefix("10.1.0.0/16"),
        prefix("192.168.77.0/24"),
    ]
    # The policy's network first: other packets are spared the lookup.
    assert rules(rs, "ip", "output")[3] == [
        match(DADDR, prefix("192.168.0.0/16")), match(DADDR, "@lan"), jump("lan")
    ]  # fmt: skip
    assert "elem" not in named(connected(pol), "set", "ip", "lan")


def test_changes_since_touches_only_what_changed(pol: policy.Policy) -> None:
    a = connected(pol, "192.168.77.0/24")
    assert a.changes_since(a) == []
    b = connected(pol, "192.168.77.0/24", "10.9.0.0/16")
    changes = b.changes_since(a)
    assert changes == [
        {"flush": {"set": {"family": "ip", "table": "tailsfw", "name": "lan"}}},
        {"add": {"element": {"family": "ip", "table": "tailsfw", "name": "lan",
                             "elem": [prefix("10.9.0.0/16"), prefix("192.168.77.0/24")]}}},
    ]  # fmt: skip
    # A user appearing only adds elements; a new chain needs the replacement.
    appeared = build(pol).changes_since(build(pol, htp=None))
    assert appeared is not None
    assert [c["flush"]["map"]["name"] for c in appeared if "flush" in c] == ["local_ports"]
    assert build(pol).changes_since(build(pol, clearnet=None)) is None


IIF_LO = match({"meta": {"key": "iif"}}, "lo")


def test_lockdown_keeps_loopback_only() -> None:
    """Exact rules, operators included: `oif != lo accept` would open everything."""
    rs = lockdown()
    for family in ("ip", "ip6"):
        chains = {c["name"]: c for c in objects(rs, "chain", family)}
        assert {n: (c["hook"], c["policy"]) for n, c in chains.items()} == {
            "input": ("input", "drop"), "forward": ("forward", "drop"),
            "output": ("output", "drop"),
        }  # fmt: skip
        assert rules(rs, family, "input") == [[IIF_LO, ACCEPT]]
        assert rules(rs, family, "output") == [[OIF_LO, ACCEPT]]
        assert rules(rs, family, "forward") == []


def test_new_inbound_is_dropped_and_related_is_accepted_only_on_lo(pol: policy.Policy) -> None:
    rs = build(dataclasses.replace(pol, namespaces=()))  # namespaces: test_nsrules.py
    assert rules(rs, "ip", "input") == [
        [match(STATE, "established"), ACCEPT],
        [IIF_LO, ACCEPT],
        [{"counter": None}, {"drop": None}],
    ]
    assert rules(rs, "ip", "out_related") == [[OIF_LO, match(L4PROTO, 1), ACCEPT], [REJECT]]
    assert rules(rs, "ip6", "out_related") == [
        [OIF_LO, match(L4PROTO, 58), ACCEPT],
        [OIF_LO, match({"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, "rst"]}, "rst"),
         ACCEPT],
        [REJECT],
    ]  # fmt: skip
    assert rules(rs, "ip6", "in_related")[-1] == [{"counter": None}, {"drop": None}]


def walk(node: Any) -> Any:
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def test_protocols_and_ports_are_numbers(pol: policy.Policy) -> None:
    """nft resolves names through /etc/protocols and /etc/services, which a
    minimal system lacks: the ruleset holds numbers only."""
    for rs in (build(pol), nm_and_tor(pol, "198.51.100.10")):
        document = rs.document()
        for node in walk(document):
            if isinstance(node, dict) and "match" in node and node["match"]["left"] == L4PROTO:
                right = node["match"]["right"]
                assert isinstance(right, int) or set(right) == {"range"}, node
        for family in ("ip", "ip6"):
            for name in ("local_ports", "local_any"):
                if name in [m["name"] for m in objects(rs, "map", family)]:
                    for key in elements(rs, family, name):
                        assert all(isinstance(k, int) for k in key), (name, key)
        for node in walk(document):
            if isinstance(node, dict) and node.get("left") == TH_DPORT:
                assert isinstance(node["right"], (int, dict)), node


def test_chain_names_are_distinct_for_distinct_user_keys(pol: policy.Policy) -> None:
    """Keys that differ only by '-', '_' or '.' once shared one chain, and
    so each other's rights."""
    users = (policy.User("a-b", "acct1"), policy.User("a_b", "acct2"), policy.User("a.b", "acct3"))
    direct = (policy.DirectRule("a-b", False, "any", ()),
              policy.DirectRule("a_b", False, "none", (53,)),
              policy.DirectRule("a.b", False, "new", ()))  # fmt: skip
    p = policy.Policy(pol.source, pol.log, users, (), direct, pol.lan, ())
    rs = compile_policy(p, Facts(uids=MappingProxyType({"acct1": 1, "acct2": 2, "acct3": 3})))
    assert rules(rs, "ip", "direct_a-b")[-1] == [match(L4PROTO, 6), owner(1), ACCEPT]
    assert rules(rs, "ip", "direct_a_b")[-1] == [UDP_DPORT_53, owner(2), ACCEPT]
    assert rules(rs, "ip", "direct_a.b")[-1] == [SYN_ONLY, owner(3), ACCEPT]


def with_dns(pol: policy.Policy, dns: policy.Dns) -> policy.Policy:
    return policy.Policy(pol.source, pol.log, pol.users, pol.local, pol.direct, pol.lan,
                         pol.redirects, dns)  # fmt: skip


def nm_and_tor(pol: policy.Policy, *servers: str) -> Ruleset:
    facts = Facts(uids=MappingProxyType(UIDS),
                  dns=tuple(ipaddress.IPv4Address(s) for s in servers))  # fmt: skip
    return compile_policy(with_dns(pol, policy.Dns(clearnet="nm", stray="tor")), facts)


def test_clearnet_dns_nm_sends_the_direct_users_dns_only_to_networkmanagers_servers(
    pol: policy.Policy,
) -> None:
    rs = nm_and_tor(pol, "203.0.113.53", "198.51.100.10", "203.0.113.53")
    assert named(rs, "set", "ip", "clearnet_dns") == {
        "family": "ip", "table": "tailsfw", "name": "clearnet_dns", "type": "ipv4_addr",
        "elem": ["198.51.100.10", "203.0.113.53"],
    }  # fmt: skip
    servers = match(DADDR, "@clearnet_dns")
    only_theirs = [match(TH_DPORT, 53), RETURN]
    assert rules(rs, "ip", "direct_clearnet") == [
        [OIF_LO, RETURN],
        [UDP_DPORT_53, servers, owner(110), ACCEPT],
        [TCP_DPORT_53, servers, match(L4PROTO, 6), owner(110), ACCEPT],
        only_theirs,
        [match(L4PROTO, 6), owner(110), ACCEPT],
    ]
    assert rules(rs, "ip", "direct_debian-tor") == [
        [UDP_DPORT_53, servers, owner(107), ACCEPT],
        [TCP_DPORT_53, servers, SYN_ONLY, owner(107), ACCEPT],
        only_theirs,
        [SYN_ONLY, owner(107), ACCEPT],
    ]


def test_clearnet_dns_with_no_server_known_refuses_their_dns(pol: policy.Policy) -> None:
    rs = nm_and_tor(pol)
    assert "elem" not in named(rs, "set", "ip", "clearnet_dns")
    assert [match(TH_DPORT, 53), RETURN] in rules(rs, "ip", "direct_clearnet")


def test_a_new_dns_server_is_a_set_only_change(pol: policy.Policy) -> None:
    before = nm_and_tor(pol, "198.51.100.10")
    after = nm_and_tor(pol, "203.0.113.10")
    name = {"family": "ip", "table": "tailsfw", "name": "clearnet_dns"}
    assert after.changes_since(before) == [
        {"flush": {"set": name}},
        {"add": {"element": {**name, "elem": ["203.0.113.10"]}}},
    ]
    assert nm_and_tor(pol).changes_since(before) == [{"flush": {"set": name}}]


def test_stray_dns_tor_redirects_other_users_dns_to_tors_dns_port(pol: policy.Policy) -> None:
    nat = rules(nm_and_tor(pol, "198.51.100.10"), "ip", "nat_output")
    assert nat[-1] == [
        UDP_DPORT_53,
        match(DADDR, prefix("127.0.0.0/8"), "!="),
        match(SKUID, {"set": [107, 110]}, "!="),
        {"redirect": {"port": 5353}},
    ]
    assert len(nat) == 3  # after the two redirects of the policy
    assert rules(build(pol), "ip", "nat_output") == nat[:2]  # "reject": nothing more


def test_local_is_for_lo_and_for_what_our_nat_sent_there(pol: policy.Policy) -> None:
    """The output hook names the first route's interface: a datagram our
    nat redirected from the Internet to 127.0.0.1 still shows eth0."""
    rs = build(pol)
    not_dnat = match({"ct": {"key": "status"}}, "dnat", "!")
    assert rules(rs, "ip", "local")[0] == [match(OIF_LO["match"]["left"], "lo", "!="),
                                           not_dnat, RETURN]  # fmt: skip
    assert rules(rs, "ip6", "local")[0] == [match(OIF_LO["match"]["left"], "lo", "!="), RETURN]


def test_two_accounts_with_one_uid_never_share_rights() -> None:
    """A uid that two policy users' accounts share keeps the first user's
    rights only (never the union), with a warning; the compiler never fails."""
    pol = policy.load(DEFAULT)
    rs = compile_policy(pol, Facts(uids={"amnesia": 1000, "clearnet": 1000}))
    assert any("'clearnet'" in w and "user 'amnesia'" in w for w in rs.warnings)
    assert not [o for o in rs.objects if o.get("chain", {}).get("name") == "direct_clearnet"]
