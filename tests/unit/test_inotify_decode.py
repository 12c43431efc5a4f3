"""inotify.py's pure part: the kernel's records, and which paths they touch."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tailsfw import inotify
from tailsfw.inotify import InotifyEvent, WatchLost, decode, touched


def record(wd: int, mask: int, name: bytes = b"", cookie: int = 0, pad: int = 16) -> bytes:
    padded = name + b"\0" * (-len(name) % pad or (pad if name else 0))
    return struct.pack("=iIII", wd, mask, cookie, len(padded)) + padded


def test_decode_records_with_and_without_names() -> None:
    buf = (
        record(1, inotify.IN_MODIFY, b"resolv.conf")
        + record(1, inotify.IN_MOVED_TO, b"passwd", cookie=7)
        + record(2, inotify.IN_DELETE_SELF)
        + record(-1, inotify.IN_Q_OVERFLOW)
    )
    assert decode(buf) == [
        InotifyEvent(1, inotify.IN_MODIFY, 0, "resolv.conf"),
        InotifyEvent(1, inotify.IN_MOVED_TO, 7, "passwd"),
        InotifyEvent(2, inotify.IN_DELETE_SELF, 0, ""),
        InotifyEvent(-1, inotify.IN_Q_OVERFLOW, 0, ""),
    ]


def test_decode_keeps_undecodable_names_distinct() -> None:
    (event,) = decode(record(1, inotify.IN_CREATE, b"resolv.conf\xff"))
    assert event.name != "resolv.conf" and event.name.startswith("resolv.conf")


def test_decode_empty() -> None:
    assert decode(b"") == []


@pytest.mark.parametrize("keep", [1, 15, 17, 31])  # a record here is 32 bytes
def test_decode_refuses_truncated_buffers(keep: int) -> None:
    buf = record(1, inotify.IN_MODIFY, b"resolv.conf")
    assert len(buf) == 32
    with pytest.raises(ValueError, match="inotify"):
        decode(buf[:keep])


WATCHED = {(1, "resolv.conf"): Path("/etc/resolv.conf"), (1, "x.conf"): Path("/etc/x.conf")}


def ev(wd: int, mask: int, name: str = "") -> InotifyEvent:
    return InotifyEvent(wd, mask, 0, name)


def test_touched_only_the_watched_names() -> None:
    events = [ev(1, inotify.IN_MODIFY, "hosts"), ev(1, inotify.IN_MOVED_TO, "resolv.conf"),
              ev(2, inotify.IN_MODIFY, "x.conf")]  # fmt: skip
    assert touched(events, WATCHED) == {Path("/etc/resolv.conf")}


def test_overflow_touches_everything() -> None:
    events = [ev(1, inotify.IN_MODIFY, "hosts"), ev(-1, inotify.IN_Q_OVERFLOW)]
    assert touched(events, WATCHED) == set(WATCHED.values())


@pytest.mark.parametrize(
    "mask", [inotify.IN_DELETE_SELF, inotify.IN_MOVE_SELF, inotify.IN_UNMOUNT, inotify.IN_IGNORED]
)
def test_a_directory_that_goes_away_is_lost(mask: int) -> None:
    with pytest.raises(WatchLost):
        touched([ev(1, mask)], WATCHED)
