"""accounts.py's pure part: passwd text -> uids, strictly, never a uid glibc would not give."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tailsfw.accounts import MAX_UID
from tailsfw.accounts import parse_passwd as parse_all

ASKED = ("amnesia", "debian-tor", "clearnet")


def parse_passwd(data: bytes, asked: tuple[str, ...] | list[str]) -> dict[str, int]:
    """The database's uids of the `asked` accounts, as the policy picks them."""
    return {name: uid for name, uid in parse_all(data).items() if name in asked}


PASSWD = b"""root:x:0:0:root:/root:/bin/bash
debian-tor:x:107:114::/var/lib/tor:/bin/false
amnesia:x:1000:1000:amnesia,,,:/home/amnesia:/bin/bash
other:x:1001:1001::/home/other:/bin/sh
"""


def test_the_whole_database_in_its_order() -> None:
    assert list(parse_all(PASSWD).items()) == [
        ("root", 0), ("debian-tor", 107), ("amnesia", 1000), ("other", 1001)
    ]  # fmt: skip
    assert parse_passwd(PASSWD, ASKED) == {"debian-tor": 107, "amnesia": 1000}


def test_empty_and_absent() -> None:
    assert parse_passwd(b"", ASKED) == {}
    assert parse_passwd(PASSWD, []) == {}


def test_blank_lines_comments_leading_blanks_crlf_and_colons_in_the_shell() -> None:
    text = b"\n# amnesia:x:5:5::/:/bin/sh\n  \t amnesia:x:1000:1000::/home/amnesia:/bin/a:b\r\n"
    assert parse_passwd(text, ASKED) == {"amnesia": 1000}


def test_the_first_line_decides() -> None:
    assert parse_passwd(b"amnesia:x:1000:1000::/:/bin/sh\namnesia:x:0:0::/:/bin/sh\n", ASKED) == {
        "amnesia": 1000
    }


def test_a_malformed_first_line_is_not_overridden_by_a_later_one() -> None:
    """glibc would give the first line's (odd) uid or none: never the second's."""
    for first in (
        b"amnesia:x: 1000:1000::/:/bin/sh",
        b"amnesia:x:+1000:1000::/:/bin/sh",
        b"amnesia:x:1000",
        b"amnesia:x::1000::/:/bin/sh",
        b"amnesia:x:10\x0000:1000::/:/bin/sh",
        # glibc cuts a line at a NUL and skips it when what is left is no entry:
        # the second line's uid 0 would then be the system's (tests/local checks glibc).
        b"amnesia:x\x00:1000:1000::/:/bin/sh",
        b"amnesia:x:1000\x00:1000::/:/bin/sh",
        b"amnesia:x:1000:1000:gecos\x00:/:/bin/sh",
        b"amnesia",
    ):
        assert parse_passwd(first + b"\namnesia:x:0:0::/:/bin/sh\n", ASKED) == {}, first


def test_uids_out_of_range_or_not_decimal() -> None:
    for uid in (b"4294967295", b"4294967296", b"9" * 5000, b"0x10", b"1e3", b"\xd9\xa1", b"-1"):
        line = b"amnesia:x:" + uid + b":1000::/:/bin/sh\n"
        assert parse_passwd(line, ASKED) == {}, uid
    assert parse_passwd(b"amnesia:x:4294967294:1::/:/bin/sh\n", ASKED) == {"amnesia": MAX_UID}
    assert parse_passwd(b"amnesia:x:007:1::/:/bin/sh\n", ASKED) == {"amnesia": 7}


def test_names_are_compared_exactly() -> None:
    text = b"Amnesia:x:1:1::/:/bin/sh\namnesia :x:2:2::/:/bin/sh\n+amnesia:x:3:3::/:/bin/sh\n"
    assert parse_passwd(text, ASKED) == {}
    assert parse_passwd("ämnesia:x:4:4::/:/bin/sh\n".encode(), ["ämnesia"]) == {"ämnesia": 4}


@given(st.binary(max_size=2000))
def test_never_raises_on_any_bytes(data: bytes) -> None:
    result = parse_all(data)
    assert all(0 <= uid <= MAX_UID for uid in result.values())


LINES = st.lists(st.sampled_from(PASSWD.splitlines(keepends=True)), max_size=8)


@given(LINES, st.binary(max_size=50))
def test_what_follows_the_deciding_line_changes_nothing(lines: list[bytes], junk: bytes) -> None:
    text = b"".join(lines)
    found = parse_passwd(text, ASKED)
    after = parse_passwd(text + b"\n" + junk, ASKED)
    assert {name: after.get(name) for name in found} == found
