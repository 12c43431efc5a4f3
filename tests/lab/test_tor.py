"""End to end with a real Tor (issue 11): what Tails needs works, and only
Tor's own connections to relays leave the host.

A private Tor network runs in the lab's peer namespace and a Tails-like Tor
client, as the policy's Tor user, in its host (tests/lab/tor_network.py,
docs/tor-lab.md). The network is built once for the module; every test runs
twice, with the default policy loaded by ``tailsfwctl apply`` and by
``tailsfwd`` (the client is restarted, and bootstraps, behind each).

As in Tails 7, the Tor Browser's namespace (tbb) is made once the firewall is
in force (tailsfwd puts its guest side in force itself; after ``tailsfwctl
apply`` the test does), and the client listens on ``10.200.1.1:9050`` too.

After every test the watch's counters must show no packet from the host but
Tor's to a relay, none leaving the host's eth0 from another user, and none
from the Tor network towards an address outside the lab: otherwise the test
errors at teardown, with the counts.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Iterator

import pytest

from tests.lab.appns import AppNamespaces, netns_prefix, tor_browser_namespace
from tests.lab.command import run
from tests.lab.daemon_process import run_daemon
from tests.lab.kernel import lab_host_put_back, remove_tailsfw_tables
from tests.lab.policies import CTL, lab_policy
from tests.lab.topology import HOST_V4, INTERNET_V4, Lab
from tests.lab.tor_network import (
    AUTOMAP_NETWORK,
    DNS_PORT,
    DNS_V4,
    EXIT,
    PAGE,
    SOCKS_PORTS,
    TRANS_PORT,
    WEB_DOMAIN,
    WEB_NAME,
    WEB_V4,
    TorClient,
    TorNetwork,
    built_circuits,
    curl,
    dns_query,
    missing_tools,
    onion_address,
    refused_packets,
    through_tor,
    tor_client,
    tor_lab,
)

MISSING = missing_tools()
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"Tor lab skipped: missing {', '.join(MISSING)} (Debian: tor, dnsmasq)"
)

WITHOUT_TOR = ("clearnet", "other")  # the clearnet user, and an account no policy names
REFUSED_WITHIN = 0.5  # seconds: a refusal is an immediate error, not a timeout
# Tor says nothing first on its ports: a probe that connected waits this long
# for a greeting before it closes (its result is already known).
PROBE_TIMEOUT = 0.3
ONION = onion_address(bytes(range(32)))
# The peer's own address on the DNS server's network: the source the kernel
# picks for the exit's queries (OutboundBindAddress covers only its TCP).
DNS_CLIENT = INTERNET_V4[1]


@pytest.fixture(scope="module")
def network(lab: Lab) -> Iterator[TorNetwork]:
    with tor_lab(lab) as built:
        yield built


@pytest.fixture(scope="module", params=["tailsfwctl apply", "tailsfwd"])
def firewall(request: pytest.FixtureRequest, lab: Lab, network: TorNetwork) -> Iterator[str]:
    """The default policy in force in the lab host, loaded one way or the other."""
    policy = lab_policy(lab, network.base / "policy.toml")
    if request.param == "tailsfwctl apply":
        lab.host([*CTL, "apply", "--policy", str(policy)])
        try:
            yield request.param
        finally:
            remove_tailsfw_tables(lab.host_ns)
    else:
        with (
            lab_host_put_back(lab),
            run_daemon(lab.host_ns, policy, network.base / "tailsfwd",
                       ["--netns-prefix", netns_prefix(lab)]) as daemon,
        ):  # fmt: skip
            daemon.wait_ready(timeout=30)  # a readiness wait, not a measure: a loaded CI is slow
            yield request.param


@pytest.fixture(scope="module")
def tbb(lab: Lab, network: TorNetwork, firewall: str) -> Iterator[AppNamespaces]:
    """The Tor Browser's namespace, made after the firewall, its guest side in force."""
    policy = network.base / "policy.toml"  # the firewall's
    with tor_browser_namespace(lab, policy, by_daemon=firewall == "tailsfwd") as apps:
        yield apps


@pytest.fixture(scope="module")
def client(network: TorNetwork, tbb: AppNamespaces) -> Iterator[TorClient]:
    """The Tor client, bootstrapped behind the firewall, listening in tbb's reach too."""
    with tor_client(network, namespace_hosts=[str(tbb.named("tbb").host)]) as started:
        yield started


@pytest.fixture(autouse=True)
def only_tor_leaves(network: TorNetwork, client: TorClient) -> Iterator[None]:
    before = network.watch.totals()
    yield
    leaks = network.watch.since(before)
    assert not leaks.any, f"packets other than Tor's to its relays: {leaks}"


# -- what works through Tor --------------------------------------------------------


def test_bootstrap_within_a_minute(network: TorNetwork, client: TorClient) -> None:
    # The whole network (keys, authorities, exit, first client), and this
    # client (the second starts with the network up).
    assert network.bootstrap_seconds is not None and network.bootstrap_seconds < 60
    assert client.bootstrap_seconds < 60


@pytest.mark.parametrize("host", [WEB_V4, WEB_NAME])
def test_desktop_user_fetches_a_page_through_tor(
    lab: Lab, network: TorNetwork, client: TorClient, host: str
) -> None:
    seen = len(network.web_clients())
    code, page, _ = through_tor(lab, "amnesia", f"http://{host}/")
    assert (code, page) == (0, PAGE), f"{client.log()}\n{network.logs()}"
    # The web server saw the exit relay, never the host.
    assert network.web_clients()[seen:] == [EXIT.address]
    with client.control() as control:
        circuits = built_circuits(control)
    assert any(len(c) == 3 and c[-1] == EXIT.nick for c in circuits), circuits


def test_a_name_is_resolved_by_the_exit_through_the_lab_dns(lab: Lab, network: TorNetwork) -> None:
    name = f"n{secrets.token_hex(4)}.{WEB_DOMAIN}"  # not in any cache yet
    code, page, _ = through_tor(lab, "amnesia", f"http://{name}/")
    assert (code, page) == (0, PAGE)
    # Asked by the exit, in the peer namespace (from its address on the
    # DNS server's network), never by the host.
    assert [q for q in network.dns_queries() if q[0] == name] == [(name, DNS_CLIENT)]


def test_tor_browser_in_its_namespace_fetches_a_page_through_tor(
    lab: Lab, network: TorNetwork, client: TorClient, tbb: AppNamespaces
) -> None:
    # As Tor Browser: amnesia inside tbb, 127.0.0.1:9050, which the guest
    # ruleset DNATs to Tor's SocksPort 10.200.1.1:9050 on the host.
    ns = tbb.named("tbb")
    seen, arrived = len(network.web_clients()), tbb.guest_packets(ns)
    before = network.watch.totals()
    code, page, _ = through_tor(lab, "amnesia", f"http://{WEB_NAME}/", tbb.netns(ns))
    assert (code, page) == (0, PAGE), f"{client.log()}\n{network.logs()}"
    assert tbb.guest_packets(ns) > arrived  # the answer came in by veth0
    assert network.web_clients()[seen:] == [EXIT.address]
    # Meanwhile on the uplink: Tor's packets to its relays, nothing else
    # (nothing forwarded, nothing from 10.200.1.2, nothing to the web server).
    leaks = network.watch.since(before)
    assert leaks.tor > 0 and not leaks.any, leaks


# -- what is refused ---------------------------------------------------------------


def test_from_tor_browsers_namespace_only_tor_and_onion_grater_are_reached(
    lab: Lab, network: TorNetwork, tbb: AppNamespaces
) -> None:
    ns = tbb.named("tbb")
    netns, host = tbb.netns(ns), str(ns.host)
    seen = len(network.web_clients())
    # The web server, straight: no route out of tbb, as Tails builds it.
    code, error, _ = curl(lab, "amnesia", f"http://{WEB_V4}/", namespace=netns)
    assert code == 7, error
    # Nor with one (a namespace gone rogue): the host forwards nothing of it.
    route = ["ip", "-n", netns, "route", "add", "default", "via", host]
    run(route)
    try:
        got = tbb.probe(ns, "tcp", WEB_V4, 80)
        assert got.result != "open", got
    finally:
        run([*route[:3], "route", "del", "default"])
    assert network.web_clients()[seen:] == []
    # The host's listeners at 10.200.1.1 but Tor's and onion-grater's (the
    # stand-ins on 9052, 9062: their ports are not exposed to tbb), straight
    # and as 127.0.0.1 (only the exposed ports are DNATed).
    for address in (host, "127.0.0.1"):
        for port in (9052, 9062):
            got = tbb.probe(ns, "tcp", address, port)
            assert got.result != "open", (address, port, got)
    # The counterpart: the exposed ports are reached, at the host.
    for port in (9050, 951):
        got = tbb.probe(ns, "tcp", "127.0.0.1", port, timeout=PROBE_TIMEOUT)
        assert got.result == "open", (port, got)


def test_the_same_fetch_without_tor_is_refused_fast_and_counted(
    lab: Lab, network: TorNetwork
) -> None:
    seen, refused = len(network.web_clients()), refused_packets(lab)
    code, error, seconds = curl(lab, "amnesia", f"http://{WEB_V4}/")
    assert code == 7, error  # couldn't connect
    assert seconds < REFUSED_WITHIN
    assert refused_packets(lab) > refused
    assert network.web_clients()[seen:] == []


def test_a_direct_dns_query_is_refused_and_counted(lab: Lab) -> None:
    refused = refused_packets(lab)
    report = dns_query(lab, "amnesia", DNS_V4, 53, WEB_NAME)
    assert report["result"] == "refused", report
    assert float(str(report["ms"])) < REFUSED_WITHIN * 1000
    assert refused_packets(lab) > refused


def test_an_onion_name_gets_an_automap_address_and_the_transport_takes_it(lab: Lab) -> None:
    # To 127.0.0.1:53: the nat rule sends it to Tor's DNSPort.
    report = dns_query(lab, "amnesia", "127.0.0.1", 53, ONION)
    assert report["result"] == "answer", report
    addresses = report["addresses"]
    assert isinstance(addresses, list) and len(addresses) == 1, report
    address = str(addresses[0])
    assert ipaddress.ip_address(address) in ipaddress.ip_network(AUTOMAP_NETWORK)
    # A connection to it is redirected to the TransPort, where only Tor
    # listens (the lab's stand-ins are stopped): it is accepted.
    probe = lab.probe("amnesia", "tcp", 4, address, 80, timeout=PROBE_TIMEOUT)
    assert probe.result == "open", probe
    for role in WITHOUT_TOR:
        probe = lab.probe(role, "tcp", 4, address, 80, timeout=PROBE_TIMEOUT)
        assert probe.result == "refused", (role, probe)


@pytest.mark.parametrize("role", WITHOUT_TOR)
def test_users_without_tor_access_cannot_use_its_ports(lab: Lab, role: str) -> None:
    for port in (*SOCKS_PORTS, TRANS_PORT):
        probe = lab.probe(role, "tcp", 4, "127.0.0.1", port, timeout=PROBE_TIMEOUT)
        assert probe.result == "refused", (port, probe)
    for port in (53, DNS_PORT):
        report = dns_query(lab, role, "127.0.0.1", port, ONION)
        assert report["result"] == "refused", (port, report)
    code, error, _ = through_tor(lab, role, f"http://{WEB_V4}/")
    assert code == 7, error


def test_the_desktop_user_may_use_them(lab: Lab) -> None:
    # The counterpart of the test above: the same probes do get through.
    for port in (9050, TRANS_PORT):
        probe = lab.probe("amnesia", "tcp", 4, "127.0.0.1", port, timeout=PROBE_TIMEOUT)
        assert probe.result == "open", (port, probe)
    report = dns_query(lab, "amnesia", "127.0.0.1", DNS_PORT, ONION)
    assert report["result"] == "answer", report


def test_tor_reached_its_relays_and_nothing_else(network: TorNetwork) -> None:
    # The autouse check proves "nothing else" for each test; this one proves
    # that the counters do see the Tor client's traffic at all.
    totals = network.watch.totals()
    assert totals.tor > 0 and not totals.any, totals
    assert HOST_V4 not in network.web_clients()
