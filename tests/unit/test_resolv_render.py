"""resolv.py's pure part: the clearnet file's text, and what it refuses."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from tailsfw.resolv import TOR_RESOLV_TEXT, render_clearnet

A = ipaddress.IPv4Address


def test_tor_text() -> None:
    assert TOR_RESOLV_TEXT == "nameserver 127.0.0.1\n"


def test_one_line_per_server_in_order_without_repeats() -> None:
    servers = [A("192.168.77.1"), A("9.9.9.9"), A("192.168.77.1"), A("10.0.0.53"), A("9.9.9.9")]
    assert render_clearnet(servers) == (
        "nameserver 192.168.77.1\nnameserver 9.9.9.9\nnameserver 10.0.0.53\n"
    )


def test_no_servers_is_an_empty_file() -> None:
    assert render_clearnet([]) == ""


@pytest.mark.parametrize(
    "server", ["169.254.169.253", "100.64.0.1", "172.16.0.1", "1.1.1.1", "223.255.255.254"]
)
def test_unicast_accepted(server: str) -> None:
    assert render_clearnet([A(server)]) == f"nameserver {server}\n"


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (A("0.0.0.0"), "unspecified"),
        (A("0.1.2.3"), "unspecified"),
        (A("127.0.0.1"), "loopback"),
        (A("127.0.0.53"), "loopback"),
        (A("224.0.0.251"), "multicast"),
        (A("239.255.255.250"), "multicast"),
        (A("255.255.255.255"), "broadcast"),
        (A("240.0.0.1"), "reserved"),
        (ipaddress.IPv6Address("2001:db8::53"), "not an IPv4 address"),
        ("192.168.77.1", "not an IPv4 address"),
        ("192.168.77.1\nnameserver 203.0.113.53", "not an IPv4 address"),
        (3232255233, "not an IPv4 address"),
        (None, "not an IPv4 address"),
    ],
)
def test_refused_naming_the_value(value: Any, why: str) -> None:
    with pytest.raises(ValueError) as caught:
        render_clearnet([A("192.168.77.1"), value])
    message = str(caught.value)
    assert repr(value) in message and why in message
    assert "\n" not in message.replace("\\n", "")  # one line, the newline escaped


def test_a_long_value_is_cut_in_the_message() -> None:
    with pytest.raises(ValueError) as caught:
        render_clearnet(["x" * 10_000])  # type: ignore[list-item]
    assert len(str(caught.value)) < 120
