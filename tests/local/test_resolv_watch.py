"""The resolver files on a real filesystem with real inotify, in temp directories (no root).

The loop under test is what the daemon runs: `ResolvWatch` events ->
`ResolvFiles.rewrite`.  Every tampering must be undone within 100 ms.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tailsfw.events import FileChanged
from tailsfw.resolv import (
    TOR_RESOLV_TEXT,
    NotRight,
    ResolvFiles,
    ResolvWatch,
    resolv_texts,
    write_in_place,
)
from tests.files import SERVERS, TAMPERINGS, holds, kept, restore_loop, time_until

CLEARNET_TEXT = "nameserver 192.168.77.1\nnameserver 10.0.0.53\n"
TARGET_MS = 100.0


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    path = tmp_path / "etc"
    path.mkdir()
    return path


def test_start_writes_both_files(etc: Path) -> None:
    with restore_loop(etc):
        time_until(lambda: holds(etc / "resolv.conf", TOR_RESOLV_TEXT))
        time_until(lambda: holds(etc / "resolv-over-clearnet.conf", CLEARNET_TEXT))


@pytest.mark.parametrize("name", ["resolv.conf", "resolv-over-clearnet.conf"])
@pytest.mark.parametrize("tamper", sorted(TAMPERINGS))
def test_tampering_is_undone_within_100ms(etc: Path, name: str, tamper: str) -> None:
    path = etc / name
    text = kept(etc)[path]
    with restore_loop(etc) as loop:
        time_until(lambda: holds(path, text))
        times = []
        for _ in range(5):
            TAMPERINGS[tamper](path)
            times.append(time_until(lambda: holds(path, text)))
        assert not loop.errors
    assert max(times) < TARGET_MS, times
    assert not (etc / f"{name}.target").is_symlink()  # the symlink's target was not written
    leftovers = sorted(p.name for p in etc.iterdir() if ".tailsfw-" in p.name)
    assert leftovers == []


def test_restore_keeps_the_inode_of_an_edited_file(etc: Path) -> None:
    """A bind mount of the clearnet file sees the restore only if the inode stays."""
    path = etc / "resolv-over-clearnet.conf"
    with restore_loop(etc):
        time_until(lambda: holds(path, CLEARNET_TEXT))
        inode = path.stat().st_ino
        for tamper in ("edit", "append", "chmod"):
            TAMPERINGS[tamper](path)
            time_until(lambda: holds(path, CLEARNET_TEXT))
            assert path.stat().st_ino == inode


def test_our_own_writes_do_not_feed_back(etc: Path) -> None:
    with restore_loop(etc) as loop:
        time_until(lambda: holds(etc / "resolv.conf", TOR_RESOLV_TEXT))
        TAMPERINGS["edit"](etc / "resolv.conf")
        time_until(lambda: holds(etc / "resolv.conf", TOR_RESOLV_TEXT))
        time.sleep(0.05)  # the events of our own restore arrive and find nothing to do
        settled = (loop.events, list(loop.rewrites))
        time.sleep(0.2)
        assert (loop.events, loop.rewrites) == settled
    # The start, the edit; and once more when the restore fell between the
    # edit's two steps (open with O_TRUNC, then write).
    assert loop.rewrites.count(str(etc / "resolv.conf")) in (2, 3)


def test_other_files_in_the_directory_are_ignored(etc: Path) -> None:
    async def run() -> list[FileChanged]:
        watch = ResolvWatch([etc / "resolv.conf"])
        events = watch.events()
        seen = [await anext(events)]  # the whole state, at start
        (etc / "hosts").write_text("127.0.0.1 localhost\n")
        (etc / "resolv.conf").write_text("x\n")
        seen.append(await asyncio.wait_for(anext(events), 1))
        return seen

    assert asyncio.run(run()) == [FileChanged(etc / "resolv.conf")] * 2


def test_a_missing_directory_is_waited_for(tmp_path: Path) -> None:
    etc = tmp_path / "etc"

    async def run() -> FileChanged:
        events = ResolvWatch([etc / "resolv.conf"]).events()
        first = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.2)
        assert not first.done()
        etc.mkdir()
        event = await asyncio.wait_for(first, 2)
        return event

    assert asyncio.run(run()) == FileChanged(etc / "resolv.conf")


def test_a_directory_replaced_is_watched_again(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    path = etc / "resolv.conf"

    async def run() -> list[FileChanged]:
        events = ResolvWatch([path]).events()
        seen = [await anext(events)]
        etc.rename(tmp_path / "old")
        etc.mkdir()
        seen.append(await asyncio.wait_for(anext(events), 2))  # watched again: everything
        path.write_text("x\n")
        seen.append(await asyncio.wait_for(anext(events), 2))
        return seen

    assert asyncio.run(run()) == [FileChanged(path)] * 3


@pytest.mark.parametrize(
    "plant",
    [
        lambda p: os.mkfifo(p),
        lambda p: p.symlink_to(p.with_name("elsewhere")),
        lambda p: p.symlink_to("/dev/null"),
    ],
    ids=["fifo", "dangling-symlink", "symlink-to-device"],
)
def test_write_replaces_what_is_not_a_regular_file(
    etc: Path, plant: Callable[[Path], None]
) -> None:
    path = etc / "resolv.conf"
    plant(path)
    assert write_in_place(path, TOR_RESOLV_TEXT)
    assert holds(path, TOR_RESOLV_TEXT)
    assert not (etc / "elsewhere").exists()


def test_write_refuses_a_directory_naming_it(etc: Path) -> None:
    (etc / "resolv.conf").mkdir()
    with pytest.raises(IsADirectoryError, match=r"resolv\.conf"):
        write_in_place(etc / "resolv.conf", TOR_RESOLV_TEXT)


def test_write_only_when_the_text_differs(etc: Path) -> None:
    path = etc / "resolv.conf"
    assert write_in_place(path, TOR_RESOLV_TEXT)
    before = path.stat()
    assert not write_in_place(path, TOR_RESOLV_TEXT)
    assert path.stat().st_mtime_ns == before.st_mtime_ns
    path.write_text(TOR_RESOLV_TEXT + "options rotate\n")  # a longer file with our text first
    assert write_in_place(path, TOR_RESOLV_TEXT)
    assert path.read_text() == TOR_RESOLV_TEXT
    assert path.stat().st_ino == before.st_ino


def test_created_with_mode_0644_whatever_the_umask(etc: Path) -> None:
    old = os.umask(0o077)
    try:
        write_in_place(etc / "resolv.conf", TOR_RESOLV_TEXT)
    finally:
        os.umask(old)
    assert stat.S_IMODE((etc / "resolv.conf").stat().st_mode) == 0o644


def test_converge_is_idempotent_and_names_what_it_rewrote(etc: Path) -> None:
    files = ResolvFiles(etc / "resolv.conf", etc / "resolv-over-clearnet.conf")
    assert files.rewrite(resolv_texts(SERVERS)) == [
        str(files.resolv_conf),
        str(files.clearnet_conf),
    ]
    assert files.rewrite(resolv_texts(SERVERS)) == []
    files.forget()
    assert files.rewrite(resolv_texts(SERVERS)) == []
    assert files.rewrite(resolv_texts(SERVERS[:1])) == [str(files.clearnet_conf)]
    assert files.clearnet_conf.read_text() == "nameserver 192.168.77.1\n"
    assert files.rewrite(resolv_texts(())) == [str(files.clearnet_conf)]
    assert files.clearnet_conf.read_text() == ""
    files.clearnet_conf.write_text("nameserver 10.0.0.53\n")
    files.resolv_conf.write_text("nameserver 203.0.113.53\n")
    assert files.rewrite(resolv_texts(None)) == [str(files.resolv_conf)]  # servers not known yet
    assert files.clearnet_conf.read_text() == "nameserver 10.0.0.53\n"


def test_converge_writes_resolv_conf_even_when_the_clearnet_file_fails(etc: Path) -> None:
    files = ResolvFiles(etc / "resolv.conf", etc / "resolv-over-clearnet.conf")
    files.clearnet_conf.mkdir()
    with pytest.raises(NotRight, match=r"resolv-over-clearnet\.conf: a directory is in the way"):
        files.rewrite(resolv_texts(SERVERS))
    assert holds(files.resolv_conf, TOR_RESOLV_TEXT)


def test_a_queue_overflow_reports_every_path(etc: Path) -> None:
    """More events than the kernel queues (fs.inotify.max_queued_events, read
    only here) while the watcher is not reading: the watched paths are
    reported although none of their own events was kept."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    paths = [etc / "resolv.conf", etc / "resolv-over-clearnet.conf"]

    async def run() -> list[FileChanged]:
        events = ResolvWatch(paths).events()
        seen = [await anext(events), await anext(events)]  # the whole state, at start
        others = [etc / "a", etc / "b"]
        for other in others:
            other.touch()
        # Not awaiting, the watcher cannot read meanwhile; the two names take
        # turns, so the kernel cannot merge an event with the one before.
        for i in range(limit + 10):
            os.chmod(others[i % 2], 0o600)
        seen += [await asyncio.wait_for(anext(events), 2) for _ in paths]
        return seen

    assert asyncio.run(run()) == [FileChanged(p) for p in paths] * 2
