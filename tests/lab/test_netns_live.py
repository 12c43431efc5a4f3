"""tailsfwd follows the application namespaces live (issue 15): made after it
started, each gets its guest ruleset and settings from the daemon, and the
host its forwarding settings; one deleted and made again gets them again.
Nothing here puts a rule in force by hand.  The status lists them (the
daemon's, over D-Bus, and root's tailsfwctl looking inside each), and a
tampered guest is found by namespace, rule by rule."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tailsfw import policy, service, summary
from tailsfw.events import NamespacesPresent
from tailsfw.netnsfiles import NETNS_DIR, NetnsId
from tailsfw.netnswatch import NetnsWatch
from tests.lab import policies
from tests.lab.appns import (
    GUEST_PORT,
    AppNamespaces,
    guest_differences,
    netns_prefix,
    restore_times,
    wait_guest,
)
from tests.lab.bus import PrivateBus, private_system_bus
from tests.lab.command import AS_NOBODY, netns_exec, run, tailsfwctl_in
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
            wait_guest(tbb, netns_exec(netns))
            delete_namespace(netns)
        # A name the policy does not know is not ours to touch.
        subprocess.run(["ip", "netns", "add", other], check=True)
        subprocess.run(["ip", "netns", "add", netns], check=True)
        wait_guest(tbb, netns_exec(netns))
        assert guest_differences(tbb, netns_exec(other)) is None
        assert daemon.status()["failing"] == {}
    finally:
        for name in (netns, other):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)


def test_a_guest_ruleset_changed_by_another_process_is_put_back(
    lab: Lab, daemon: DaemonProcess
) -> None:
    """Inside tbb, root flushes the ruleset, then deletes one rule: each
    time tailsfwd reads it in tbb's own notifications and puts the guest
    side back, and its own commits there are never taken for another's."""
    (tbb,) = [ns for ns in policy.load(daemon.policy).namespaces if ns.name == "tbb"]
    netns = netns_prefix(lab) + "tbb"
    inside = netns_exec(netns)
    try:
        subprocess.run(["ip", "netns", "add", netns], check=True)
        wait_guest(tbb, inside)
        run([*inside, "nft", "flush", "ruleset"])
        wait_guest(tbb, inside, timeout=2.0)
        listing = json.loads(
            run([*inside, "nft", "-j", "-a", "list", "table", "ip", "tailsfw"]).stdout
        )
        handle = next(e["rule"]["handle"] for e in listing["nftables"] if "rule" in e)
        chain = next(e["rule"]["chain"] for e in listing["nftables"] if "rule" in e)
        run([*inside, "nft", "delete", "rule", "ip", "tailsfw", chain, "handle", str(handle)])
        wait_guest(tbb, inside, timeout=2.0)
        assert daemon.log().count("namespace tbb: ruleset changed by another process") == 2
        # Flushed again 0-9 ms after each restore (even while it still writes the settings).
        flushes = len(restore_times(netns, tbb, [0.003 * (i % 4) for i in range(30)], 2.0))
        time.sleep(0.5)  # a loop on our own commits would show by now (warnings are summarised)
        daemon.wait_status(lambda s: s["counters"]["guest_tamperings"] == 2 + flushes)
    finally:
        subprocess.run(["ip", "netns", "delete", netns], capture_output=True, check=False)


def remade_with_the_same_inode(netns: str) -> None:
    """`netns` deleted and made again until the kernel hands the new
    namespace the old one's inode (it does once the old one is freed)."""
    inode = os.stat(NETNS_DIR / netns).st_ino
    for _ in range(50):
        delete_namespace(netns)
        time.sleep(0.1)  # the old namespace is freed after a grace period
        subprocess.run(["ip", "netns", "add", netns], check=True)
        if os.stat(NETNS_DIR / netns).st_ino == inode:
            return
    pytest.skip("the kernel gave no namespace the old one's inode again")


def test_a_namespace_made_again_on_the_old_inode_is_told_from_the_old_one(lab: Lab) -> None:
    """The netns source reads a deletion and a making again at once (as when
    the loop is busy or stopped) while the kernel gave the new namespace the
    old one's inode: its identity must still differ, or the new namespace
    would never get its guest side.  (A running tailsfwd holds a guest it
    follows until it has seen it go, so this is read from the source alone.)"""
    prefix = netns_prefix(lab) + "watch-"
    netns = prefix + "tbb"

    async def scenario() -> tuple[NetnsId, NetnsId]:
        events = NetnsWatch(NETNS_DIR, prefix).events()
        try:
            await asyncio.wait_for(anext(events), 5)  # none yet
            subprocess.run(["ip", "netns", "add", netns], check=True)
            made = await asyncio.wait_for(anext(events), 5)
            remade_with_the_same_inode(netns)  # the source reads none of it meanwhile
            again = await asyncio.wait_for(anext(events), 5)
            assert isinstance(made, NamespacesPresent) and isinstance(again, NamespacesPresent)
        finally:
            await events.aclose()  # type: ignore[attr-defined]
        return dict(made.namespaces)["tbb"], dict(again.namespaces)["tbb"]

    try:
        before, after = asyncio.run(scenario())
    finally:
        subprocess.run(["ip", "netns", "delete", netns], capture_output=True, check=False)
    assert before[:2] == after[:2] and before != after, (before, after)


def reported(status: dict[str, Any]) -> dict[str, list[Any]]:
    """The daemon's namespaces, as status.json has them."""
    return {n["name"]: [n["present"], n["in_force"], n["note"]] for n in status["namespaces"]}


def on_the_bus(bus: PrivateBus) -> list[list[Any]]:
    """The Namespaces property, read by `nobody` with busctl."""
    done = run([*AS_NOBODY, "busctl", f"--address={bus.address}", "--json=short",
                "get-property", service.BUS_NAME, service.OBJECT_PATH, service.INTERFACE,
                "Namespaces"])  # fmt: skip
    got = json.loads(done.stdout)
    assert got["type"] == "a(sbbs)", got
    return list(got["data"])


def test_status_verify_and_the_bus_list_the_namespaces_and_a_tampered_guest(
    lab: Lab, tmp_path: Path
) -> None:
    path = policies.lab_policy(lab, tmp_path / "policy.toml")
    namespaces = policy.load(path).namespaces
    remove_tailsfw_tables(lab.host_ns)
    where = ("--netns-prefix", netns_prefix(lab))
    with (
        private_system_bus() as bus,
        run_daemon(lab.host_ns, path, tmp_path / "d", [*where, "--bus", bus.address]) as daemon,
    ):
        daemon.wait_ready()

        def ctl(*args: str, nobody: bool = False) -> tuple[int, str]:
            done = tailsfwctl_in(lab.host_ns, *args, "--bus", bus.address, *where, nobody=nobody)
            assert "Traceback" not in done.stderr, done.stderr
            return done.returncode, done.stdout

        def status(nobody: bool = False) -> tuple[int, dict[str, Any]]:
            code, out = ctl("status", "--json", nobody=nobody)
            data: dict[str, Any] = json.loads(out)
            assert data["daemon"]["source"] == "D-Bus" and data["exit_status"] == code, data
            return code, data

        absent = {ns.name: [False, False, ""] for ns in namespaces}
        wait_for(lambda: reported(daemon.status()) == absent, 5.0, 0.05, what="all absent")
        with AppNamespaces(lab, namespaces) as apps:
            in_force = {ns.name: [True, True, ""] for ns in namespaces}
            daemon.wait_status(lambda s: reported(s) == in_force)
            wait_for(lambda: on_the_bus(bus) == [[n, *v] for n, v in in_force.items()],
                     5.0, 0.05, what="the Namespaces property")  # fmt: skip
            code, data = status()
            assert code == summary.OK, data
            assert {(g["name"], g["in_force"], g["source"]) for g in data["namespaces"]} == {
                (ns.name, True, "checked inside it") for ns in namespaces
            }
            assert ctl("verify", "--policy", str(path)) == (0, "")

            # Behind the daemon's back: one guest's anti-spoofing is put back at
            # once (its own notifications), another's setting is seen by a check.
            tbb, clearnet = apps.named("tbb"), apps.named("clearnet")
            apps.run_in(tbb, ["nft", "flush", "chain", "ip", "tailsfw", "postrouting"])
            apps.wait_guest(tbb)
            daemon.wait_status(lambda s: s["counters"]["guest_tamperings"] == 1)
            apps.run_in(clearnet, ["sysctl", "-q", "-w", "net.ipv4.conf.all.route_localnet=0"])
            code, data = status()
            assert code == summary.NOT_IN_FORCE, data
            assert data["summary"] == (
                "not the policy: the guest rules of namespace clearnet are not in force"
            )
            found = {g["name"]: g for g in data["namespaces"]}
            localnet = "setting net.ipv4.conf.all.route_localnet: is 0, the policy wants 1"
            assert found["clearnet"]["differences"] == [localnet]
            assert found["tbb"]["in_force"] and not found["tbb"]["differences"]
            code, text = ctl("status")
            assert "Namespace: clearnet: present, guest rules not in force: 1 difference" in text
            assert f"Differs: clearnet: {localnet}" in text
            # A guest's ruleset compared rule by rule: changed while tailsfwd
            # is stopped (it would put it back), read by root's verify alone.
            daemon.send(signal.SIGSTOP)
            try:
                apps.run_in(tbb, ["nft", "flush", "chain", "ip", "tailsfw", "postrouting"])
                done = tailsfwctl_in(lab.host_ns, "verify", "--policy", str(path),
                                     "--bus", "unix:path=/nonexistent", *where)  # fmt: skip
            finally:
                daemon.send(signal.SIGCONT)
            spoof = (
                "chain ip tailsfw postrouting: rule `meta oifname veth0 ip saddr != 10.200.1.2"
                ' counter drop comment "no spoofing"` (rule 1 of the policy) is missing from the'
                " kernel"
            )
            assert done.returncode == 1 and done.stdout.splitlines() == [
                f"namespace tbb: {spoof}",
                f"namespace clearnet: {localnet}",
            ], done
            apps.wait_guest(tbb)
            # A user asks the daemon, which reports what it put in force.
            code, data = status(nobody=True)
            assert {(g["name"], g["present"], g["source"]) for g in data["namespaces"]} == {
                (ns.name, True, "as tailsfwd reports") for ns in namespaces
            }
        # Gone: published at once, with nothing else changing.
        daemon.wait_status(lambda s: reported(s) == absent)
        wait_for(lambda: on_the_bus(bus) == [[n, *v] for n, v in absent.items()],
                 5.0, 0.05, what="the Namespaces property, all absent")  # fmt: skip
        code, text = ctl("status")
        assert code == summary.OK, text
        assert "Namespace: tbb: absent" in text
        done = tailsfwctl_in(lab.host_ns, "verify", "--policy", str(path), *where)
        assert (done.returncode, done.stdout) == (0, ""), done.stderr
        assert done.stderr.endswith(f"0 differences; absent: {', '.join(absent)}\n"), done.stderr
