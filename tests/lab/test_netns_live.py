"""tailsfwd follows the application namespaces live (issue 15): made after it
started, each gets its guest ruleset and settings from the daemon, and the
host its forwarding settings; one deleted and made again gets them again.
Nothing here puts a rule in force by hand."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tailsfw import policy
from tests.lab import policies
from tests.lab.appns import GUEST_PORT, AppNamespaces, guest_differences, netns_prefix, wait_guest
from tests.lab.daemon_process import DaemonProcess, run_daemon
from tests.lab.kernel import remove_tailsfw_tables
from tests.lab.netns import delete_namespace
from tests.lab.topology import Lab
from tests.lab.wait import wait_for

pytestmark = pytest.mark.usefixtures("daemon_host")


@pytest.fixture
def daemon(lab: Lab, tmp_path: Path) -> Iterator[DaemonProcess]:
    path = policies.lab_policy(lab, tmp_path / "policy.toml")
    remove_tailsfw_tables(lab.host_ns)
    with run_daemon(lab.host_ns, path, tmp_path / "d", ["--netns-prefix", netns_prefix(lab)]) as d:
        d.wait_ready()
        yield d


def test_namespaces_made_after_the_start_get_their_rules(lab: Lab, daemon: DaemonProcess) -> None:
    namespaces = policy.load(daemon.policy).namespaces
    with AppNamespaces(lab, namespaces) as apps:
        for ns in namespaces:
            apps.wait_guest(ns)
        tbb = apps.named("tbb")
        got = apps.probe(tbb, "tcp", "127.0.0.1", 9050)
        assert got.result == "open" and f"{tbb.host}:9050" in got.detail, got  # the DNAT
        assert apps.probe(tbb, "tcp", "127.0.0.1", 9052).result != "open"
        for ns in namespaces:  # the LAN reaches none of them
            seen = apps.guest_packets(ns)
            got = lab.probe_from_peer("tcp", 4, str(ns.guest), GUEST_PORT)
            assert got.result != "open" and apps.guest_packets(ns) == seen, (ns.name, got)
        inside = apps.run_in(tbb, ["sysctl", "-n", "net.ipv4.conf.all.route_localnet"])
        assert inside.strip() == "1"

        def host(key: str) -> str:
            return lab.host(["sysctl", "-n", key]).stdout.strip()

        wait_for(lambda: host("net.ipv4.ip_forward") == "1", 5.0, 0.01, what="ip_forward")
        assert host("net.ipv4.conf.veth-clearnet.forwarding") == "1"
        assert host("net.ipv4.conf.veth-tbb.forwarding") == "0"
        assert daemon.status()["failing"] == {}
    # No clearnet veth any more: the host forwards nothing.
    wait_for(lambda: host("net.ipv4.ip_forward") == "0", 5.0, 0.01, what="ip_forward off")


def test_a_namespace_made_again_gets_its_rules_again(lab: Lab, daemon: DaemonProcess) -> None:
    (tbb,) = [ns for ns in policy.load(daemon.policy).namespaces if ns.name == "tbb"]
    netns = netns_prefix(lab) + "tbb"
    other = netns_prefix(lab) + "notours"
    try:
        for _ in range(3):
            subprocess.run(["ip", "netns", "add", netns], check=True)
            wait_guest(netns, tbb)
            delete_namespace(netns)
        # A name the policy does not know is not ours to touch.
        subprocess.run(["ip", "netns", "add", other], check=True)
        subprocess.run(["ip", "netns", "add", netns], check=True)
        wait_guest(netns, tbb)
        assert guest_differences(other, tbb) is None
        assert daemon.status()["failing"] == {}
    finally:
        for name in (netns, other):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)
