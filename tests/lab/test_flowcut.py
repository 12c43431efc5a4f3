"""Flows cut when their permission goes (issue 15): a direct user's UDP
flow keeps sending across a reload that removes its port, and the peer
counts that nothing of it arrives after the commit (it did before)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab import policies
from tests.lab.command import PYTHON, netns_exec
from tests.lab.daemon_process import DaemonProcess, run_daemon
from tests.lab.test_daemon import sighup
from tests.lab.topology import INTERNET_V4, Lab
from tests.lab.wait import wait_for

pytestmark = pytest.mark.usefixtures("daemon_host")

PORT = 123  # a UDP port the peer answers on, granted to clearnet, then taken back
# One socket, one flow: a datagram every 10 ms; prints how many were tried.
SENDER = """
import socket, sys, time
end = time.monotonic() + float(sys.argv[3])
sent = 0
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.setblocking(False)
    s.bind(("0.0.0.0", 40123))
    while time.monotonic() < end:
        sent += 1
        try:
            s.sendto(b"still here?", (sys.argv[1], int(sys.argv[2])))
            s.recv(100)
        except OSError:
            pass
        time.sleep(0.01)
print(sent)
"""


def udp_ports(lab: Lab, path: Path, ports: list[int]) -> Path:
    def edit(data: dict[str, Any]) -> None:
        for rule in data["direct"]:
            if rule["user"] == "clearnet":
                rule["udp_ports"] = ports

    return policies.lab_policy(lab, path, edit)


@pytest.fixture
def daemon(lab: Lab, tmp_path: Path) -> Iterator[DaemonProcess]:
    policy = udp_ports(lab, tmp_path / "policy.toml", [53, PORT])
    with run_daemon(lab.host_ns, policy, tmp_path / "daemon") as started:
        started.wait_ready()
        yield started


def test_a_flow_whose_port_is_taken_back_stops_at_the_commit(
    lab: Lab, daemon: DaemonProcess, tmp_path: Path
) -> None:
    sender = subprocess.Popen(
        [*netns_exec(lab.host_ns), *lab.setpriv("clearnet"), PYTHON, "-c", SENDER,
         INTERNET_V4[0], str(PORT), "3"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        start = lab.peer_packets()
        wait_for(lambda: lab.peer_packets() - start > 20, 2, what="the flow reaching the peer")
        udp_ports(lab, tmp_path / "policy.toml", [53])
        sighup(daemon)
        time.sleep(0.3)  # the deletion runs beside the loop, right after the commit
        after = lab.peer_packets()
        time.sleep(1.0)
        arrived = lab.peer_packets() - after
    finally:
        out, _ = sender.communicate(timeout=30)
    assert int(out) > 150  # it kept trying all along
    assert arrived == 0, f"{arrived} packets of a forbidden flow reached the peer"
    assert "deleted 1 conntrack entries the new ruleset forbids" in daemon.log()
