"""A storm of interfaces made by another process, and the daemon's cost.

Shared by tests/lab/test_storm.py and bench/storm.py.  The interfaces are
`ifb` devices (no dummy driver here; bridges take ~40 ms each to delete),
each up with an address of its own /24, all in one link group so that one
`ip link del group` removes them in a single batch.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import time
from pathlib import Path

from tests.lab.kernel import lan_networks
from tests.lab.monitors import CommitClock

GROUP = 4077
PREFIX = "tfwst"
TICKS = os.sysconf("SC_CLK_TCK")

Net = ipaddress.IPv4Network


def storm_network(i: int) -> Net:
    return Net(f"10.{100 + i // 256}.{i % 256}.0/24")


def storm_commands(count: int) -> list[str]:
    """`ip -batch` lines: `count` interfaces, each up with an address of its own network."""
    lines = []
    for i in range(count):
        name = f"{PREFIX}{i}"
        lines += [
            f"link add {name} group {GROUP} type ifb",
            f"addr add {storm_network(i)[1]}/24 dev {name}",
            f"link set {name} up",
        ]
    return lines


def storm(namespace: str, count: int) -> float:
    """Makes the storm with one `ip -batch`; the monotonic time it ended."""
    subprocess.run(
        ["ip", "-n", namespace, "-batch", "-"], input="\n".join(storm_commands(count)) + "\n",
        text=True, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return time.monotonic()


def remove_storm(namespace: str) -> float:
    """Removes every storm interface at once (one command, ~1 s for 2,000);
    the monotonic time it started."""
    start = time.monotonic()
    subprocess.run(
        ["ip", "-n", namespace, "link", "del", "group", str(GROUP)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return start


def collapsed(networks: set[Net]) -> set[Net]:
    return set(ipaddress.collapse_addresses(networks))


def settled_at(namespace: str, clock: CommitClock, expected: set[Net], limit: float) -> float:
    """The time of the last commit once the (collapsed) LAN set is `expected`,
    looked at whenever commits pause for 0.2 s; raises after `limit` seconds."""
    deadline = time.monotonic() + limit
    last = None
    while time.monotonic() < deadline:
        at = clock.next(0.2)
        if at is not None:
            last = at
        elif last is not None and collapsed(lan_networks(namespace)) == expected:
            return last
    raise AssertionError(
        f"the LAN set was not {sorted(map(str, expected))[:5]}... within {limit} s"
    )


def right_at(namespace: str, clock: CommitClock, expected: set[Net], limit: float) -> float | None:
    """The time of the first commit after which the (collapsed) LAN set is
    `expected`; None if none came within `limit` seconds.  Commits the storm
    still causes may come first (seen in CI: one 0.2 s after a pause)."""
    deadline = time.monotonic() + limit
    while (left := deadline - time.monotonic()) > 0:
        at = clock.next(left)
        if at is None:
            return None
        if collapsed(lan_networks(namespace)) == expected:
            return at
    return None


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")
