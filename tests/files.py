"""Kept files under test: a tiny restore loop, the ways others tamper, and a stopwatch.

Shared by tests/local (temp directories, no root), tests/lab and
bench/resolv.py.  `RestoreLoop` runs what the daemon will run
(`ResolvWatch` events -> `ResolvFiles.rewrite`) on an asyncio loop in a
thread; `TAMPERINGS` are what another root program may do to a file;
`time_until` watches the file from outside, as any reader would.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import multiprocessing
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType

from tailsfw.resolv import (
    TOR_RESOLV_TEXT,
    NotRight,
    ResolvFiles,
    ResolvWatch,
    render_clearnet,
    resolv_texts,
)

SERVERS = (ipaddress.IPv4Address("192.168.77.1"), ipaddress.IPv4Address("10.0.0.53"))
POLL = 0.0001  # seconds between two looks at the file
F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)


class RestoreLoop:
    """`ResolvWatch` -> `ResolvFiles.rewrite`, on its own thread, until closed."""

    def __init__(self, files: ResolvFiles, servers: tuple[ipaddress.IPv4Address, ...]) -> None:
        self.files = files
        self.servers = servers
        self.rewrites: list[str] = []
        self.errors: list[NotRight] = []
        self.events = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        with contextlib.suppress(asyncio.CancelledError):
            watch = ResolvWatch([self.files.resolv_conf, self.files.clearnet_conf])
            async for _ in watch.events():
                self.events += 1
                try:
                    self.rewrites += self.files.rewrite(resolv_texts(self.servers))
                except NotRight as e:
                    self.errors.append(e)
                self._ready.set()

    def __enter__(self) -> RestoreLoop:
        self._thread.start()
        if not self._ready.wait(5):
            raise TimeoutError("the restore loop did not start")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._loop is not None and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(5)


def holds(path: Path, text: str) -> bool:
    """`path` is a regular file (not a symlink) of mode 0644 holding exactly `text`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != 0o644:
            return False
        return os.read(fd, len(text) + 2) == text.encode()
    finally:
        os.close(fd)


def time_until(check: Callable[[], bool], timeout: float = 2.0) -> float:
    """Milliseconds until `check()` holds; TimeoutError after `timeout` seconds."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"not done after {timeout} s")
        time.sleep(POLL)
    return (time.monotonic() - start) * 1000


def edit(path: Path) -> None:
    with open(path, "w") as f:
        f.write("nameserver 203.0.113.53\n")


def append(path: Path) -> None:
    with open(path, "a") as f:
        f.write("nameserver 203.0.113.53\n")


def replace_by_rename(path: Path) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text("nameserver 203.0.113.53\n")
    os.replace(tmp, path)


def delete(path: Path) -> None:
    path.unlink()


def replace_by_symlink(path: Path) -> None:
    target = path.with_name(path.name + ".target")
    target.write_text("nameserver 203.0.113.53\n")
    link = path.with_name(path.name + ".link")
    link.unlink(missing_ok=True)
    link.symlink_to(target)
    os.replace(link, path)


def chmod(path: Path) -> None:
    path.chmod(0o600)


TAMPERINGS: dict[str, Callable[[Path], None]] = {
    "edit": edit,
    "append": append,
    "rename": replace_by_rename,
    "delete": delete,
    "symlink": replace_by_symlink,
    "chmod": chmod,
}


def kept(etc: Path) -> dict[Path, str]:
    """The files a restore loop over `etc` keeps, and the text each must hold."""
    return {
        etc / "resolv.conf": TOR_RESOLV_TEXT,
        etc / "resolv-over-clearnet.conf": render_clearnet(SERVERS),
    }


@contextlib.contextmanager
def restore_loop(etc: Path) -> Iterator[RestoreLoop]:
    """A restore loop over `etc`/resolv.conf and `etc`/resolv-over-clearnet.conf."""
    files = ResolvFiles(*kept(etc))
    with RestoreLoop(files, SERVERS) as loop:
        yield loop


def hold_lease(path: Path, ready: Connection, release: Connection) -> None:
    """A process holding a read lease on `path` until told to let it go."""
    import signal

    signal.signal(signal.SIGIO, lambda *_: None)  # the break notice: noted, not obeyed
    fd = os.open(path, os.O_RDONLY)
    fcntl.fcntl(fd, F_SETLEASE, fcntl.F_RDLCK)
    ready.send("held")
    release.recv()
    fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)
    os.close(fd)


@contextlib.contextmanager
def leased(path: Path) -> Iterator[Connection]:
    """`path` under a read lease held by a child; send anything to release it."""
    context = multiprocessing.get_context("fork")
    ready_in, ready_out = context.Pipe()
    release_in, release_out = context.Pipe()
    child = context.Process(target=hold_lease, args=(path, ready_out, release_in), daemon=True)
    child.start()
    try:
        assert ready_in.poll(5) and ready_in.recv() == "held"
        yield release_out
    finally:
        if child.is_alive():
            release_out.send("go")
        child.join(5)
        if child.is_alive():
            child.kill()
            child.join()
