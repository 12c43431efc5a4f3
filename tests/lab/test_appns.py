"""The application namespaces with real packets: each reaches what the spec
says and nothing else; the LAN reaches none of them (issue 15).

The host's rules come from `tailsfwctl apply` with the shipped policy; the
guests' rulesets and both sides' settings are put in force by the test
(appns.AppNamespaces), as tailsfwd does live.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from types import MappingProxyType

import pytest

from tailsfw import compiler, nsrules, policy, verify
from tailsfw.facts import Facts
from tailsfw.nspolicy import Transparent
from tests.lab import policies
from tests.lab.appns import GUEST_PORT, AppNamespaces
from tests.lab.kernel import in_scratch_namespace, remove_tailsfw_tables
from tests.lab.topology import (
    HOST_INBOUND_PORT,
    HOST_V4,
    INTERNET_V4,
    PEER_IF,
    PEER_LAN_V4,
    Lab,
    ProbeResult,
)

# Counted at the peer's lan0: what the clearnet namespace's packets look like there.
TTL_TABLE = "tfwttl"
TTL_RULESET = f"""
table netdev {TTL_TABLE} {{
    counter ttl64 {{ }}
    counter ttl_other {{ }}
    counter unmasqueraded {{ }}
    chain ingress {{
        type filter hook ingress device "{PEER_IF}" priority 1; policy accept;
        ip saddr 10.200.1.0/24 counter name "unmasqueraded"
        ip saddr {HOST_V4} ip ttl 64 counter name "ttl64"
        ip saddr {HOST_V4} ip ttl != 64 counter name "ttl_other"
    }}
}}
"""


@pytest.fixture(scope="module")
def apps(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppNamespaces]:
    path = policies.lab_policy(lab, tmp_path_factory.mktemp("appns") / "policy.toml")
    done = policies.apply(lab, path)
    assert done.returncode == 0, done.stderr
    namespaces = policy.load(path).namespaces
    assert [ns.name for ns in namespaces] == ["tbb", "onioncircs", "tca", "onionshare", "clearnet"]
    lab.peer(["nft", "-f", "-"], input=TTL_RULESET)
    try:
        with AppNamespaces(lab, namespaces) as built:
            for ns in namespaces:
                built.apply_guest(ns)
            built.apply_host_settings()
            built.peer_route()
            yield built
    finally:
        lab.peer(["nft", "delete", "table", "netdev", TTL_TABLE])
        lab.host(["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"])
        remove_tailsfw_tables(lab.host_ns)


def peer_counter(lab: Lab, name: str) -> int:
    listing = lab.peer(["nft", "-j", "list", "counter", "netdev", TTL_TABLE, name])
    (counter,) = [o["counter"] for o in json.loads(listing.stdout)["nftables"] if "counter" in o]
    return int(counter["packets"])


def reached(got: ProbeResult) -> bool:
    """Answered by a listener, or a packet at the peer.  A refusal may show
    as a timeout: the kernel rate-limits the ICMP errors of rejects to one
    address (icmp_ratelimit), and a UDP probe without a listener is "sent"."""
    return got.result == "open" or got.arrived > 0


SERVICES = ("tbb", "onioncircs", "tca", "onionshare")


@pytest.mark.parametrize("name", SERVICES)
def test_a_services_namespace_reaches_its_exposed_ports_and_nothing_else(
    lab: Lab, apps: AppNamespaces, name: str
) -> None:
    ns = apps.named(name)
    problems = []
    for port in (951, 9050, 9052, 9062):
        got = apps.probe(ns, "tcp", "127.0.0.1", port)
        want = "open" if port in ns.expose else "refused"
        # The host's listener answers with its address: the DNAT went to the host.
        if got.result != want or (want == "open" and f"{ns.host}:{port}" not in got.detail):
            problems.append(f"127.0.0.1:{port}: {got}")
    others = [
        (str(ns.host), 9052), (str(ns.host), 9062), (str(ns.host), HOST_INBOUND_PORT),
        (HOST_V4, HOST_INBOUND_PORT), ("10.200.1.18", GUEST_PORT), ("10.200.1.17", 9050),
        (PEER_LAN_V4, 80), (INTERNET_V4[0], 443),
        # Its host address, straight (no DNAT): only its exposed ports.
        *((str(ns.host), port) for port in (951, 9050) if port not in ns.expose),
    ]  # fmt: skip
    for address, port in others:
        for proto in ("tcp", "udp"):
            got = apps.probe(ns, proto, address, port)
            if reached(got):
                problems.append(f"{proto} {address}:{port}: {got}")
    got = apps.probe(ns, "icmp", INTERNET_V4[0])
    if got.result == "open" or got.arrived:
        problems.append(f"icmp {INTERNET_V4[0]}: {got}")
    assert not problems, "\n".join(problems)


def test_the_clearnet_namespace_reaches_the_network_masqueraded_with_ttl_64(
    lab: Lab, apps: AppNamespaces
) -> None:
    ns = apps.named("clearnet")
    before = {c: peer_counter(lab, c) for c in ("ttl64", "ttl_other", "unmasqueraded")}
    problems = []
    for address in (INTERNET_V4[0], PEER_LAN_V4):
        for proto, port in (("tcp", 443), ("tcp", 80), ("udp", 53), ("udp", 5000), ("icmp", None)):
            got = apps.probe(ns, proto, address, port)
            if got.result != "open" or not got.arrived:
                problems.append(f"{proto} {address}:{port}: {got}")
    assert not problems, "\n".join(problems)
    after = {c: peer_counter(lab, c) for c in before}
    assert after["ttl64"] - before["ttl64"] >= 10
    assert after["ttl_other"] == before["ttl_other"], "forwarded packets with a TTL of 63"
    assert after["unmasqueraded"] == before["unmasqueraded"]


def test_the_clearnet_namespace_reaches_no_namespace_and_no_host_service(
    lab: Lab, apps: AppNamespaces
) -> None:
    ns = apps.named("clearnet")
    others = [other for other in apps.namespaces if other != ns]
    before = [apps.guest_packets(other) for other in others]
    problems = []
    targets = [("10.200.1.1", 9050), ("10.200.1.1", 951), ("10.200.1.13", 9050),
               ("10.200.1.17", 9050), ("10.200.1.17", HOST_INBOUND_PORT),
               ("10.200.1.2", GUEST_PORT), ("10.200.1.14", GUEST_PORT),
               (HOST_V4, HOST_INBOUND_PORT)]  # fmt: skip
    for address, port in targets:
        for proto in ("tcp", "udp"):
            got = apps.probe(ns, proto, address, port)
            if reached(got):
                problems.append(f"{proto} {address}:{port}: {got}")
    assert not problems, "\n".join(problems)
    # Not one packet got into another namespace (a datagram needs no answer).
    assert [apps.guest_packets(other) for other in others] == before


def test_the_lan_reaches_no_namespace(lab: Lab, apps: AppNamespaces) -> None:
    problems = []
    for ns in apps.namespaces:
        for proto in ("tcp", "udp", "icmp"):
            port = None if proto == "icmp" else GUEST_PORT
            seen = apps.guest_packets(ns)
            got = lab.probe_from_peer(proto, 4, str(ns.guest), port)
            if got.result == "open" or apps.guest_packets(ns) != seen:
                problems.append(f"{proto} {ns.guest}:{port}: {got}")
    assert not problems, "\n".join(problems)


def test_ip_forward_is_on_with_a_clearnet_veth_and_forwarding_only_on_it(
    lab: Lab, apps: AppNamespaces
) -> None:
    def read(key: str) -> str:
        return lab.host(["sysctl", "-n", key]).stdout.strip()

    assert read("net.ipv4.ip_forward") == "1"
    assert read("net.ipv4.conf.veth-clearnet.forwarding") == "1"
    assert read("net.ipv4.conf.veth-tbb.forwarding") == "0"
    tbb = apps.named("tbb")
    assert apps.run_in(tbb, ["sysctl", "-n", "net.ipv4.conf.all.route_localnet"]).strip() == "1"


@pytest.mark.parametrize("transparent", [(), ("amnesia",)])
def test_the_kernel_lists_back_exactly_what_was_compiled(transparent: tuple[str, ...]) -> None:
    """verify (the daemon's tamper check) compares the kernel's listing with
    the compiled ruleset: any difference would read as tampering forever."""
    shipped = policy.load(policies.DEFAULT_POLICY)
    pol = dataclasses.replace(shipped, transparent=Transparent(users=transparent))
    uids = MappingProxyType({"amnesia": 1000, "root": 0, "clearnet": 110, "debian-tor": 107})
    rulesets = [compiler.compile_policy(pol, Facts(uids=uids))]
    rulesets += [nsrules.guest_ruleset(ns) for ns in pol.namespaces]
    for ruleset in rulesets:
        done = in_scratch_namespace("nft -j -f - && nft -j list ruleset", ruleset.to_json())
        assert done.returncode == 0, done.stderr
        assert verify.differences(json.loads(done.stdout)["nftables"], ruleset) == []
