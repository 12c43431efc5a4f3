"""The NetworkManager client's reaction time and memory, against python-dbusmock.

A private dbus-daemon and the mock run in a namespace of their own (deleted
at the end); the client runs here, as tailsfwd would.  Returns (bench/run.py
prints and saves):

- nm_event_ms_p50/p99: from the mock's PropertiesChanged (a new
  NameserverData; its arrival on a bus connection of the benchmark's own) to
  the DnsServers event with the new list, over CHANGES changes.  The
  client's full re-read is inside, answered by the mock (a Python service,
  slower than NetworkManager);
- nm_client_rss_mb: what importing and running the client adds to a Python
  process that already has tailsfw.events (and so pyroute2, as tailsfwd
  has), measured in a child process after its first read, and again after
  CHANGES changes.

`python -m bench.nm --rss ADDRESS CONFIG` is that child.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench.daemon import percentile
from tailsfw.events import DnsServers
from tests.lab.bus import PrivateBus
from tests.lab.dbus_fixtures import (
    IP4,
    EventLog,
    MockNetworkManager,
    mock_network_manager,
    nameserver_data,
)
from tests.lab.names import temp_prefix
from tests.lab.netns import scratch_namespace

CHANGES = 300


def servers_for(i: int) -> list[str]:
    return [f"10.{i // 250}.{i % 250}.1", "192.0.2.53"]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class SignalClock:
    """The arrival time of each PropertiesChanged NetworkManager sends, on a
    bus connection of its own: it stands for the emission's time."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def events(self) -> AsyncIterator[float]:
        from dbus_fast import Message
        from dbus_fast.aio import MessageBus

        from tailsfw.nm import PROPERTIES_RULE

        bus = await MessageBus(bus_address=self.address).connect()
        times: asyncio.Queue[float] = asyncio.Queue()

        def on_message(msg: Message) -> None:
            if msg.member == "PropertiesChanged":
                times.put_nowait(time.monotonic())

        bus.add_message_handler(on_message)
        rule = Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="AddMatch", signature="s",
            body=[PROPERTIES_RULE],
        )  # fmt: skip
        await bus.call(rule)
        try:
            while True:
                yield await times.get()
        finally:
            bus.disconnect()


def latencies(nm: MockNetworkManager, config: str, address: str) -> list[float]:
    """From each PropertiesChanged to the DnsServers event with the new list (ms)."""
    from tailsfw.nm import NetworkManagerSource

    samples: list[float] = []
    with (
        EventLog(NetworkManagerSource(address)) as log,
        EventLog(SignalClock(address)) as signals,
    ):
        log.wait(lambda e: e.available and len(e.servers) == 1)
        for i in range(CHANGES):
            expected = tuple(ipaddress.IPv4Address(a) for a in servers_for(i))

            def arrived_with(event: DnsServers, expected: tuple[Any, ...] = expected) -> bool:
                return event.servers == expected

            mark, signal_mark = log.mark(), signals.mark()
            nm.update(config, IP4, NameserverData=nameserver_data(*servers_for(i)))
            emitted = signals.wait(lambda t: True, timeout=2, since=signal_mark)
            arrived = log.timed(arrived_with, timeout=2, since=mark)
            samples.append((arrived - emitted) * 1000)
    return samples


async def child_rss(address: str, config: str) -> dict[str, float]:
    """In a fresh process: memory before the client, after its first read,
    and after CHANGES changes made by a second connection of its own."""
    # tailsfw.events (and so netlink and pyroute2) is already imported: tailsfwd has them anyway.
    before = rss_mb()
    # Imported here, not above: they are what is measured.
    from dbus_fast import Message, Variant
    from dbus_fast.aio import MessageBus

    from tailsfw.nm import NetworkManagerSource

    source = NetworkManagerSource(address)
    events = source.events()
    while not (await anext(events)).servers:
        pass
    first = rss_mb()
    control = await MessageBus(bus_address=address).connect()
    for i in range(CHANGES):
        entries = [{"address": Variant("s", a)} for a in servers_for(i)]
        await control.call(
            Message(
                destination="org.freedesktop.NetworkManager", path=config,
                interface="org.freedesktop.DBus.Properties", member="Set", signature="ssv",
                body=[IP4, "NameserverData", Variant("aa{sv}", entries)],
            )
        )  # fmt: skip
        await anext(events)
    after = rss_mb()
    await events.aclose()
    control.disconnect()
    return {"first": first - before, "after": after - before}


def measure() -> dict[str, Any]:
    with (
        scratch_namespace() as namespace,
        tempfile.TemporaryDirectory(prefix=temp_prefix("bench-nm")) as tmp,
        PrivateBus(Path(tmp), namespace=namespace) as bus,
        mock_network_manager(bus) as nm,
    ):
        nm.start()
        config = nm.serve("eth0", "192.0.2.1")
        samples = latencies(nm, config, bus.address)
        done = subprocess.run(
            [sys.executable, "-m", "bench.nm", "--rss", bus.address, config],
            capture_output=True, text=True, check=True, timeout=120,
        )  # fmt: skip
        rss = json.loads(done.stdout)
    return {
        "nm_event_ms_p50": round(statistics.median(samples), 2),
        "nm_event_ms_p99": round(percentile(samples, 99), 2),
        "nm_event_changes": len(samples),
        "nm_client_rss_mb": round(rss["first"], 1),
        "nm_client_rss_mb_after_changes": round(rss["after"], 1),
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rss"]:
        print(json.dumps(asyncio.run(child_rss(sys.argv[2], sys.argv[3]))))
    else:
        print(json.dumps(measure(), indent=2))
