"""tailsfwd with everything running: its memory, and NetworkManager's DNS
servers to the clearnet file.

In a namespace of its own (removed at the end): python-dbusmock's
NetworkManager on a private bus (tests/lab/dbus_fixtures.py) given to
tailsfwd with `--nm-bus`, a private system bus (tests/lab/bus.py) on which
it offers its D-Bus service (`--bus`), its NFLOG audit and nftables monitor
(always on), the shipped policy in `lan.mode = "connected"`.  Returns
(bench/run.py prints and saves):

- daemon_rss_mb: the daemon's resident memory once started (1 s after
  READY, its service on the bus, the first servers written);
  daemon_rss_mb_after_dns: the same after the changes below;
- dns_update_ms_p50/p99: from the mock's PropertiesChanged (a new
  NameserverData; its arrival on a bus connection of the benchmark's own)
  to the clearnet file holding the new servers (inotify, read at once), over
  CHANGES changes.  The client's re-read, answered by the mock (a Python
  service, slower than NetworkManager), is inside.
"""

from __future__ import annotations

import ipaddress
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench.daemon import namespace, percentile, write_policy
from bench.nm import SignalClock, servers_for
from tailsfw.resolv import ResolvWatch, render_clearnet
from tests.lab.bus import PrivateBus, private_system_bus
from tests.lab.daemon_process import DaemonProcess, run_daemon
from tests.lab.dbus_fixtures import (
    IP4,
    EventLog,
    MockNetworkManager,
    mock_network_manager,
    nameserver_data,
    wait_for_name,
)
from tests.lab.names import temp_prefix
from tests.lab.wait import wait_for

CHANGES = 200
SERVICE = "org.boum.tails.Firewall"


class FileClock:
    """The text of a file each time it changes (inotify on its directory)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def events(self) -> AsyncIterator[str]:
        async for _ in ResolvWatch((self.path,)).events():
            try:
                yield self.path.read_text()
            except OSError:
                yield ""


def text_for(i: int) -> str:
    return render_clearnet([ipaddress.IPv4Address(a) for a in servers_for(i)])


def update_times(
    daemon: DaemonProcess, nm: MockNetworkManager, config: str, address: str
) -> list[float]:
    samples = []
    with (
        EventLog(FileClock(daemon.clearnet_conf)) as files,
        EventLog(SignalClock(address)) as signals,
    ):
        time.sleep(0.2)  # both are listening
        for i in range(1, CHANGES + 1):
            mark, signal_mark = files.mark(), signals.mark()
            nm.update(config, IP4, NameserverData=nameserver_data(*servers_for(i)))
            emitted = signals.timed(lambda t: True, timeout=2, since=signal_mark)
            expected = text_for(i)
            written = files.timed(expected.__eq__, timeout=2, since=mark)
            samples.append((written - emitted) * 1000)
    return samples


def measure() -> dict[str, Any]:
    with (
        namespace() as ns,
        tempfile.TemporaryDirectory(prefix=temp_prefix("bench-full")) as tmp,
        PrivateBus(Path(tmp) / "nm-bus", namespace=ns) as nm_bus,
        mock_network_manager(nm_bus) as nm,
        private_system_bus() as system_bus,
    ):
        nm.start()
        config = nm.serve("eth0", *servers_for(0))
        policy = write_policy(Path(tmp) / "policy.toml")
        args = ["--nm-bus", nm_bus.address, "--bus", system_bus.address]
        with run_daemon(ns, policy, Path(tmp) / "run", args) as daemon:
            daemon.wait_ready()
            wait_for_name(system_bus, SERVICE, present=True)
            wait_for(
                lambda: daemon.clearnet_conf.exists()
                and daemon.clearnet_conf.read_text() == text_for(0),
                10, 0.01, what="the first servers written", why=daemon.log,
            )  # fmt: skip
            time.sleep(1.0)  # steady state: the start's garbage is collected
            rss = daemon.rss_mb()
            samples = update_times(daemon, nm, config, nm_bus.address)
            rss_after = daemon.rss_mb()
    return {
        "daemon_rss_mb": round(rss, 1),
        "daemon_rss_mb_after_dns": round(rss_after, 1),
        "dns_update_ms_p50": round(statistics.median(samples), 2),
        "dns_update_ms_p99": round(percentile(samples, 99), 2),
        "dns_update_changes": len(samples),
    }


if __name__ == "__main__":
    for key, value in sorted(measure().items()):
        print(f"{key:<40} {value}")
