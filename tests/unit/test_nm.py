"""The NetworkManager client's pure part: the validator, the D-Bus shapes,
NetworkManager's order, the bounds (no bus)."""

from __future__ import annotations

import asyncio
import ipaddress
import struct
import time

import pytest
from dbus_fast import Message, MessageType, Variant
from hypothesis import given
from hypothesis import strategies as st

from tailsfw import nm
from tailsfw.dnsserver import Refused, check_address
from tailsfw.events import DnsServers
from tailsfw.nm import (
    IP4,
    MAX_ENTRIES,
    MAX_OBJECTS,
    MAX_REFUSED,
    MAX_SERVERS,
    NM,
    PROPERTIES,
    Config,
    NetworkManagerSource,
    dns_servers,
    nameserver_values,
    ordered,
    signal_is_relevant,
)

A = ipaddress.IPv4Address


def data(*addresses: str) -> dict[str, Variant]:
    entries = [{"address": Variant("s", a)} for a in addresses]
    return {"NameserverData": Variant("aa{sv}", entries)}


def config(interface: str, *addresses: str, default: bool = False, priority: int = 0) -> Config:
    props = data(*addresses)
    if priority:
        props["DnsPriority"] = Variant("i", priority)
    return Config(interface, default, props)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("192.0.2.1\nnameserver 203.0.113.66", "control characters"),
        ("192.0.2.1\x00", "control characters"),
        (" 192.0.2.1", "spaces"),
        ("2001:db8::53", "IPv6"),
        ("::ffff:192.0.2.1", "IPv6"),
        ("fe80::1%eth0", "IPv6"),
        ("dns.example.com", "not an IPv4 address"),
        ("192.0.2.01", "not an IPv4 address"),
        ("", "not an IPv4 address"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("127.0.0.1", "loopback"),
        ("127.0.0.53", "loopback"),
        ("224.0.0.251", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("240.0.0.1", "reserved"),
        ("x" * 10_000, "long"),
        (3232235777, "not a string"),
        (b"192.0.2.1", "not a string"),
        (None, "not a string"),
    ],
)
def test_refused_values_name_the_reason(value: object, reason: str) -> None:
    with pytest.raises(Refused, match=reason) as refused:
        check_address(value)
    message = str(refused.value)
    assert message.isprintable() and len(message) < 120


@pytest.mark.parametrize("value", ["192.0.2.1", "10.0.0.1", "192.168.77.1", "169.254.169.253"])
def test_usable_addresses_pass(value: str) -> None:
    assert check_address(value) == A(value)


@given(st.text(max_size=40))
def test_anything_accepted_is_a_canonical_unicast_ipv4_address(value: str) -> None:
    try:
        address = check_address(value)
    except Refused as e:
        assert str(e).isprintable()
        return
    assert str(address) == value
    assert not (address.is_loopback or address.is_multicast or address.is_reserved)
    assert address not in ipaddress.IPv4Network("0.0.0.0/8")


@given(st.ip_addresses(v=4))  # hypothesis favours the special-purpose ranges
def test_a_dotted_quad_is_accepted_exactly_when_usable(address: ipaddress.IPv4Address) -> None:
    unusable = (
        address.is_loopback
        or address.is_multicast
        or address.is_reserved
        or address in ipaddress.IPv4Network("0.0.0.0/8")
    )
    try:
        accepted = check_address(str(address)) == address
    except Refused:
        accepted = False
    assert accepted != unusable


def test_nameserver_data_with_wrong_types_is_refused_entry_by_entry() -> None:
    props = {
        "NameserverData": Variant(
            "aa{sv}",
            [
                {"address": Variant("s", "192.0.2.1")},
                {"address": Variant("u", 1)},
                {"addr": Variant("s", "192.0.2.2")},
                {"address": Variant("as", ["192.0.2.3"])},
            ],
        )
    }
    values = list(nameserver_values(props))
    assert values[0] == "192.0.2.1"
    assert [type(v) for v in values[1:]] == [Refused] * 3
    assert "D-Bus type 'u'" in str(values[1])


def test_nameserver_data_of_another_type_is_refused_whole() -> None:
    values = list(nameserver_values({"NameserverData": Variant("as", ["192.0.2.1"])}))
    assert len(values) == 1 and isinstance(values[0], Refused)


def test_old_nameservers_are_native_order_uint32() -> None:
    native = struct.unpack("=I", A("192.0.2.7").packed)[0]
    assert list(nameserver_values({"Nameservers": Variant("au", [native])})) == ["192.0.2.7"]
    wrong = list(nameserver_values({"Nameservers": Variant("as", ["192.0.2.7"])}))
    assert isinstance(wrong[0], Refused)


def test_nameserver_data_wins_over_nameservers() -> None:
    props = {**data("192.0.2.1"), "Nameservers": Variant("au", [1])}
    assert list(nameserver_values(props)) == ["192.0.2.1"]


def test_order_priority_then_default_route_then_given_order() -> None:
    configs = [
        config("eth0", "192.0.2.1"),
        config("wlan0", "192.0.2.2", default=True),
        config("eth1", "192.0.2.3"),
        config("tun0", "192.0.2.4", priority=50),
    ]
    assert [c.interface for c in ordered(configs)] == ["tun0", "wlan0", "eth0", "eth1"]


def test_a_negative_priority_excludes_the_others() -> None:
    configs = [
        config("eth0", "192.0.2.1", default=True),
        config("tun0", "192.0.2.4", priority=-10),
        config("tun1", "192.0.2.5", priority=-10),
        config("tun2", "192.0.2.6", priority=-5),
    ]
    assert [c.interface for c in ordered(configs)] == ["tun0", "tun1"]


def test_servers_keep_order_without_repeats_and_report_refusals() -> None:
    event = dns_servers(
        [config("eth0", "192.0.2.1", "127.0.0.1", "192.0.2.2"), config("eth1", "192.0.2.1")]
    )
    assert event.servers == (A("192.0.2.1"), A("192.0.2.2"))
    assert event.refused == ("'eth0': '127.0.0.1': loopback",)
    assert event.available


def test_a_thousand_entries_are_bounded() -> None:
    many = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(1000)]
    event = dns_servers([config("eth0", *many, *(["::1"] * 1000))])
    assert len(event.servers) == MAX_SERVERS
    assert event.servers == tuple(A(a) for a in many[:MAX_SERVERS])
    assert len(event.refused) == MAX_REFUSED
    assert f"over {MAX_SERVERS} servers" in event.refused[0]
    # MAX_ENTRIES looked at (half of them servers), the rest counted as one reason.
    looked_at = MAX_ENTRIES - MAX_SERVERS + 1
    assert event.refused[-1] == f"and {looked_at - MAX_REFUSED + 1} more values refused"


def test_entries_are_capped_before_they_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """64 configurations of 4,000 entries cost 1.2 s a read when each was checked."""
    checked: list[object] = []
    real = check_address

    def counting(value: object) -> ipaddress.IPv4Address:
        checked.append(value)
        return real(value)

    monkeypatch.setattr(nm, "check_address", counting)
    hostile = [f"2001:db8::{i:x}" for i in range(4000)]
    configs = [config(f"eth{i}", *hostile) for i in range(MAX_OBJECTS)]
    started = time.perf_counter()
    event = dns_servers(configs)
    elapsed = time.perf_counter() - started
    assert len(checked) == MAX_OBJECTS * MAX_ENTRIES
    assert len(event.refused) == MAX_REFUSED and event.servers == ()
    more = len(checked) + MAX_OBJECTS - MAX_REFUSED + 1  # each config's "over" line too
    assert event.refused[-1] == f"and {more} more values refused"
    assert elapsed < 0.5, f"{elapsed:.2f} s"


def test_hostile_interface_names_are_quoted() -> None:
    event = dns_servers([config("eth0\nnameserver 1.2.3.4", "::1")])
    assert event.refused[0].isprintable()


def signal(interface: str, signature: str, body: list[object]) -> Message:
    return Message(
        message_type=MessageType.SIGNAL,
        path="/org/freedesktop/NetworkManager/IP4Config/1",
        interface=interface,
        member="PropertiesChanged",
        signature=signature,
        body=body,
    )


def test_only_relevant_property_changes_wake_the_reader() -> None:
    changed = {"NameserverData": Variant("aa{sv}", [])}
    assert signal_is_relevant(signal(PROPERTIES, "sa{sv}as", [IP4, changed, []]))
    assert signal_is_relevant(signal(PROPERTIES, "sa{sv}as", [IP4, {}, ["Nameservers"]]))
    assert signal_is_relevant(signal(IP4, "a{sv}", [changed]))  # the older signal
    other = {"Connectivity": Variant("u", 4)}
    assert not signal_is_relevant(signal(PROPERTIES, "sa{sv}as", [NM, other, []]))
    assert not signal_is_relevant(signal(PROPERTIES, "sa{sv}as", [IP4, other, []]))
    # A body that does not parse: read again, to be safe.
    assert signal_is_relevant(signal(PROPERTIES, "s", [IP4]))


@pytest.mark.parametrize("address", ["unix:path=/nonexistent/tfwnm-bus", "nonsense"])
def test_without_a_bus_the_first_event_comes_at_once_and_retries_go_on(address: str) -> None:
    source = NetworkManagerSource(address, retry=(0.01, 0.02))

    async def first_and_retries() -> tuple[DnsServers, float]:
        events = source.events()
        started = time.monotonic()
        first = await anext(events)
        elapsed = time.monotonic() - started
        await asyncio.sleep(0.1)  # a few failed attempts, and no event for them
        await events.aclose()
        return first, elapsed

    first, elapsed = asyncio.run(first_and_retries())
    assert first == DnsServers((), (), available=False)
    assert elapsed < 0.1
    assert source.connects == 0 and source.last_error.startswith("bus ")
