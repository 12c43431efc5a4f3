"""The one netlink framing under every reader, and its one policy for a
malformed datagram: the messages before the fault stand, the rest of the
datagram is skipped, the reason is given; counted, logged once; never raised."""

from __future__ import annotations

import logging
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tailsfw import netlink, nftmonitor, nlsock
from tailsfw.nlsock import NLM_F_MULTI, NLMSG_DONE, NLMSG_ERROR, Malformations, split


def message(kind: int, body: bytes = b"", flags: int = 0, seq: int = 0) -> bytes:
    """One message, padded to 4 bytes as the kernel aligns them."""
    data = nlsock.HEADER.pack(nlsock.HEADER.size + len(body), kind, flags, seq, 0) + body
    return data + b"\0" * (-len(data) % 4)


def bodies(data: bytes) -> list[tuple[int, bytes]]:
    frames, malformed = split(data)
    assert malformed == ""
    return [(kind, data[start:end]) for kind, _, _, start, end in frames]


def test_a_multipart_dump_is_cut_at_each_aligned_message() -> None:
    # Odd-sized bodies: each next header is found at the aligned offset.
    data = b"".join([
        message(16, b"abc", NLM_F_MULTI, seq=7),
        message(16, b"defgh", NLM_F_MULTI, seq=7),
        message(NLMSG_DONE, struct.pack("=i", 0), NLM_F_MULTI, seq=7),
    ])  # fmt: skip
    frames, malformed = split(data)
    assert malformed == ""
    assert [(kind, flags, seq) for kind, flags, seq, _, _ in frames] == [
        (16, NLM_F_MULTI, 7), (16, NLM_F_MULTI, 7), (NLMSG_DONE, NLM_F_MULTI, 7),
    ]  # fmt: skip
    assert bodies(data)[:2] == [(16, b"abc"), (16, b"defgh")]


def test_an_error_message_carries_its_code_and_an_ack_is_zero() -> None:
    refused = message(NLMSG_ERROR, struct.pack("=i", -1) + b"\0" * 16)
    ack = message(NLMSG_ERROR, struct.pack("=i", 0) + b"\0" * 16)
    frames, malformed = split(refused + ack)
    assert malformed == ""
    assert [nlsock.error_code(refused + ack, f) for f in frames] == [1, 0]


def test_an_error_message_without_its_code_is_malformed() -> None:
    frames, malformed = split(message(1) + message(NLMSG_ERROR, b"\0\0"))
    assert len(frames) == 1 and "has no code" in malformed


AFTER = message(16, b"after")  # a well-formed message that must not be read


@pytest.mark.parametrize(
    ("tail", "why"),
    [
        (b"\x10\0\0\0\x10\0", "6 stray bytes at byte 20"),  # a header cut short
        (nlsock.HEADER.pack(200, 16, 0, 0, 0) + AFTER, "length 200 at byte 20 does not fit"),
        (nlsock.HEADER.pack(8, 16, 0, 0, 0) + AFTER, "length 8 at byte 20"),  # under a header
        (nlsock.HEADER.pack(0, 16, 0, 0, 0) + AFTER, "length 0 at byte 20"),  # would loop forever
    ],
)
def test_a_broken_frame_skips_the_rest_of_the_datagram_only(tail: bytes, why: str) -> None:
    frames, malformed = split(message(16, b"link") + tail)
    assert [(kind, start, end) for kind, _, _, start, end in frames] == [(16, 16, 20)]
    assert why in malformed


@given(st.binary(max_size=200))
def test_random_bytes_never_raise_and_frames_stay_inside(data: bytes) -> None:
    frames, malformed = split(data)
    for kind, _, _, start, end in frames:
        assert nlsock.HEADER.size <= start <= end <= len(data)
        if kind == NLMSG_ERROR:
            nlsock.error_code(data, (kind, 0, 0, start, end))
    assert malformed or not data or frames


def test_the_first_malformation_is_logged_then_only_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen = Malformations("netlink")
    with caplog.at_level(logging.WARNING):
        for reason in ("stray bytes", "truncated", "truncated"):
            seen.note(reason)
    assert (seen.count, seen.last) == (3, "truncated")
    assert [r.getMessage() for r in caplog.records] == [
        "netlink: skipped a malformed netlink datagram (stray bytes); later ones are only counted"
    ]


def test_each_reader_applies_the_policy_in_its_own_terms() -> None:
    broken = message(netlink.RTM_NEWLINK, b"\0" * 16) + b"\xff" * 7
    # netlink: the datagram refused whole; its source then reads the state again.
    with pytest.raises(nlsock.Malformed, match="stray bytes"):
        netlink.decode(broken)
    # nftmonitor: what came before stands, then an Unreadable (a kernel check).
    gen = message((nftmonitor.NFNL_SUBSYS_NFTABLES << 8) | nftmonitor.NFT_MSG_NEWGEN, b"\0" * 4)
    notices = nftmonitor.decode(gen + b"\xff" * 7)
    assert notices == [
        nftmonitor.Generation(0, ""),
        nftmonitor.Unreadable("7 stray bytes at byte 20"),
    ]


def test_a_socket_is_closed_when_it_cannot_be_set_up() -> None:
    with pytest.raises(OSError):
        nlsock.open_socket(12, memberships=(-1,))  # no such group
