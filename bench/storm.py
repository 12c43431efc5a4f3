"""A storm of interfaces: how soon the LAN set is right, and what it costs.

In a namespace of its own (removed at the end), tailsfwd runs the shipped
policy in `lan.mode = "connected"`; another process (`ip -batch`) creates
STORM bridges, each with an address of its own network and up, as fast as
it can.  Returns (bench/run.py prints and saves):

- storm_2000_settle_ms: from the end of the burst (the `ip -batch` process
  exited: every change was made) to the commit after which the kernel's LAN
  set holds every network (the commit is timed by a thread that does
  nothing else; the set is checked after it);
- storm_2000_after_ms: an address added right after the burst, to the
  commit putting it in force;
- storm_2000_cpu_s: the daemon's CPU time (user + system) from the start of
  the burst to the settled set; storm_2000_rss_mb_peak: its peak resident
  memory (VmHWM) after it, and storm_rss_mb_before: its memory before.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.daemon import IF, namespace, write_policy
from tests.lab.daemon_fixtures import (
    Changer,
    CommitClock,
    DaemonProcess,
    lan_networks,
    run_daemon,
)

STORM = 2000
SETTLE_LIMIT = 30.0  # s: give up (and say so) after this
TICKS = os.sysconf("SC_CLK_TCK")


def storm_network(i: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"10.{100 + i // 256}.{i % 256}.0/24")


def storm_commands(count: int, prefix: str = "tfws") -> list[str]:
    """`ip -batch` lines: `count` bridges, each up with an address of its own network."""
    lines = []
    for i in range(count):
        name = f"{prefix}{i}"
        lines += [
            f"link add {name} type bridge",
            f"addr add {storm_network(i)[1]}/24 dev {name}",
            f"link set {name} up",
        ]
    return lines


def remove_commands(count: int, prefix: str = "tfws") -> list[str]:
    return [f"link del {prefix}{i}" for i in range(count)]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def collapsed(networks: set[ipaddress.IPv4Network]) -> set[ipaddress.IPv4Network]:
    return set(ipaddress.collapse_addresses(networks))


def settle(ns: str, clock: CommitClock, expected: set[ipaddress.IPv4Network]) -> float:
    """The time of the commit after which the LAN set is `expected`."""
    deadline = time.monotonic() + SETTLE_LIMIT
    last = None
    while time.monotonic() < deadline:
        at = clock.next(0.2)
        if at is not None:
            last = at
            continue  # check only once the commits pause
        if last is not None and collapsed(lan_networks(ns)) == expected:
            return last
    raise RuntimeError(f"the LAN set was not right within {SETTLE_LIMIT} s")


def storm(ns: str, daemon: DaemonProcess, count: int) -> dict[str, float]:
    pid = daemon.process.pid
    base = lan_networks(ns)
    expected = collapsed(base | {storm_network(i) for i in range(count)})
    rss_before = daemon.rss_mb()
    with CommitClock(ns) as clock:
        cpu_before = cpu_seconds(pid)
        subprocess.run(
            ["ip", "-n", ns, "-batch", "-"], input="\n".join(storm_commands(count)) + "\n",
            text=True, check=True, capture_output=True,
        )  # fmt: skip
        burst_end = time.monotonic()
        settled = settle(ns, clock, expected)
        cpu = cpu_seconds(pid) - cpu_before
        extra = storm_network(count)
        with Changer(ns) as changer:
            added = changer(f"addr add {extra[1]}/24 dev {IF}")
        seen = clock.next(2.0)
        if seen is None or collapsed(lan_networks(ns)) != collapsed(expected | {extra}):
            raise RuntimeError("the address added after the storm is not in force")
    return {
        "settle_ms": (settled - burst_end) * 1000,
        "after_ms": (seen - added) * 1000,
        "cpu_s": cpu,
        "rss_peak": peak_rss_mb(pid),
        "rss_before": rss_before,
    }


def measure(count: int = STORM) -> dict[str, Any]:
    with namespace() as ns, tempfile.TemporaryDirectory(prefix="tfwstorm") as tmp:
        work = Path(tmp)
        policy = write_policy(work / "policy.toml")
        with run_daemon(ns, policy, work / "run") as daemon:
            daemon.wait_ready()
            figures = storm(ns, daemon, count)
    return {
        f"storm_{count}_settle_ms": round(figures["settle_ms"], 1),
        f"storm_{count}_after_ms": round(figures["after_ms"], 1),
        f"storm_{count}_cpu_s": round(figures["cpu_s"], 2),
        f"storm_{count}_rss_mb_peak": round(figures["rss_peak"], 1),
        "storm_rss_mb_before": round(figures["rss_before"], 1),
    }


if __name__ == "__main__":
    import sys

    for key, value in sorted(measure(int(sys.argv[1]) if sys.argv[1:] else STORM).items()):
        print(f"{key:<40} {value}")
