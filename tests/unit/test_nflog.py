"""The NFLOG decoder, on crafted messages: every family and protocol Tails logs,
and truncated or malformed ones (never anything but Malformed)."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tailsfw import nflog
from tailsfw.nflog import Drop, decode, messages, sequence_gap
from tailsfw.nlsock import Malformed
from tests.unit.nflog_messages import PREFIX, ipv4, ipv6, packet_message, ports

NOW = 1_800_000_000.5


def one(data: bytes) -> Drop:
    (message,) = messages(data)
    return decode(message, NOW)


def test_ipv4_tcp() -> None:
    drop = one(packet_message(ipv4(6, "192.168.77.2", "198.51.100.10", ports(40000, 42))))
    assert drop == Drop(
        family=4, protocol=6, src="192.168.77.2", dst="198.51.100.10", length=40,
        prefix=PREFIX, timestamp=NOW, sport=40000, dport=42, uid=1000, gid=1001, outdev=2, seq=0,
    )  # fmt: skip
    assert drop.protocol_name == "TCP"


def test_ipv4_udp_with_options_and_the_length_from_the_header() -> None:
    # The copy range cuts the payload; LEN is the packet's own, as the kernel logs it.
    packet = ipv4(17, "192.168.77.2", "203.0.113.10", ports(5353, 42)[:8], ihl=7, total=1400)
    drop = one(packet_message(packet, uid=0, gid=0))
    assert (drop.protocol_name, drop.sport, drop.dport, drop.length) == ("UDP", 5353, 42, 1400)
    assert (drop.uid, drop.gid) == (0, 0)


def test_ipv4_icmp() -> None:
    drop = one(packet_message(ipv4(1, "192.168.77.2", "203.0.113.10", bytes([8, 0, 0, 0]))))
    assert (drop.protocol_name, drop.icmp_type, drop.icmp_code) == ("ICMP", 8, 0)
    assert drop.sport is drop.dport is None


def test_ipv4_later_fragment_has_no_ports() -> None:
    drop = one(packet_message(ipv4(17, "10.0.0.1", "10.0.0.2", ports(1, 2), fragment=185)))
    assert (drop.protocol, drop.sport, drop.dport) == (17, None, None)


def test_ipv6_tcp_and_icmpv6() -> None:
    tcp = one(packet_message(ipv6(6, "2001:db8:77::2", "2001:db8:1::10", ports(1234, 42)),
                             family=socket.AF_INET6))  # fmt: skip
    assert (tcp.family, tcp.src, tcp.dst, tcp.dport, tcp.length) == (
        6, "2001:db8:77::2", "2001:db8:1::10", 42, 60)  # fmt: skip
    icmp = one(packet_message(ipv6(58, "::1", "2001:db8:1::10", bytes([128, 0, 0, 0]))))
    assert (icmp.protocol_name, icmp.icmp_type, icmp.icmp_code) == ("ICMPv6", 128, 0)


def test_ipv6_extension_headers_are_walked() -> None:
    hop_by_hop = bytes([60, 0]) + b"\0" * 6  # next: destination options
    destination = bytes([44, 1]) + b"\0" * 14  # 16 bytes; next: fragment
    fragment = bytes([17, 0, 0, 1]) + b"\0" * 4  # first fragment, more follow; next: UDP
    drop = one(packet_message(ipv6(0, "::1", "::2", hop_by_hop + destination + fragment +
                                   ports(7, 53))))  # fmt: skip
    assert (drop.protocol_name, drop.sport, drop.dport) == ("UDP", 7, 53)
    later = bytes([17, 0, 0x05, 0x00]) + b"\0" * 4  # offset 160: no transport header here
    drop = one(packet_message(ipv6(44, "::1", "::2", later + b"\0" * 8)))
    assert (drop.protocol, drop.sport) == (17, None)


@pytest.mark.parametrize("icv", [12, 16])  # HMAC-SHA1-96, HMAC-SHA256-128
def test_ipv6_authentication_header_is_sized_in_4_octet_units(icv: int) -> None:
    """AH (next header 51) gives its length in 4-octet units minus 2 (RFC 4302),
    unlike the other extension headers (8-octet units minus 1)."""
    ah = bytes([17, (12 + icv) // 4 - 2, 0, 0]) + b"\1" * 8 + b"\xee" * icv  # next: UDP
    drop = one(packet_message(ipv6(51, "::1", "::2", ah + ports(5353, 42)),
                              family=socket.AF_INET6))  # fmt: skip
    assert (drop.protocol_name, drop.sport, drop.dport) == ("UDP", 5353, 42)
    hop_by_hop = bytes([51, 0]) + b"\0" * 6  # AH after another extension header
    drop = one(packet_message(ipv6(0, "::1", "::2", hop_by_hop + ah + ports(40000, 443))))
    assert (drop.protocol_name, drop.sport, drop.dport) == ("UDP", 40000, 443)


def test_transport_cut_by_the_copy_range_is_not_malformed() -> None:
    drop = one(packet_message(ipv4(6, "10.0.0.1", "10.0.0.2", b"\x01\x02")))
    assert (drop.protocol_name, drop.sport, drop.dport) == ("TCP", None, None)
    hop_by_hop_cut = bytes([6])  # the extension header itself is cut
    drop = one(packet_message(ipv6(0, "::1", "::2", hop_by_hop_cut)))
    assert (drop.protocol, drop.sport) == (0, None)


def test_kernel_packets_have_no_uid_and_kernel_timestamps_are_used() -> None:
    drop = one(packet_message(ipv4(1, "10.0.0.1", "10.0.0.2", bytes([3, 3])), uid=None,
                              gid=None, outdev=None, seq=None, timestamp=(1_700_000_000, 250_000),
                              prefix=None))  # fmt: skip
    assert (drop.uid, drop.gid, drop.outdev, drop.seq, drop.prefix) == (None, None, 0, None, "")
    assert drop.timestamp == 1_700_000_000.25


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (packet_message(None), "no packet payload"),
        (packet_message(b""), "not an IP packet"),
        (packet_message(b"\x50" + b"\0" * 40), "not an IP packet (version 5)"),
        (packet_message(ipv4(6, "1.1.1.1", "2.2.2.2", b"")[:19]), "IPv4 header truncated"),
        (packet_message(b"\x43" + b"\0" * 30), "IPv4 header length 12"),
        (packet_message(ipv6(6, "::1", "::2", b"")[:39]), "IPv6 header truncated"),
        (struct.pack("=IHHII", 20, nflog.MSG_CONFIG, 0, 0, 0) + b"\0" * 4, "not an NFLOG packet"),
    ],
)
def test_malformed_messages_say_why(data: bytes, why: str) -> None:
    with pytest.raises(Malformed, match=why.replace("(", r"\(").replace(")", r"\)")):
        one(data)


def test_broken_framing() -> None:
    good = packet_message(ipv4(6, "1.1.1.1", "2.2.2.2", ports(1, 2)))
    with pytest.raises(Malformed, match="does not fit"):
        list(messages(good[:-1]))
    with pytest.raises(Malformed, match="stray bytes"):
        list(messages(good + b"\0" * 5))
    bad_attribute = good[:20] + struct.pack("=HH", 200, 1) + good[24:]
    with pytest.raises(Malformed, match="overruns"):
        one(bad_attribute)
    short_uid = packet_message(ipv4(6, "1.1.1.1", "2.2.2.2", ports(1, 2)), uid=None)
    short_uid = short_uid[:20] + struct.pack("=HH", 6, nflog.NFULA_UID) + b"\0\0\0\0" + short_uid[
        20:]  # fmt: skip
    short_uid = struct.pack("=I", len(short_uid)) + short_uid[4:]
    with pytest.raises(Malformed, match="not 4"):
        one(short_uid)


def test_several_messages_in_one_datagram() -> None:
    a = packet_message(ipv4(6, "1.1.1.1", "2.2.2.2", ports(1, 2)), seq=7)
    b = packet_message(ipv4(17, "1.1.1.1", "2.2.2.3", ports(1, 2)), seq=8)
    assert [decode(m, NOW).seq for m in messages(a + b)] == [7, 8]


def test_sequence_gaps_count_lost_messages_and_wrap() -> None:
    assert sequence_gap(None, 5) == 0
    assert sequence_gap(5, 5) == 0
    assert sequence_gap(5, 9) == 4
    assert sequence_gap(0xFFFFFFFE, 1) == 3


def test_bind_requests() -> None:
    bind, mode = nflog.bind_messages(group=7, copy_range=128)
    (m,) = messages(bind)
    assert m.kind == nflog.MSG_CONFIG
    assert bytes(m.body[:4]) == struct.pack("!BBH", 0, 0, 7)
    assert nflog.attributes(m.body)[nflog.NFULA_CFG_CMD].tobytes() == bytes([1])
    attrs = nflog.attributes(next(messages(mode)).body)
    assert attrs[nflog.NFULA_CFG_MODE].tobytes() == struct.pack("!IBx", 128, 2)
    assert attrs[nflog.NFULA_CFG_QTHRESH].tobytes() == struct.pack("!I", 1)
    assert attrs[nflog.NFULA_CFG_FLAGS].tobytes()[:2] == struct.pack("!H", nflog.NFULNL_CFG_F_SEQ)


def _decode_all(data: bytes) -> None:
    try:
        for message in messages(data):
            decode(message, NOW)
    except Malformed:
        pass


@given(st.binary(max_size=300))
def test_random_bytes_are_decoded_or_malformed(data: bytes) -> None:
    _decode_all(data)


VALID = [
    packet_message(ipv4(6, "192.168.77.2", "198.51.100.10", ports(40000, 42))),
    packet_message(ipv6(0, "::1", "::2", bytes([17, 0]) + b"\0" * 6 + ports(7, 53))),
    packet_message(ipv4(1, "10.0.0.1", "10.0.0.2", bytes([8, 0]))),
]


@given(st.sampled_from(VALID), st.data())
def test_truncated_or_corrupted_messages_are_decoded_or_malformed(
    message: bytes, data: st.DataObject
) -> None:
    cut = data.draw(st.integers(0, len(message)))
    _decode_all(message[:cut])
    position = data.draw(st.integers(0, len(message) - 1))
    byte = data.draw(st.integers(0, 255))
    _decode_all(message[:position] + bytes([byte]) + message[position + 1 :])
