"""Traffic for the lab: background leak attempts (users trying, over and over,
what must fail) and a late answer that makes the host send RELATED ICMP."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from tests.lab.command import PYTHON, LabError, netns_exec
from tests.lab.topology import Lab

# TCP and UDP to the Internet and to the LAN resolver, each attempt from a
# fresh socket; prints "attempts connected".
SCRIPT = """
import socket, sys, time
end = time.monotonic() + float(sys.argv[1])
attempts = through = 0
while time.monotonic() < end:
    for dst in (("198.51.100.10", 443), ("203.0.113.10", 80), ("192.168.77.1", 53)):
        attempts += 1
        with socket.socket() as t:
            t.settimeout(0.05)
            through += t.connect_ex(dst) == 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.sendto(b"leak?", dst)
            except OSError:
                pass
print(attempts, through)
"""


@dataclass
class Attempts:
    """Filled in when the `leak_attempts` block ends."""

    attempts: list[int]
    connected: list[int]


@contextmanager
def leak_attempts(
    lab: Lab, seconds: float, roles: Sequence[str] = ("amnesia", "root", "other")
) -> Iterator[Attempts]:
    """Runs the attempts as each role during the block; waits for them at its end."""
    processes = [
        subprocess.Popen(
            [*netns_exec(lab.host_ns), *lab.setpriv(role), PYTHON, "-c", SCRIPT, str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for role in roles
    ]
    result = Attempts([], [])
    try:
        yield result
    finally:
        for p in processes:
            out, _ = p.communicate(timeout=seconds + 30)
            attempts, connected = out.split()
            result.attempts.append(int(attempts))
            result.connected.append(int(connected))


# Sends one datagram from a fixed port, then closes the socket.
SEND_AND_CLOSE = """
import socket, sys
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[3])))
    s.sendto(b"query", (sys.argv[1], int(sys.argv[2])))
"""
# The "answer", from the address and port the query went to.
ANSWER = """
import socket, sys
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2])))
    s.sendto(b"late answer", (sys.argv[3], int(sys.argv[4])))
"""


def late_answer(lab: Lab, role: str, server: str, server_port: int, host: str, port: int) -> int:
    """The role sends a datagram from `port` and closes the socket; `server`
    (the peer) then answers from `server_port`.  The host has no socket left:
    it answers with an ICMP port unreachable, RELATED to the flow.  Returns
    the packets that reached the peer from the host after the answer."""
    sent = lab.run_as(role, [PYTHON, "-c", SEND_AND_CLOSE, server, str(server_port), str(port)])
    if sent.returncode != 0:
        raise LabError(f"the query as {role} failed: {sent.stderr.strip()}")
    before = lab.peer_packets()
    lab.peer([PYTHON, "-c", ANSWER, server, str(server_port), host, str(port)])
    time.sleep(0.1)  # the ICMP error, if any, is sent at once
    return lab.peer_packets() - before
