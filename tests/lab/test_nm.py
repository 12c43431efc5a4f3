"""NetworkManagerSource against a real NetworkManager in the lab host, leased
DNS servers by dnsmasq in the peer (see tests/lab/networkmanager.py): the
leased servers, a new lease, carrier loss and return, a killed and
restarted NetworkManager."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest

from tailsfw.events import DnsServers
from tailsfw.nm import NetworkManagerSource
from tests.lab.dbus_fixtures import EventLog
from tests.lab.networkmanager import LEASED, NM_UNAVAILABLE, NetworkManagerLab

pytestmark = pytest.mark.skipif(NM_UNAVAILABLE is not None, reason=NM_UNAVAILABLE or "")
RELEASED = ("203.0.113.54",)


def has(addresses: tuple[str, ...], available: bool = True) -> Callable[[DnsServers], bool]:
    expected = tuple(ipaddress.IPv4Address(a) for a in addresses)

    def check(event: DnsServers) -> bool:
        return event.servers == expected and event.available == available

    return check


def test_leases_carrier_and_restarts_are_followed(nm_lab: NetworkManagerLab) -> None:
    # One test: each step starts from the state the previous one left, and
    # NetworkManager's start (~1 s) is paid once.
    with EventLog(NetworkManagerSource(nm_lab.bus.address, retry=(0.02, 0.2))) as log:
        log.wait(has(LEASED), timeout=15)

        # A new lease with other servers.
        mark = log.mark()
        nm_lab.lease(RELEASED)
        log.wait(has(RELEASED), timeout=15, since=mark)

        # Carrier lost: NetworkManager drops the servers (after its ~6 s
        # grace); back: a new lease brings them again.
        mark = log.mark()
        nm_lab.carrier(False)
        log.wait(has(()), timeout=20, since=mark)
        nm_lab.carrier(True)
        log.wait(has(RELEASED), timeout=20, since=mark)
        # NetworkManager may still be re-activating (an ActiveConnection gone,
        # then none for a moment): the kill must find it settled.
        log.settled(has(RELEASED), timeout=20)

        # Killed: the last servers stay, marked unavailable.  Restarted, it
        # takes its device back with the lease it kept, and is read again.
        mark = log.mark()
        nm_lab.nm.kill()
        log.wait(has(RELEASED, available=False), timeout=5, since=mark)
        mark = log.mark()
        nm_lab.nm.start()
        log.wait(has(RELEASED), timeout=10, since=mark)

        # And it is still followed: a new lease after the restart.
        mark = log.mark()
        nm_lab.lease(LEASED)
        log.wait(has(LEASED), timeout=15, since=mark)
