"""NetworkManagerSource against python-dbusmock's NetworkManager on a private
bus (a real dbus-daemon in a namespace of our own): absent at start, two
active connections, changes, restarts, a vanishing bus, hostile values."""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dbus_fast import BusType
from dbus_fast.aio import MessageBus

from tailsfw.buswrite import patient
from tailsfw.events import DnsServers
from tailsfw.nm import MAX_SERVERS, NetworkManagerSource
from tests.lab.bus import PrivateBus, stall
from tests.lab.dbus_fixtures import (
    DEVICE,
    IP4,
    EventLog,
    MockNetworkManager,
    mock_network_manager,
    nameserver_data,
    unavailable,
)
from tests.lab.names import temp_prefix
from tests.lab.netns import scratch_namespace

UNAVAILABLE = unavailable()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")

A = ipaddress.IPv4Address


@pytest.fixture
def bus() -> Iterator[PrivateBus]:
    with (
        scratch_namespace() as namespace,
        tempfile.TemporaryDirectory(prefix=temp_prefix("nm-mock")) as tmp,
        PrivateBus(Path(tmp), namespace=namespace) as bus,
    ):
        yield bus


@pytest.fixture
def nm(bus: PrivateBus) -> Iterator[MockNetworkManager]:
    with mock_network_manager(bus) as mock:
        yield mock


def source(bus: PrivateBus) -> NetworkManagerSource:
    # A short retry so that the reconnection tests stay quick.
    return NetworkManagerSource(bus.address, retry=(0.02, 0.2))


def servers(*addresses: str) -> tuple[ipaddress.IPv4Address, ...]:
    return tuple(A(a) for a in addresses)


def has(*addresses: str, available: bool = True) -> Callable[[DnsServers], bool]:
    def check(event: DnsServers) -> bool:
        return event.servers == servers(*addresses) and event.available == available

    return check


def test_absent_at_start_then_appearing(bus: PrivateBus, nm: MockNetworkManager) -> None:
    started = time.monotonic()
    with EventLog(source(bus)) as log:
        first = log.wait(lambda e: True, timeout=2)
        first_ms = (log.events[0][0] - started) * 1000
        assert first == DnsServers((), (), available=False)
        assert first_ms < 300, f"the first event took {first_ms:.0f} ms"
        nm.start()
        log.wait(has())
        nm.serve("eth0", "192.0.2.53")
        log.wait(has("192.0.2.53"))


def test_two_active_connections_in_networkmanagers_order(
    bus: PrivateBus, nm: MockNetworkManager
) -> None:
    nm.start()
    nm.connection_with("eth1", "192.0.2.1", "192.0.2.2", default=False)
    nm.connection_with("wlan0", "198.51.100.1", "192.0.2.2", default=True)
    nm.set_active(nm.active)
    with EventLog(source(bus)) as log:
        # The connection with the default route first; no repeats.
        event = log.wait(lambda e: e.available and len(e.servers) == 3)
        assert event.servers == servers("198.51.100.1", "192.0.2.2", "192.0.2.1")
        assert event.refused == ()


def test_dns_priority_orders_before_the_default_route(
    bus: PrivateBus, nm: MockNetworkManager
) -> None:
    import dbus

    nm.start()
    low = nm.add_config(nameserver_data("192.0.2.9"), DnsPriority=dbus.Int32(50))
    nm.active.append(nm.add_active([nm.add_device("eth2", low)], default=False))
    nm.connection_with("eth0", "192.0.2.1", default=True)
    nm.set_active(nm.active)
    with EventLog(source(bus)) as log:
        log.wait(has("192.0.2.9", "192.0.2.1"))


def test_changes_are_followed(bus: PrivateBus, nm: MockNetworkManager) -> None:
    import dbus

    nm.start()
    config = nm.serve("eth0", "192.0.2.1")
    with EventLog(source(bus)) as log:
        log.wait(has("192.0.2.1"))
        # org.freedesktop.DBus.Properties.PropertiesChanged
        nm.update(config, IP4, NameserverData=nameserver_data("192.0.2.2", "192.0.2.3"))
        log.wait(has("192.0.2.2", "192.0.2.3"))
        # The older per-interface signal.
        nm.update_legacy(config, IP4, "NameserverData", nameserver_data("192.0.2.4"))
        log.wait(has("192.0.2.4"))
        # The device loses its configuration (carrier lost, ...).
        device = f"{config.rsplit('/', 2)[0]}/Devices/eth0"
        nm.update(device, DEVICE, Ip4Config=dbus.ObjectPath("/"))
        log.wait(has())
        # The same servers again make no event.
        mark = log.mark()
        nm.update(device, DEVICE, Ip4Config=dbus.ObjectPath(config))
        log.wait(has("192.0.2.4"), since=mark)
        mark = log.mark()
        nm.update(config, IP4, NameserverData=nameserver_data("192.0.2.4", "192.0.2.4"))
        time.sleep(0.2)
        assert log.mark() == mark


def test_old_versions_nameservers_are_read(bus: PrivateBus, nm: MockNetworkManager) -> None:
    import dbus

    nm.start()
    native = [struct.unpack("=I", A(a).packed)[0] for a in ("192.0.2.7", "203.0.113.8")]
    config = nm.add_config(Nameservers=dbus.Array([dbus.UInt32(n) for n in native], "u"))
    nm.set_active([nm.add_active([nm.add_device("eth0", config)])])
    with EventLog(source(bus)) as log:
        log.wait(has("192.0.2.7", "203.0.113.8"))


def test_restart_keeps_the_last_servers_while_gone(bus: PrivateBus, nm: MockNetworkManager) -> None:
    nm.start()
    nm.serve("eth0", "192.0.2.1")
    with EventLog(source(bus)) as log:
        log.wait(has("192.0.2.1"))
        nm.kill()
        log.wait(has("192.0.2.1", available=False))
        nm.start()
        nm.serve("eth0", "192.0.2.2")
        log.wait(has("192.0.2.2"))


def test_the_bus_going_and_coming_back(bus: PrivateBus, nm: MockNetworkManager) -> None:
    nm.start()
    nm.serve("eth0", "192.0.2.1")
    with EventLog(source(bus)) as log:
        log.wait(has("192.0.2.1"))
        nm.kill()
        bus.close()
        log.wait(has("192.0.2.1", available=False))
        time.sleep(0.3)  # a few failed connections
        bus.start()
        nm.start()
        log.wait(has(), timeout=5)  # reconnected, NetworkManager read again
        nm.serve("eth0", "192.0.2.3")
        log.wait(has("192.0.2.3"))


HOSTILE = [
    "192.0.2.1\nnameserver 203.0.113.66",
    "2001:db8::53",
    "::ffff:192.0.2.1",
    "dns.example.com",
    "0.0.0.0",
    "127.0.0.1",
    "127.0.0.53",
    "255.255.255.255",
    "224.0.0.251",
    "240.0.0.1",
    " 192.0.2.1",
    "192.0.2.1\t",  # (D-Bus itself refuses NUL in a string: see the unit tests)
    "192.0.2.01",
    "",
]


def test_hostile_values_never_pass_and_the_source_stays_up(
    bus: PrivateBus, nm: MockNetworkManager
) -> None:
    import dbus

    nm.start()
    config = nm.serve("eth0", *HOSTILE, "192.0.2.53")
    with EventLog(source(bus)) as log:
        event = log.wait(lambda e: e.available and e.servers != ())
        assert event.servers == servers("192.0.2.53")
        assert len(event.refused) == len(HOSTILE)
        assert all(r.isprintable() for r in event.refused)
        assert any("IPv6" in r for r in event.refused)
        assert any("loopback" in r for r in event.refused)

        # Wrong D-Bus types: a string list, numbers, an entry without address.
        wrong = [
            (dbus.Array(["192.0.2.1"], signature="s"), ()),
            (nameserver_data(dbus.UInt32(0x0102000A), dbus.Byte(1), "192.0.2.54"), ("192.0.2.54",)),
            (dbus.Array([dbus.Dictionary({"addr": "192.0.2.1"}, signature="sv")], "a{sv}"), ()),
        ]
        for value, expected in wrong:
            mark = log.mark()
            nm.update(config, IP4, NameserverData=value)
            event = log.wait(lambda e: e.available, since=mark)
            assert event.servers == servers(*expected), event
            assert event.refused, event

        # A thousand entries: the first MAX_SERVERS valid ones, a bounded report.
        many = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(1000)]
        nm.update(config, IP4, NameserverData=nameserver_data(*many))
        event = log.wait(lambda e: len(e.servers) == MAX_SERVERS)
        assert event.servers == servers(*many[:MAX_SERVERS])
        assert len(event.refused) <= 16
        assert "more values refused" in event.refused[-1]

        # Still followed after all that.
        nm.update(config, IP4, NameserverData=nameserver_data("192.0.2.99"))
        log.wait(has("192.0.2.99"))


def test_no_bus_at_start_then_bus_and_networkmanager(
    bus: PrivateBus, nm: MockNetworkManager
) -> None:
    bus.close()
    with EventLog(source(bus)) as log:
        log.wait(has(available=False), timeout=0.5)
        bus.start()
        nm.start()
        nm.serve("eth0", "192.0.2.1")
        log.wait(has("192.0.2.1"))


def test_a_hung_networkmanager_delays_nothing(bus: PrivateBus, nm: MockNetworkManager) -> None:
    nm.start()
    nm.serve("eth0", "192.0.2.1")
    assert nm.process is not None
    nm.process.send_signal(signal.SIGSTOP)  # owns its name, answers nothing
    try:
        hung = NetworkManagerSource(bus.address, call_timeout=0.2, retry=(0.02, 0.05))
        with EventLog(hung) as log:
            log.wait(has(available=False), timeout=0.5)
            time.sleep(1)  # several reads time out: still no servers, no crash
            assert hung.reads == 0 and "within 0.2 s" in hung.last_error
            nm.process.send_signal(signal.SIGCONT)
            log.wait(has("192.0.2.1"), timeout=5)
    finally:
        nm.process.send_signal(signal.SIGCONT)


def test_a_dangling_object_is_skipped_and_the_rest_used(
    bus: PrivateBus, nm: MockNetworkManager
) -> None:
    """A device whose Ip4Config, or an ActiveConnections entry, points nowhere
    used to fail every read: the other device's new server was never applied."""
    nm.start()
    config = nm.serve("eth0", "192.0.2.1")
    nowhere = "/org/freedesktop/NetworkManager/IP4Config/4242"
    nm.active.append(nm.add_active([nm.add_device("eth1", nowhere)]))
    nm.active.append("/org/freedesktop/NetworkManager/ActiveConnection/4242")
    nm.set_active(nm.active)
    with EventLog(source(bus)) as log:
        event = log.wait(has("192.0.2.1"))
        skipped = [r for r in event.refused if "skipped" in r]
        assert len(skipped) == 2 and all("4242" in r for r in skipped), event.refused
        nm.update(config, IP4, NameserverData=nameserver_data("192.0.2.2"))
        log.wait(has("192.0.2.2"))


@pytest.mark.parametrize("vpn_default", [True, False])
def test_a_vpns_servers_come_first(
    bus: PrivateBus, nm: MockNetworkManager, vpn_default: bool
) -> None:
    """As NetworkManager's DNS manager orders them: a VPN's default priority
    is 50 (others 100), and at equal priority a VPN comes first."""
    import dbus

    nm.start()
    device = nm.add_device("eth0", nm.add_config(nameserver_data("192.0.2.1")))
    nm.active.append(nm.add_active([device], default=not vpn_default))
    # DnsPriority 0: "the default", which for a VPN is 50.
    tunnel = nm.add_config(nameserver_data("10.8.0.1", "192.0.2.1"), DnsPriority=dbus.Int32(0))
    nm.active.append(nm.add_active([device], default=vpn_default, vpn=True, config=tunnel))
    nm.set_active(nm.active)
    with EventLog(source(bus)) as log:
        log.wait(has("10.8.0.1", "192.0.2.1"))
        # An explicit priority is NetworkManager's word: the VPN after eth0.
        nm.update(tunnel, IP4, DnsPriority=dbus.Int32(200))
        log.wait(has("192.0.2.1", "10.8.0.1"))


# -- a stalled bus: dbus-fast alone drops the connection on the first EAGAIN
# (see tailsfw/buswrite.py; tests/lab/bus.py `stall`).


def test_a_full_socket_waits_for_the_bus(bus: PrivateBus) -> None:
    async def main() -> tuple[bool, str]:
        connection = await MessageBus(bus_address=bus.address, bus_type=BusType.SYSTEM).connect()
        # Without patient(): (False, "dropped") (seen; not a test of its own:
        # the dropped connection's errors upset the interpreter's state for
        # the rest of the run).
        try:
            return await stall(bus, patient(connection))
        finally:
            connection.disconnect()

    assert asyncio.run(main()) == (True, "answered")
