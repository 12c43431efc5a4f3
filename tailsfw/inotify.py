"""A thin asyncio inotify, and a watcher of named paths through their directories.

`decode` (pure) turns the kernel's event records into `InotifyEvent`s;
`Inotify` owns the descriptor (libc's inotify_init1/inotify_add_watch through
ctypes: the standard library has no binding, and this is all a watcher
needs); `watch_paths` follows a few files by watching their parent
directories, so an edit, a chmod or chown, a replacement by rename, a
deletion or a symlink put in a file's place are all seen.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import struct
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

# From linux/inotify.h.
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

# What happens to a directory's entries that can change what a path holds.
# Not IN_CLOSE_WRITE: a file opened for writing and closed unchanged would
# wake us (and our own check opens it so); IN_MODIFY sees every write.
CHILD_EVENTS = IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
# The watched directory itself went away or moved: the watch no longer
# stands for the path, which must be watched again.
LOST_EVENTS = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED
DIR_MASK = CHILD_EVENTS | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR

HEADER = struct.Struct("=iIII")  # struct inotify_event: wd, mask, cookie, len
# Many events per read(); the kernel never splits one across reads, and a
# buffer this size always holds at least one (NAME_MAX is 255).
READ_SIZE = 64 * 1024


@dataclass(frozen=True)
class InotifyEvent:
    wd: int
    mask: int
    cookie: int
    name: str  # the entry's name inside a watched directory, "" for the directory itself


def decode(buf: bytes) -> list[InotifyEvent]:
    """The records of one read(); ValueError if the buffer does not hold whole records."""
    events = []
    offset = 0
    while offset < len(buf):
        if len(buf) - offset < HEADER.size:
            raise ValueError(f"inotify: truncated record header at byte {offset}")
        wd, mask, cookie, length = HEADER.unpack_from(buf, offset)
        offset += HEADER.size
        if length > len(buf) - offset:
            raise ValueError(f"inotify: record name of {length} bytes overruns the buffer")
        # The name is NUL-padded to an alignment boundary.
        raw = buf[offset : offset + length].split(b"\0", 1)[0]
        offset += length
        events.append(InotifyEvent(wd, mask, cookie, os.fsdecode(raw)))
    return events


_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_init1.restype = ctypes.c_int
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_add_watch.restype = ctypes.c_int


def _check(result: int, what: str, path: Path | None = None) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}", None if path is None else str(path))
    return result


class Inotify:
    """One inotify descriptor, read through the running asyncio loop."""

    def __init__(self) -> None:
        self.fd = _check(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC), "inotify_init1")

    def add_watch(self, path: Path, mask: int) -> int:
        return _check(
            _libc.inotify_add_watch(self.fd, os.fsencode(path), mask), "inotify_add_watch", path
        )

    async def read(self) -> list[InotifyEvent]:
        """Wait until events are queued, then take every one of them."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                return decode(self._drain())
            except BlockingIOError:
                pass
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(self.fd, _settle, ready)
            try:
                await ready
            finally:
                loop.remove_reader(self.fd)

    def _drain(self) -> bytes:
        chunks = [os.read(self.fd, READ_SIZE)]
        while True:
            try:
                chunks.append(os.read(self.fd, READ_SIZE))
            except BlockingIOError:
                return b"".join(chunks)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Inotify:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _settle(ready: asyncio.Future[None]) -> None:
    # The reader is level-triggered: it may fire again before it is removed.
    if not ready.done():
        ready.set_result(None)


class WatchLost(OSError):
    """A watched directory was deleted, moved or unmounted."""


def touched(
    events: Iterable[InotifyEvent], watched: dict[tuple[int, str], Path]
) -> frozenset[Path]:
    """The watched paths these events may have changed (pure).

    `watched` maps (watch descriptor, entry name) to the path.  A queue
    overflow means events were lost: every path may have changed.
    """
    hit = set()
    for event in events:
        if event.mask & IN_Q_OVERFLOW:
            return frozenset(watched.values())
        if event.wd >= 0 and event.mask & LOST_EVENTS and not event.name:
            raise WatchLost(errno.ENOENT, "a watched directory went away")
        path = watched.get((event.wd, event.name))
        if path is not None:
            hit.add(path)
    return frozenset(hit)


async def watch_paths(
    paths: Sequence[Path], retry: float = 0.05, retry_max: float = 5.0
) -> AsyncIterator[frozenset[Path]]:
    """Sets of paths that may have changed, from their directories' events.

    Every path is reported once when the watch is set up (and again after
    any gap: a queue overflow, a directory that went away), so a reader
    that re-reads what it is told about never misses a change.  A directory
    that cannot be watched (missing, no inotify left) is retried with a
    growing delay, and until every directory can be watched none is
    followed (the kept files all live in /etc); this never raises for such
    failures.
    """
    everything = frozenset(paths)
    delay = retry
    while True:
        try:
            with Inotify() as inotify:
                watched = {
                    (inotify.add_watch(path.parent, DIR_MASK), path.name): path for path in paths
                }
                delay = retry
                yield everything
                while True:
                    hit = touched(await inotify.read(), watched)
                    if hit:
                        yield hit
        except WatchLost:
            log.warning("inotify: a watched directory of %s went away: watching again",
                        ", ".join(map(str, paths)))  # fmt: skip
        except (OSError, ValueError) as e:  # ValueError: a record we cannot decode
            log.error("inotify: %s: retrying in %.2f s", e, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, retry_max)
