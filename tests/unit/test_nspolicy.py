"""The policy's namespaces and transparent proxying: the shipped five load;
whatever would widen what a namespace reaches is refused, and named."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import pytest

from tailsfw import policy
from tailsfw.nspolicy import EXPOSABLE, Namespace, Transparent

from .test_policy import DEFAULT, default_data

A = ipaddress.IPv4Address


def with_namespaces(*entries: dict[str, Any], **top: Any) -> dict[str, Any]:
    data = default_data()
    data["namespace"] = [copy.deepcopy(e) for e in entries]
    data.update(top)
    return data


def test_the_shipped_policy_holds_tails_five_namespaces() -> None:
    p = policy.load(DEFAULT)
    assert p.namespaces == (
        Namespace("tbb", A("10.200.1.1"), A("10.200.1.2"), (951, 9050)),
        Namespace("onioncircs", A("10.200.1.5"), A("10.200.1.6"), (951,)),
        Namespace("tca", A("10.200.1.9"), A("10.200.1.10"), (951,)),
        Namespace("onionshare", A("10.200.1.13"), A("10.200.1.14"), (951, 9050)),
        Namespace("clearnet", A("10.200.1.17"), A("10.200.1.18"), (), "clearnet"),
    )
    assert [ns.veth for ns in p.namespaces] == [
        "veth-tbb", "veth-onioncircs", "veth-tca", "veth-onionshare", "veth-clearnet"]  # fmt: skip
    assert str(p.namespaces[-1].network) == "10.200.1.16/30"
    assert p.transparent == Transparent(users=(), to_port=9040)


def test_host_and_guest_may_be_given_instead_of_the_network() -> None:
    entry = {"name": "app", "host": "10.200.2.6", "guest": "10.200.2.5", "expose": [9050]}
    (ns,) = policy.parse(with_namespaces(entry), "t").namespaces
    assert (ns.host, ns.guest) == (A("10.200.2.6"), A("10.200.2.5"))
    assert str(ns.network) == "10.200.2.4/30"


def test_no_namespace_is_no_namespace() -> None:
    data = default_data()
    del data["namespace"], data["transparent"]
    p = policy.parse(data, "t")
    assert p.namespaces == () and p.transparent == Transparent()


N0, N1 = r"namespace\[0\]", r"namespace\[1\]"
TBB = {"name": "tbb", "network": "10.200.1.0/30", "expose": [9050, 951]}
CLEARNET = {"name": "clearnet", "network": "10.200.1.16/30", "kind": "clearnet"}


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        # Addresses: one private /30, its two usable addresses, no overlap.
        ([{**TBB, "network": "10.200.1.0/29"}], N0 + r"\.network: 10\.200\.1\.0/29 is not a /30"),
        ([{**TBB, "network": "10.200.1.1/30"}], N0 + r"\.network: bad IPv4 network .*host bits"),
        ([{**TBB, "network": "198.51.100.0/30"}], N0 + r": 198\.51\.100\.0/30 is not private"),
        ([{**TBB, "network": "127.0.0.0/30"}], N0 + r": 127\.0\.0\.0/30 is not private"),
        ([{"name": "x", "host": "10.200.1.1", "guest": "10.200.1.5"}],
         N0 + r": host 10\.200\.1\.1 and guest 10\.200\.1\.5 must be the two usable"),
        ([{"name": "x", "host": "10.200.1.1", "guest": "10.200.1.3"}],
         N0 + r": .* must be the two usable addresses of one /30"),  # .3 broadcasts
        ([{"name": "x", "host": "10.200.1.0", "guest": "10.200.1.1"}], N0 + r": .* must be"),
        ([{"name": "x", "host": "10.200.1.1", "guest": "10.200.1.1"}], N0 + r": .* must be"),
        ([{"name": "x", "host": "10.200.1.1/24", "guest": "10.200.1.2"}],
         N0 + r"\.host: bad IPv4 network"),
        ([{"name": "x", "host": "10.200.1.0/30", "guest": "10.200.1.2"}],
         N0 + r"\.host: 10\.200\.1\.0/30 is not one address"),
        ([{"name": "x", "host": "10.200.1.1"}], N0 + r": missing key 'network'"),
        ([{**TBB, "host": "10.200.1.1"}], N0 + r": give either network or host"),
        ([TBB, {**CLEARNET, "network": "10.200.1.0/30"}],
         N1 + r": 10\.200\.1\.0/30 overlaps namespace\[0\] 10\.200\.1\.0/30"),
        # Names: distinct, and the veth fits in 15 characters.
        ([TBB, {**CLEARNET, "name": "tbb"}], N1 + r"\.name: 'tbb' is already namespace\[0\]"),
        ([{**TBB, "name": "torbrowser1"}],
         N0 + r"\.name: 'torbrowser1' is too long: its veth 'veth-torbrowser1' has 16"),
        ([{**TBB, "name": "a/b"}], N0 + r"\.name: bad namespace name 'a/b'"),
        ([{**TBB, "name": ".."}], N0 + r"\.name: bad namespace name '\.\.'"),
        ([{**TBB, "name": ""}], N0 + r"\.name: bad namespace name ''"),
        # Ports: Tor's client ports only, never to a clearnet namespace.
        ([{**TBB, "expose": [9052]}], N0 + r"\.expose\[0\]: port 9052 is not one of Tor's"),
        ([{**TBB, "expose": [9050, 631]}], N0 + r"\.expose\[1\]: port 631 is not one"),
        ([{**TBB, "expose": [9050, 9050]}], N0 + r"\.expose: 9050 is listed twice"),
        ([{**CLEARNET, "expose": [9050]}], N0 + r"\.expose: a clearnet namespace is exposed"),
        # One clearnet namespace, unless a second one says so.
        ([CLEARNET, {**CLEARNET, "name": "unsafe2", "network": "10.200.1.20/30"}],
         N1 + r"\.kind: a second clearnet namespace \(namespace\[0\] is one\)"),
        ([{**TBB, "another_clearnet": True}], N0 + r"\.another_clearnet: only for kind"),
        ([{**TBB, "kind": "direct"}], N0 + r"\.kind: unknown value 'direct'"),
        ([{**TBB, "colour": 1}], N0 + r": unknown key 'colour'"),
    ],
)  # fmt: skip
def test_what_would_widen_a_namespace_is_refused(
    entries: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(policy.PolicyError, match=r"^t\.toml: " + message) as raised:
        policy.parse(with_namespaces(*entries), "t.toml")
    assert "\n" not in str(raised.value)


def test_a_second_clearnet_namespace_asked_for_explicitly_loads() -> None:
    second = {**CLEARNET, "name": "unsafe2", "network": "10.200.1.20/30", "another_clearnet": True}
    p = policy.parse(with_namespaces(CLEARNET, second), "t")
    assert [ns.clearnet for ns in p.namespaces] == [True, True]


def test_exposable_ports_are_tors_client_ports() -> None:
    # Never the raw ControlPort, DNS, CUPS or the accessibility daemon.
    assert set(EXPOSABLE) == {9050, 9062, 9063, 9040, 951}


@pytest.mark.parametrize(
    ("transparent", "message"),
    [
        ({"users": ["nobody-here"]}, r"transparent\.users\[0\]: unknown user 'nobody-here'"),
        ({"users": ["debian-tor"]}, r"transparent\.users\[0\]: 'debian-tor' is a \[\[direct\]\]"),
        ({"users": ["amnesia"], "to_port": 9063},
         r"transparent\.users\[0\]: local\[\d\] rejects 'amnesia' at TCP port 9063"),
        ({"users": ["amnesia"], "to_port": 0}, r"transparent\.to_port: bad port 0"),
        ({"user": "amnesia"}, r"transparent: unknown key 'user'"),
    ],
)  # fmt: skip
def test_transparent_proxying_mistakes_are_named(transparent: dict[str, Any], message: str) -> None:
    data = default_data()
    data["transparent"] = transparent
    with pytest.raises(policy.PolicyError, match=r"^t\.toml: " + message):
        policy.parse(data, "t.toml")


def test_transparent_proxying_for_amnesia_loads() -> None:
    data = default_data()
    data["transparent"] = {"users": ["amnesia"]}
    assert policy.parse(data, "t").transparent == Transparent(users=("amnesia",), to_port=9040)
