"""The network namespaces' files, as `ip netns add` makes them in /run/netns:
which are there (with their identities), and entering one from a thread.

setns() moves the calling thread only: the work inside a namespace runs in
short-lived threads (`in_threads`), so that the caller's thread (the
daemon's loop, tailsfwctl's main thread) never leaves its own namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, TypeVar

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int
T = TypeVar("T")
R = TypeVar("R")


class NetnsId(NamedTuple):
    """A namespace file's identity: its device and inode, and the watch's
    serial of the event that made its name.  The kernel hands a freed
    namespace's inode to the next one made, so (dev, inode) alone can name
    two namespaces in turn; `birth` tells them apart (0: not followed)."""

    dev: int
    ino: int
    birth: int = 0


class ChangedError(RuntimeError):
    """The namespace file is not the namespace it was when it was listed."""


def present(directory: Path, prefix: str = "") -> tuple[dict[str, NetnsId], bool]:
    """name -> (dev, inode) of each namespace file in `directory` whose name
    starts with `prefix` (stripped), and whether an entry is not one yet.

    A namespace file is on nsfs (the device of our own namespace's file);
    `ip netns add` first makes an empty file on tmpfs, then mounts the
    namespace on it, and the mount makes no inotify event: such an entry is
    said to be pending, and looked at again shortly.
    """
    found: dict[str, NetnsId] = {}
    pending = False
    try:
        nsfs = os.stat("/proc/self/ns/net").st_dev
        entries = os.listdir(directory)
    except OSError:
        return found, pending
    for entry in entries:
        if not entry.startswith(prefix):
            continue
        try:
            st = os.stat(directory / entry, follow_symlinks=False)
        except OSError:
            continue
        if st.st_dev == nsfs and stat.S_ISREG(st.st_mode):
            found[entry[len(prefix) :]] = NetnsId(st.st_dev, st.st_ino)
        elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
            pending = True
    return found, pending


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


@contextlib.contextmanager
def entered(path: Path, identity: NetnsId | None = None) -> Iterator[None]:
    """The calling thread inside the namespace at `path` (checked to still
    be `identity`, when given), and back home after."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if identity is not None and (st.st_dev, st.st_ino) != identity[:2]:
            raise ChangedError(f"{path} is another namespace than the one listed")
        _setns(fd)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(fd)
        os.close(home)


def in_threads(work: Callable[[T], R], items: Sequence[T]) -> list[R | Exception]:
    """`work(item)` for each item, each in a thread of its own (which may
    enter a namespace: the caller's thread never does), all joined at once;
    each result, or the exception it raised."""
    results: list[R | Exception] = [RuntimeError("not run")] * len(items)

    def run(i: int) -> None:
        try:
            results[i] = work(items[i])
        except Exception as e:  # handed back, named by the caller
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results
