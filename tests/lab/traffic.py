"""Background leak attempts: users trying, over and over, what must fail."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from tests.lab.topology import PYTHON, Lab, netns_exec

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
