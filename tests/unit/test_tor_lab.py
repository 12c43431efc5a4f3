"""The Tor lab's pure parts: torrcs, key parsing, onion names, DNS messages."""

from __future__ import annotations

import base64
import socket
import struct
from pathlib import Path

import pytest

from tests.lab import dnsquery
from tests.lab.command import LabError
from tests.lab.tor_network import (
    EXIT,
    RELAYS,
    Identity,
    client_torrc,
    dir_authority_lines,
    onion_address,
    parse_fingerprint,
    parse_v3ident,
    relay_torrc,
)

IDENTITIES = [Identity(r, f"{i:040X}", f"{i + 10:040X}") for i, r in enumerate(RELAYS)]


def option(torrc: str, name: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in torrc.splitlines() if line.split(" ")[0] == name]


def test_only_authorities_get_a_dir_authority_line() -> None:
    lines = dir_authority_lines(IDENTITIES).splitlines()
    assert len(lines) == sum(r.authority for r in RELAYS) == 4
    assert lines[0] == (
        f"DirAuthority auth1 orport=5100 no-v2 v3ident={10:040X} 198.51.100.21:5101 {0:040X}"
    )


def test_every_torrc_names_only_lab_authorities_and_is_a_testing_network() -> None:
    resolv = Path("/lab/resolv.conf")
    torrcs = [relay_torrc(r, Path(f"/lab/{r.nick}"), IDENTITIES, resolv) for r in RELAYS]
    torrcs.append(client_torrc(Path("/lab/client"), IDENTITIES))
    for torrc in torrcs:
        assert option(torrc, "TestingTorNetwork") == ["1"]
        assert option(torrc, "UseDefaultFallbackDirs") == ["0"]
        addresses = [a.split()[-2].split(":")[0] for a in option(torrc, "DirAuthority")]
        assert addresses == [r.address for r in RELAYS if r.authority]


def test_only_the_exit_exits_and_it_resolves_with_the_lab_dns() -> None:
    resolv = Path("/lab/resolv.conf")
    for relay in RELAYS:
        torrc = relay_torrc(relay, Path("/d"), IDENTITIES, resolv)
        assert option(torrc, "ExitRelay") == ["1" if relay is EXIT else "0"]
        assert option(torrc, "OutboundBindAddress") == [relay.address]
        assert option(torrc, "ServerDNSResolvConfFile") == ([str(resolv)] if relay is EXIT else [])


def test_the_client_has_tails_ports() -> None:
    torrc = client_torrc(Path("/lab/client"), IDENTITIES)
    assert [p.split()[0] for p in option(torrc, "SocksPort")] == [
        "127.0.0.1:9050",
        "127.0.0.1:9062",
        "127.0.0.1:9063",
    ]
    assert option(torrc, "TransPort") == ["127.0.0.1:9040"]
    assert option(torrc, "DNSPort") == ["127.0.0.1:5353"]
    assert option(torrc, "AutomapHostsSuffixes") == [".exit,.onion"]
    assert option(torrc, "ControlPort") == ["127.0.0.1:9052"]


def test_fingerprints_are_parsed_from_tor_and_tor_gencert_output() -> None:
    assert parse_fingerprint("auth1 48AE D909 F2C4 882E 3713 B511 41C8 0FA4 2A3D C42F\n") == (
        "48AED909F2C4882E3713B51141C80FA42A3DC42F"
    )
    assert parse_v3ident("dir-key-certificate-version 3\nfingerprint " + "A" * 40 + "\n") == (
        "A" * 40
    )
    with pytest.raises(LabError, match="no fingerprint"):
        parse_fingerprint("[warn] something else\n")


def test_onion_names_are_v3_shaped() -> None:
    name = onion_address(bytes(32))
    label = name.removesuffix(".onion")
    assert len(label) == 56
    raw = base64.b32decode(label.upper())
    assert raw[:32] == bytes(32) and raw[-1] == 3


def test_dns_query_and_answer_round_trip() -> None:
    ident, query = dnsquery.query("abc.onion")
    assert query.endswith(b"\x03abc\x05onion\x00\x00\x01\x00\x01")
    answer = (
        struct.pack("!6H", ident, 0x8180, 1, 1, 0, 0)
        + query[12:]
        + b"\xc0\x0c"
        + struct.pack("!2HIH", 1, 1, 60, 4)
        + socket.inet_aton("127.200.1.2")
    )
    assert dnsquery.a_records(answer, ident) == (0, ["127.200.1.2"])
    with pytest.raises(ValueError, match="reply for query"):
        dnsquery.a_records(answer, ident ^ 1)
