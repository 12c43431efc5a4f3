"""A storm of 2,000 interfaces in the lab host, with tailsfwd running (issue 8).

Another process creates 2,000 interfaces, each up with an address of its own
network (`lan.mode = "connected"`), as fast as `ip -batch` goes, while the
lab's users try to reach the Internet and the LAN resolver over and over:

- the LAN set in force is exactly right within 1 s of the last change, and
  an address added right after it within 20 ms plus one commit (a bound
  for the test; bench/storm.py measures);
- removing them all at once brings the set back, within 1 s too;
- nothing reaches the peer meanwhile, and the daemon's CPU time and peak
  memory stay bounded (printed).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab import policies
from tests.lab.daemon_process import DaemonProcess, run_daemon
from tests.lab.kernel import Changer, lan_networks
from tests.lab.monitors import CommitClock
from tests.lab.storm import (
    GROUP,
    collapsed,
    cpu_seconds,
    peak_rss_mb,
    remove_storm,
    right_at,
    settled_at,
    storm,
    storm_network,
)
from tests.lab.topology import HOST_IF, INTERNET_V4, Lab
from tests.lab.traffic import leak_attempts

pytestmark = pytest.mark.usefixtures("daemon_host")

STORM = 2000
SETTLE_LIMIT = 1.0  # s, from the last change to the commit that makes the set right
AFTER_LIMIT = 0.200  # s, an address added after the storm (20 ms plus one commit)
CPU_LIMIT = 4.0  # s of the daemon's CPU for the whole storm (1.2 s measured)
RSS_LIMIT = 150.0  # MB, the daemon's peak (33 before, 50-97 after: C-side, see benchmarks.md)
EXTRA = storm_network(STORM)


@pytest.fixture
def daemon(lab: Lab, tmp_path: Path) -> Iterator[DaemonProcess]:
    def edit(data: dict[str, Any]) -> None:
        data["lan"]["mode"] = "connected"

    policy = policies.lab_policy(lab, tmp_path / "policy.toml", edit)
    try:
        with run_daemon(lab.host_ns, policy, tmp_path / "daemon") as started:
            started.wait_ready()
            yield started
    finally:
        # Whatever is left of the storm, whatever failed.
        lab.host(["sh", "-c", f"ip link del group {GROUP} 2>/dev/null; true"])
        lab.host(["ip", "addr", "flush", "dev", HOST_IF, "to", str(EXTRA)])


def test_a_storm_of_2000_interfaces_is_in_force_within_a_second(
    lab: Lab, daemon: DaemonProcess
) -> None:
    pid = daemon.process.pid
    base = collapsed(lan_networks(lab.host_ns))
    with_storm = collapsed(base | {storm_network(i) for i in range(STORM)})
    before = lab.peer_packets()
    with leak_attempts(lab, 6.0) as tried, CommitClock(lab.host_ns) as clock:
        time.sleep(0.3)  # the attempts are running
        cpu = cpu_seconds(pid)
        burst_end = storm(lab.host_ns, STORM)
        settled = settled_at(lab.host_ns, clock, with_storm, 10.0)
        cpu = cpu_seconds(pid) - cpu
        with Changer(lab.host_ns) as changer:
            added = changer(f"addr add {EXTRA[1]}/24 dev {HOST_IF}")
        committed = right_at(lab.host_ns, clock, collapsed(with_storm | {EXTRA}), 2.0)
        assert committed is not None, "the address added after the storm is not in force"
        removed = remove_storm(lab.host_ns)
        removal_end = time.monotonic()
        back = settled_at(lab.host_ns, clock, collapsed(base | {EXTRA}), 10.0)
        probe = lab.probe("amnesia", "tcp", 4, INTERNET_V4[0], 443)
    rss = peak_rss_mb(pid)
    print(
        f"storm of {STORM}: in force {(settled - burst_end) * 1000:.0f} ms after the last change, "
        f"{cpu:.2f} s of CPU, peak {rss:.0f} MB; one more address "
        f"{(committed - added) * 1000:.1f} ms; all removed: in force after "
        f"{(back - removed) * 1000:.0f} ms",
        file=sys.stderr,
    )
    assert settled - burst_end <= SETTLE_LIMIT
    assert committed - added <= AFTER_LIMIT
    assert back - removal_end <= SETTLE_LIMIT
    assert cpu <= CPU_LIMIT and rss <= RSS_LIMIT
    # Nothing gets out; right after 2,000 links went, the kernel (RTNL) may
    # still be busy enough that the refusal comes late (seen once in CI:
    # a 1 s timeout, nothing sent); the matrix checks refusals are fast.
    assert probe.result in ("refused", "timeout") and probe.arrived == 0, probe
    assert tried.connected == [0, 0, 0] and min(tried.attempts) > 20
    assert lab.peer_packets() - before == 0
    assert daemon.status()["netlink_reads"] == 1  # no event was lost
