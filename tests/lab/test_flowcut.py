"""Flows cut when their permission goes (issue 15): a flow keeps sending
across the change that forbids it (a reload that takes a direct user's UDP
port or its TCP back; an on-link LAN gone in `connected` mode), and the
peer counts that nothing of it arrives after the commit (it did before)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.lab import policies
from tests.lab.command import PYTHON, netns_exec
from tests.lab.daemon_process import DaemonProcess, run_daemon
from tests.lab.kernel import lan_networks
from tests.lab.networkmanager import NetworkManagerLab
from tests.lab.test_daemon import NEW_IF, NEW_LAN, lab_policy, new_lan_peer, sighup
from tests.lab.test_daemon_nm import nm_mode_daemon
from tests.lab.topology import HOST_V4, INTERNET_V4, Lab, stop_process, wait_ready
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
    s.bind((sys.argv[4], 40123))
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
SINK_PORT = 5001  # the peer's TCP sink, on INTERNET_V4[0]
# One connection, one flow: 1,000 bytes every 10 ms (what the socket takes).
TCP_SENDER = """
import socket, sys, time
end = time.monotonic() + float(sys.argv[3])
sent = 0
with socket.socket() as s:
    s.settimeout(5)
    s.connect((sys.argv[1], int(sys.argv[2])))
    s.setblocking(False)
    while time.monotonic() < end:
        sent += 1
        try:
            s.send(b"x" * 1000)
        except OSError:
            pass
        time.sleep(0.01)
print(sent)
"""
# Reads every connection to the end, counting the bytes; a line on its
# standard input asks for the count so far (on lo no interface counts for
# the test; on lan0 the peer's ingress counter does).
SINK = """
import socket, sys, threading
listener = socket.create_server((sys.argv[1], int(sys.argv[2])))
received = [0]
print("ready", flush=True)
def drain(conn):
    with conn:
        while data := conn.recv(65536):
            received[0] += len(data)
def serve():
    while True:
        threading.Thread(target=drain, args=(listener.accept()[0],), daemon=True).start()
threading.Thread(target=serve, daemon=True).start()
for _ in sys.stdin:
    print(received[0], flush=True)
"""


def clearnet_direct(lab: Lab, path: Path, user: str = "clearnet", **values: Any) -> Path:
    """The shipped policy, with `user`'s [[direct]] entry changed."""

    def edit(data: dict[str, Any]) -> None:
        for rule in data["direct"]:
            if rule["user"] == user:
                rule.update(values)

    return policies.lab_policy(lab, path, edit)


@pytest.fixture
def daemon(lab: Lab, tmp_path: Path) -> Iterator[DaemonProcess]:
    policy = clearnet_direct(lab, tmp_path / "policy.toml", udp_ports=[53, PORT])
    with run_daemon(lab.host_ns, policy, tmp_path / "daemon") as started:
        started.wait_ready()
        yield started


@contextmanager
def sending(
    lab: Lab,
    role: str,
    to: tuple[str, int],
    source: str = "0.0.0.0",
    script: str = SENDER,
    seconds: int = 3,
) -> Iterator[None]:
    """`role` sends one flow (UDP, or TCP with TCP_SENDER) to `to` for
    `seconds`; it kept trying all along."""
    sender = subprocess.Popen(
        [*netns_exec(lab.host_ns), *lab.setpriv(role), PYTHON, "-c", script,
         to[0], str(to[1]), str(seconds), source],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        yield
    finally:
        out, err = sender.communicate(timeout=30)
    assert out.strip().isdigit() and int(out) > 50 * seconds, (out, err)


@contextmanager
def sink(netns: str, address: str) -> Iterator[subprocess.Popen[str]]:
    """A TCP sink at `address`:SINK_PORT in `netns` (SINK)."""
    process = subprocess.Popen(
        [*netns_exec(netns), PYTHON, "-c", SINK, address, str(SINK_PORT)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_ready([process], timeout=10)
        yield process
    finally:
        stop_process(process)


def received(process: subprocess.Popen[str]) -> int:
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write("?\n")
    process.stdin.flush()
    return int(process.stdout.readline())


@pytest.fixture
def tcp_sink(lab: Lab) -> Iterator[tuple[str, int]]:
    """The peer reads TCP streams at INTERNET_V4[0]:SINK_PORT."""
    with sink(lab.peer_ns, INTERNET_V4[0]):
        yield INTERNET_V4[0], SINK_PORT


def wait_arriving(lab: Lab) -> None:
    start = lab.peer_packets()
    wait_for(lambda: lab.peer_packets() - start > 20, 2, what="the flow reaching the peer")


def arriving_after_commit(lab: Lab) -> int:
    """What reaches the peer's lan0 in the second after the commit."""
    time.sleep(0.3)  # the deletion runs beside the loop, right after the commit
    after = lab.peer_packets()
    time.sleep(1.0)
    return lab.peer_packets() - after


def test_a_flow_whose_port_is_taken_back_stops_at_the_commit(
    lab: Lab, daemon: DaemonProcess, tmp_path: Path
) -> None:
    with sending(lab, "clearnet", (INTERNET_V4[0], PORT)):
        wait_arriving(lab)
        clearnet_direct(lab, tmp_path / "policy.toml", udp_ports=[53])
        sighup(daemon)
        arrived = arriving_after_commit(lab)
    assert arrived == 0, f"{arrived} packets of a forbidden flow reached the peer"
    assert "deleted 1 conntrack entries the new ruleset forbids" in daemon.log()


@pytest.fixture
def connected_daemon(lab: Lab, tmp_path: Path) -> Iterator[DaemonProcess]:
    policy = lab_policy(lab, tmp_path / "policy.toml")
    with run_daemon(lab.host_ns, policy, tmp_path / "daemon") as started:
        started.wait_ready()
        yield started


@pytest.fixture
def new_lan(lab: Lab) -> Iterator[None]:
    """A second LAN, where the peer answers UDP 5000; its address is the
    peer's too, reachable through the gateway."""
    with new_lan_peer(lab, "--udp", f"{NEW_LAN[1]}:5000"):
        lab.host(["ip", "link", "set", NEW_IF, "up"])
        yield


def test_a_flow_to_an_on_link_lan_gone_stops_at_the_commit(
    lab: Lab, connected_daemon: DaemonProcess, new_lan: None
) -> None:
    """From the host's own address, so that the flow stays one flow once the
    LAN's address goes; it then leaves through the gateway, counted there."""
    lab.host(["ip", "addr", "add", f"{NEW_LAN[2]}/24", "dev", NEW_IF])
    wait_for(lambda: NEW_LAN in lan_networks(lab.host_ns), 2, what="the new LAN in force")
    with sending(lab, "amnesia", (str(NEW_LAN[1]), 5000), HOST_V4):
        time.sleep(0.3)
        commits = connected_daemon.commits()
        lab.host(["ip", "addr", "del", f"{NEW_LAN[2]}/24", "dev", NEW_IF])
        wait_for(lambda: connected_daemon.commits() > commits, 2, what="the commit")
        arrived = arriving_after_commit(lab)
    assert arrived == 0, f"{arrived} packets of a forbidden flow reached the peer"
    assert f"LAN network {NEW_LAN} gone" in connected_daemon.log()


def test_a_tcp_flow_whose_user_loses_direct_tcp_stops_at_the_commit(
    lab: Lab, daemon: DaemonProcess, tmp_path: Path, tcp_sink: tuple[str, int]
) -> None:
    """clearnet streams to the Internet; a reload takes its TCP away: the
    ruleset refuses the flow's next packet, and its entry is deleted."""
    with sending(lab, "clearnet", tcp_sink, script=TCP_SENDER):
        wait_arriving(lab)
        clearnet_direct(lab, tmp_path / "policy.toml", udp_ports=[53, PORT], tcp="none")
        sighup(daemon)
        arrived = arriving_after_commit(lab)
    assert arrived == 0, f"{arrived} packets of a forbidden flow reached the peer"
    uid = lab.account("clearnet").uid
    deleted = f"deleted 1 conntrack entries the new ruleset forbids: uid {uid} lost direct TCP"
    assert deleted in daemon.log()


def test_the_ruleset_alone_refuses_a_tcp_flow_whose_user_lost_direct_tcp(
    lab: Lab, tmp_path: Path, tcp_sink: tuple[str, int]
) -> None:
    """`tailsfwctl apply` deletes no conntrack entry: the marked flow meets
    the new ruleset's refusal in the transaction that takes TCP away."""
    policy = clearnet_direct(lab, tmp_path / "policy.toml")
    assert policies.apply(lab, policy).returncode == 0
    with sending(lab, "clearnet", tcp_sink, script=TCP_SENDER):
        wait_arriving(lab)
        done = policies.apply(lab, clearnet_direct(lab, policy, tcp="none"))
        assert done.returncode == 0, done.stderr
        arrived = arriving_after_commit(lab)
    assert arrived == 0, f"{arrived} packets of a forbidden flow reached the peer"


def test_a_dns_flow_to_a_server_networkmanager_no_longer_gives_stops(
    lab: Lab, nm_lab: NetworkManagerLab, tmp_path: Path
) -> None:
    """`dns.clearnet = "nm"`: clearnet's DNS flow to the leased server goes
    on until a new lease names another server (a set-only commit), then
    nothing of it reaches the peer."""
    leased, other = INTERNET_V4  # both listen on port 53 in the peer
    with nm_mode_daemon(lab, nm_lab, tmp_path, leased) as daemon:
        with sending(lab, "clearnet", (leased, 53), seconds=10):
            wait_arriving(lab)
            nm_lab.lease([other])
            daemon.wait_status(lambda s: s["clearnet_dns"] == [other], 8)
            arrived = arriving_after_commit(lab)
        log = daemon.log()
    assert arrived == 0, f"{arrived} packets of a forbidden flow reached the peer"
    uid = lab.account("clearnet").uid
    assert f"DNS server {leased} no longer NetworkManager's: uid {uid}" in log


def test_a_loopback_flow_whose_user_loses_loopback_stops_at_the_commit(
    lab: Lab, tmp_path: Path
) -> None:
    """Tor (`loopback = true`) streams to a local port no [[local]] rule
    names, so its direct rules accept and mark it; a reload sets its
    `loopback = false`: nothing more reaches the local server."""
    policy = clearnet_direct(lab, tmp_path / "policy.toml", "debian-tor", loopback=True)
    with (
        run_daemon(lab.host_ns, policy, tmp_path / "daemon") as daemon,
        sink(lab.host_ns, "127.0.0.1") as local,
    ):
        daemon.wait_ready()
        with sending(lab, "debian-tor", ("127.0.0.1", SINK_PORT), script=TCP_SENDER):
            wait_for(lambda: received(local) > 20_000, 2, what="the flow reaching the server")
            clearnet_direct(lab, policy, "debian-tor", loopback=False)
            sighup(daemon)
            time.sleep(0.3)  # the commit, and the deletion beside the loop
            before = received(local)
            time.sleep(1.0)
            arrived = received(local) - before
    assert arrived == 0, f"{arrived} bytes of a forbidden flow reached the local server"
    uid = lab.account("debian-tor").uid
    assert f"deleted 1 conntrack entries the new ruleset forbids: uid {uid} lost loopback" in (
        daemon.log()
    )
