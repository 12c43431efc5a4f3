"""The connected LAN networks, computed in integers, against ipaddress' own
subnet_of and collapse_addresses (the first, slow implementation)."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from tailsfw import compiler, policy
from tailsfw.facts import Facts

SHIPPED = policy.load(Path(__file__).resolve().parents[2] / "etc" / "tailsfw" / "policy.toml")
CONNECTED = dataclasses.replace(SHIPPED, lan=dataclasses.replace(SHIPPED.lan, mode="connected"))

# Mostly near each other (adjacent and nested networks), some anywhere.
networks = st.builds(
    lambda address, length: ipaddress.IPv4Network((address, length), strict=False),
    st.integers(0x0A000000, 0x0A0003FF)
    | st.integers(0xC0A7FF00, 0xC0A800FF)
    | st.integers(0, 2**32 - 1),
    st.integers(0, 32) | st.integers(22, 26),
)


def slow(
    lans: tuple[ipaddress.IPv4Network, ...], connected: frozenset[ipaddress.IPv4Network]
) -> list[ipaddress.IPv4Network]:
    parts = [net for net in connected for lan in lans if net.subnet_of(lan)] + [
        lan for lan in lans for net in connected if lan.subnet_of(net)
    ]
    return list(ipaddress.collapse_addresses(parts))


@settings(max_examples=300, deadline=None)
@given(st.frozensets(networks, max_size=40))
def test_the_same_networks_as_subnet_of_and_collapse(
    connected: frozenset[ipaddress.IPv4Network],
) -> None:
    facts = Facts(connected=connected)
    assert compiler.lan_networks(CONNECTED, facts) == slow(CONNECTED.lan.networks, connected)


def test_two_thousand_adjacent_networks_become_a_few() -> None:
    connected = frozenset(
        ipaddress.IPv4Network(f"10.{100 + i // 256}.{i % 256}.0/24") for i in range(2000)
    )
    got = compiler.lan_networks(CONNECTED, Facts(connected=connected))
    assert got == slow(CONNECTED.lan.networks, connected)
    assert sum(n.num_addresses for n in got) == 2000 * 256
