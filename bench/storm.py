"""A storm of interfaces: how soon the LAN set is right, and what it costs.

In a namespace of its own (removed at the end), tailsfwd runs the shipped
policy in `lan.mode = "connected"`; another process (`ip -batch`) creates
STORM interfaces, each up with an address of its own network, as fast as it
can (tests/lab/storm.py).  Returns (bench/run.py prints and saves):

- storm_2000_settle_ms: from the end of the burst (the `ip -batch` process
  exited: every change was made) to the commit after which the kernel's LAN
  set holds every network (commits are timed by a thread that does nothing
  else; the set is checked once they pause);
- storm_2000_after_ms: an address added right after the burst, to the
  commit putting it in force;
- storm_2000_cpu_s: the daemon's CPU time (user + system) from the start of
  the burst to the settled set; storm_2000_rss_mb_peak: its peak resident
  memory (VmHWM) after it; storm_rss_mb_before: its memory before;
- storm_2000_removed_ms: all of them removed by one command (`ip link del
  group`, ~1 s itself), from its start to the commit after which the set is
  back to what it was.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.daemon import IF, namespace, write_policy
from tests.lab.daemon_process import DaemonProcess, run_daemon
from tests.lab.kernel import Changer, lan_networks
from tests.lab.monitors import CommitClock
from tests.lab.names import temp_prefix
from tests.lab.storm import (
    collapsed,
    cpu_seconds,
    peak_rss_mb,
    remove_storm,
    right_at,
    settled_at,
    storm,
    storm_network,
)

STORM = 2000
LIMIT = 30.0  # s: give up (and say so) after this


def measure_storm(ns: str, daemon: DaemonProcess, count: int) -> dict[str, float]:
    pid = daemon.process.pid
    base = collapsed(lan_networks(ns))
    expected = collapsed(base | {storm_network(i) for i in range(count)})
    rss_before = daemon.rss_mb()
    with CommitClock(ns) as clock:
        cpu_before = cpu_seconds(pid)
        burst_end = storm(ns, count)
        settled = settled_at(ns, clock, expected, LIMIT)
        cpu = cpu_seconds(pid) - cpu_before
        extra = storm_network(count)
        with Changer(ns) as changer:
            added = changer(f"addr add {extra[1]}/24 dev {IF}")
        seen = right_at(ns, clock, collapsed(expected | {extra}), 2.0)
        if seen is None:
            raise RuntimeError("the address added after the storm is not in force")
        removed = remove_storm(ns)
        back = settled_at(ns, clock, collapsed(base | {extra}), LIMIT)
    return {
        "settle_ms": (settled - burst_end) * 1000,
        "after_ms": (seen - added) * 1000,
        "removed_ms": (back - removed) * 1000,
        "cpu_s": cpu,
        "rss_peak": peak_rss_mb(pid),
        "rss_before": rss_before,
    }


def measure(count: int = STORM) -> dict[str, Any]:
    with namespace() as ns, tempfile.TemporaryDirectory(prefix=temp_prefix("bench-storm")) as tmp:
        work = Path(tmp)
        policy = write_policy(work / "policy.toml")
        with run_daemon(ns, policy, work / "run") as daemon:
            daemon.wait_ready()
            time.sleep(0.5)  # steady state
            figures = measure_storm(ns, daemon, count)
    return {
        f"storm_{count}_settle_ms": round(figures["settle_ms"], 1),
        f"storm_{count}_after_ms": round(figures["after_ms"], 1),
        f"storm_{count}_removed_ms": round(figures["removed_ms"], 1),
        f"storm_{count}_cpu_s": round(figures["cpu_s"], 2),
        f"storm_{count}_rss_mb_peak": round(figures["rss_peak"], 1),
        "storm_rss_mb_before": round(figures["rss_before"], 1),
    }


if __name__ == "__main__":
    for key, value in sorted(measure(int(sys.argv[1]) if sys.argv[1:] else STORM).items()):
        print(f"{key:<40} {value}")
