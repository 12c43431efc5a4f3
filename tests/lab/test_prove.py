"""`prove` and `explain` in the kernel: the shipped policy agrees with the
specification, and a wrong ruleset is caught, naming the class.

Each run makes its own scratch network namespace (tailsfw/scratch.py) and
removes it; nothing here touches this machine's namespace.  The full proof
is `make prove`; here a slice (every 11th class) and, for each broken
ruleset, the classes it concerns.
"""

from __future__ import annotations

import copy
import ipaddress
import subprocess
import sys
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from tailsfw import oracle, prove
from tailsfw.classes import Packet
from tests import prove_world
from tests.lab.command import REPO
from tests.prove_world import ACCOUNTS, SHIPPED

Json = dict[str, Any]


@pytest.fixture(scope="module")
def shipped() -> tuple[Json, oracle.World]:
    return prove_world.shipped()


def rules(document: Json, chain: str) -> list[Json]:
    return [
        c["add"]["rule"]
        for c in document["nftables"]
        if "add" in c and "rule" in c["add"] and c["add"]["rule"]["chain"] == chain
    ]


def described(report: prove.Report) -> set[str]:
    return {d.packet.describe() for d in report.differences}


def only(test: Callable[[Packet], bool]) -> Callable[[list[Packet]], Iterable[Packet]]:
    return lambda packets: [p for p in packets if test(p)]


def test_a_slice_of_the_shipped_policy_agrees_with_the_specification(
    shipped: tuple[Json, oracle.World],
) -> None:
    document, world = shipped
    report = prove.prove(document, world, select=lambda packets: packets[::11])
    assert report.classes > 5000
    assert not report.differences, "\n".join(report.differences[0].lines())


def test_a_port_off_by_one_is_caught(shipped: tuple[Json, oracle.World]) -> None:
    document, world = copy.deepcopy(shipped)
    ports = next(
        c["add"]["map"]
        for c in document["nftables"]
        if "add" in c and c["add"].get("map", {}).get("name") == "local_ports"
    )
    for element in ports["elem"]:
        if element[0]["concat"] == [6, 9050, ACCOUNTS["nobody"]]:
            element[0]["concat"][1] = 9051
    report = prove.prove(
        document, world, select=only(lambda p: p.daddr == "127.0.0.1" and not p.established)
    )
    assert described(report) == {
        "uid 65534 tcp SYN to 127.0.0.1 port 9050 on lo",
        "uid 65534 tcp SYN to 127.0.0.1 port 9051 on lo",
    }
    kernel = {d.packet.dport: d.seen.verdict for d in report.differences}
    assert kernel == {9050: "refused", 9051: "accepted"}


def test_a_swapped_uid_is_caught(shipped: tuple[Json, oracle.World]) -> None:
    """Tor's direct rights given to amnesia's uid: amnesia reaches the Internet."""
    document, world = copy.deepcopy(shipped)
    (dispatch,) = [r for r in rules(document, "output") if "vmap" in r["expr"][0]]
    for element in dispatch["expr"][0]["vmap"]["data"]["set"]:
        if element[0] == ACCOUNTS["debian-tor"]:
            element[0] = ACCOUNTS["amnesia"]
    uids = {ACCOUNTS["amnesia"], ACCOUNTS["debian-tor"]}
    report = prove.prove(
        document,
        world,
        select=only(lambda p: p.uid in uids and p.daddr in ("1.0.0.0", "223.255.255.255")),
    )
    found = described(report)
    assert "uid 1000 tcp SYN to 1.0.0.0 port 0 on eth0" in found
    assert "uid 121 tcp SYN to 1.0.0.0 port 0 on eth0" in found
    assert all(d.packet.uid in uids for d in report.differences)


def test_the_lan_dns_refusal_missing_is_caught(shipped: tuple[Json, oracle.World]) -> None:
    document, world = copy.deepcopy(shipped)
    lan = [
        c for c in document["nftables"] if c.get("add", {}).get("rule", {}).get("chain") == "lan"
    ]
    udp53 = [
        c
        for c in lan
        if {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": 17}}
        in c["add"]["rule"]["expr"]
        and any(e.get("match", {}).get("right") == 53 for e in c["add"]["rule"]["expr"])
    ]
    assert len(udp53) == 1
    document["nftables"].remove(udp53[0])
    lan_net = ipaddress.ip_network("192.168.0.0/16")
    report = prove.prove(
        document,
        world,
        select=only(lambda p: p.family == "ipv4" and ipaddress.ip_address(p.daddr) in lan_net),
    )
    found = described(report)
    assert "uid 1000 udp to 192.168.0.0 port 53 on eth0" in found
    assert {d.packet.proto for d in report.differences} == {17}
    assert {d.packet.dport for d in report.differences} == {53}
    assert {d.decision.rule for d in report.differences} == {"Tails rule 5"}


def tailsfwctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tailsfw.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_explain_says_verdict_path_rule_and_sentence() -> None:
    refused = tailsfwctl(
        "explain", "--policy", str(SHIPPED), "--uid", "1000", "192.168.1.1", "udp/53"
    )
    assert refused.returncode == 1, refused.stderr
    assert "kernel:    refused (logged)" in refused.stdout
    assert "path:      nat_output -> output -> lan -> lan_refused -> refuse" in refused.stdout
    assert "a LAN resolver can learn the user's public IP" in refused.stdout
    onion = tailsfwctl(
        "explain", "--policy", str(SHIPPED), "--uid", "1000", "127.192.0.7", "tcp/80"
    )
    assert onion.returncode == 0, onion.stderr
    assert "redirected to 127.0.0.1:9040, then accepted" in onion.stdout
    assert "Tails rule 2" in onion.stdout
    bad = tailsfwctl("explain", "--policy", str(SHIPPED), "--uid", "1000", "example.org")
    assert bad.returncode == 2
    assert "not an IP address" in bad.stderr


def test_explain_reads_the_ruleset_in_force_in_a_named_namespace(
    shipped: tuple[Json, oracle.World],
) -> None:
    """The namespace's own ruleset is read, never changed: listed the same after."""
    import json
    import os

    name = f"tfwprove-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        in_ns = ["ip", "netns", "exec", name, "nft"]
        subprocess.run([*in_ns, "-j", "-f", "-"], input=json.dumps(shipped[0]), text=True,
                       check=True, timeout=30)  # fmt: skip
        before = subprocess.run([*in_ns, "list", "ruleset"], capture_output=True, text=True,
                                check=True, timeout=30).stdout  # fmt: skip
        done = tailsfwctl("explain", "--netns", name, "--uid", "121", "1.2.3.4", "tcp/443")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "path:      nat_output -> output -> direct_debian-tor" in done.stdout
        after = subprocess.run([*in_ns, "list", "ruleset"], capture_output=True, text=True,
                               check=True, timeout=30).stdout  # fmt: skip
        assert after == before
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


def test_riding_another_users_flow_is_caught(shipped: tuple[Json, oracle.World]) -> None:
    """The owner mark no longer asked: every established flow is anyone's."""
    document, world = copy.deepcopy(shipped)
    (first, *_) = rules(document, "conntracked")
    first["expr"] = [e for e in first["expr"] if "mark" not in str(e.get("match", {}))]
    report = prove.prove(document, world, select=only(lambda p: p.established))
    found = described(report)
    assert (
        "uid 1000 udp to 1.0.0.0 port 5352 from 100.64.0.2 on eth0, established (ct mark 121)"
        in found
    )
    assert all(d.packet.mark != 0 and d.seen.verdict == "accepted" for d in report.differences)


def test_an_open_input_chain_is_caught(shipped: tuple[Json, oracle.World]) -> None:
    """Input accepting what arrives from the network: every inbound class differs."""
    document, world = copy.deepcopy(shipped)
    (first, *_) = [r for r in rules(document, "input") if r["family"] == "ip"]
    first["expr"] = [{"accept": None}]
    report = prove.prove(document, world, select=only(lambda p: p.inbound))
    assert "tcp SYN from 1.0.0.0 to 100.64.0.2 port 0 in on eth0" in described(report)
    assert {d.packet.family for d in report.differences} == {"ipv4"}
    assert len(report.differences) == len([p for p in report.differences if p.packet.inbound]) > 600


def test_no_ruleset_at_all_is_caught(shipped: tuple[Json, oracle.World]) -> None:
    report = prove.prove({"nftables": []}, shipped[1])
    assert "uid 1001 icmp to 1.0.0.0 port 0 on eth0" in described(report)
    assert all(d.seen.verdict == "accepted" for d in report.differences)
    assert len(report.differences) >= report.classes // 2


def test_a_namespace_port_too_many_is_caught(shipped: tuple[Json, oracle.World]) -> None:
    """The host's input from veth-tbb accepting Tor's raw ControlPort too."""
    document, world = copy.deepcopy(shipped)
    (tbb,) = [r for r in rules(document, "input") if r.get("comment") == "namespace tbb"]
    ports = next(e["match"]["right"] for e in tbb["expr"] if "tcp" in str(e.get("match")))
    ports["set"].append(9052)
    report = prove.prove(document, world, select=only(lambda p: p.oif == "veth-tbb"))
    assert "tcp SYN from 10.200.1.2 to 10.200.1.1 port 9052 in on veth-tbb" in described(report)
    assert {(d.seen.verdict, d.packet.dport) for d in report.differences} == {("accepted", 9052)}


def test_clearnet_forwarded_into_a_namespace_is_caught(shipped: tuple[Json, oracle.World]) -> None:
    """Both of the forward chain's guards gone: clearnet reaches tbb's guest."""
    document, world = copy.deepcopy(shipped)
    for rule in [r for r in rules(document, "forward") if "reject" in str(r["expr"])]:
        document["nftables"].remove({"add": {"rule": rule}})
    report = prove.prove(document, world, select=only(lambda p: p.oif == "veth-clearnet"))
    found = described(report)
    assert "tcp SYN from 10.200.1.16 to 10.200.1.2 port 0 in on veth-clearnet" in found
    assert {d.seen.forwarded.split(" from")[0] for d in report.differences} >= {
        "out on veth-tbb", "out on veth-onioncircs"}  # fmt: skip
    assert {d.decision.verdict for d in report.differences} == {"refused"}


def test_the_forwarded_ttl_left_at_63_is_caught(shipped: tuple[Json, oracle.World]) -> None:
    """No TTL reset: what clearnet sends leaves with 63, telling a LAN observer."""
    document, world = copy.deepcopy(shipped)
    (out,) = [r for r in rules(document, "forward") if "mangle" in str(r["expr"])]
    out["expr"] = [e for e in out["expr"] if "mangle" not in e]
    report = prove.prove(document, world, select=only(lambda p: p.oif == "veth-clearnet"))
    difference = next(d for d in report.differences if d.packet.daddr == "1.0.0.0")
    assert difference.seen.forwarded.endswith("ttl 63")
    assert difference.decision.forwarded.endswith("ttl 64")
    assert {d.decision.rule for d in report.differences} == {"namespace clearnet, forward"}
