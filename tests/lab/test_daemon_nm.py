"""tailsfwd with a real NetworkManager (tests/lab/networkmanager.py): the
clearnet resolv file follows the leases, in place; resolv.conf stays on Tor's
DNS whatever another process does to it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.lab.daemon_process import DaemonProcess, run_daemon
from tests.lab.networkmanager import LEASED, NetworkManagerLab
from tests.lab.policies import lab_policy
from tests.lab.topology import INTERNET_V4, Lab
from tests.lab.wait import wait_for

TOR_DNS = "nameserver 127.0.0.1\n"
pytestmark = pytest.mark.usefixtures("daemon_host")


def nameservers(*servers: str) -> str:
    return "".join(f"nameserver {s}\n" for s in servers)


def text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


@pytest.fixture
def daemon(lab: Lab, nm_lab: NetworkManagerLab, tmp_path: Path) -> Iterator[DaemonProcess]:
    policy = lab_policy(lab, tmp_path / "policy.toml")
    args = ["--nm-bus", nm_lab.bus.address]
    with run_daemon(lab.host_ns, policy, tmp_path / "d", args) as started:
        started.wait_ready()
        yield started


def test_the_clearnet_file_follows_the_leases_in_place(
    daemon: DaemonProcess, nm_lab: NetworkManagerLab
) -> None:
    clearnet = daemon.clearnet_conf
    wait_for(lambda: text(clearnet) == nameservers(*LEASED), 15)
    assert text(daemon.resolv_conf) == TOR_DNS
    inode = clearnet.stat().st_ino
    daemon.wait_status(lambda s: s["clearnet_dns"] == list(LEASED))

    nm_lab.lease(["203.0.113.54"])
    wait_for(lambda: text(clearnet) == nameservers("203.0.113.54"), 15)
    assert clearnet.stat().st_ino == inode

    nm_lab.lease(LEASED)  # as the module's other tests expect it
    wait_for(lambda: text(clearnet) == nameservers(*LEASED), 15)


def test_resolv_conf_is_restored_within_100_ms(daemon: DaemonProcess) -> None:
    resolv = daemon.resolv_conf
    wait_for(lambda: text(resolv) == TOR_DNS, 5)
    times = []
    for tamper in ("edit", "rename", "delete"):
        if tamper == "edit":
            resolv.write_text("nameserver 192.168.77.1\n")
        elif tamper == "rename":
            other = resolv.with_name("resolv.conf.new")
            other.write_text("nameserver 192.168.77.1\n")
            os.replace(other, resolv)
        else:
            resolv.unlink()
        times.append(wait_for(lambda: text(resolv) == TOR_DNS, 1.0))
    assert max(times) < 0.100, times
    daemon.wait_status(lambda s: s["counters"]["files_rewritten"] >= 4)
    assert "changed by another process" in daemon.log()


@contextmanager
def nm_mode_daemon(
    lab: Lab, nm_lab: NetworkManagerLab, workdir: Path, leased: str
) -> Iterator[DaemonProcess]:
    """tailsfwd with `dns.clearnet = "nm"`, NetworkManager leasing `leased`
    alone (in force when it is yielded); the module's lease back after."""

    def nm_mode(data: dict[str, Any]) -> None:
        data["dns"]["clearnet"] = "nm"

    policy = lab_policy(lab, workdir / "policy.toml", nm_mode)
    nm_lab.lease([leased])
    try:
        args = ["--nm-bus", nm_lab.bus.address]
        with run_daemon(lab.host_ns, policy, workdir / "d", args) as daemon:
            daemon.wait_ready()
            daemon.wait_status(lambda s: s["clearnet_dns"] == [leased], 15)
            yield daemon
    finally:
        nm_lab.lease(LEASED)


def test_nm_mode_lets_clearnet_reach_only_the_leased_server(
    lab: Lab, nm_lab: NetworkManagerLab, tmp_path: Path
) -> None:
    """`dns.clearnet = "nm"`: the clearnet user's DNS goes to the server the
    lease gave, not to another one (the peer counts what arrives)."""
    leased, other = INTERNET_V4  # both listen on port 53 in the peer
    with nm_mode_daemon(lab, nm_lab, tmp_path, leased):
        for proto in ("udp", "tcp"):
            probe = lab.probe("clearnet", proto, 4, leased, 53)
            assert (probe.result, probe.arrived > 0) == ("open", True), probe
            probe = lab.probe("clearnet", proto, 4, other, 53)
            assert (probe.result, probe.arrived) == ("refused", 0), probe
        # Not a DNS server: port 443 is still the clearnet user's.
        assert lab.probe("clearnet", "tcp", 4, other, 443).result == "open"
