"""tailsfw/safefile.py and its users on real files in temp directories.

Hostile programs as issue 18 found them: a hard link to a decoy standing
for /etc/shadow, a read lease that would stall an open for 45 s, a FIFO or a
symlink at the status file's temporary name, a umask of 000, FIFOs and
devices where a file is read.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tailsfw import safefile
from tailsfw.accounts import read_passwd
from tailsfw.policy import PolicyError
from tailsfw.policy import read as read_policy
from tailsfw.resolv import TOR_RESOLV_TEXT, NotRight, ResolvFiles, resolv_texts, write_in_place
from tailsfw.status import write_status
from tests.files import SERVERS, holds, leased
from tests.unit.test_status_view import STATUS

DECOY_TEXT = "root:*:19000:0:99999:7:::\n"
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="chown to another owner needs root")


def finishes_within(seconds: float, call: Callable[[], object]) -> object:
    """`call()`'s result (or exception); AssertionError if it has not returned in
    time (it is left to end on its own thread: a stalled open cannot be cut)."""
    box: list[object] = []

    def run() -> None:
        try:
            box.append(call())
        except Exception as e:
            box.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert box, f"still blocked after {seconds} s"
    return box[0]


def decoy(tmp_path: Path) -> Path:
    """A file standing for /etc/shadow: root:42 (if we are root), 0640."""
    path = tmp_path / "shadow"
    path.write_text(DECOY_TEXT)
    path.chmod(0o640)
    if ROOT:
        os.chown(path, 0, 42)
    return path


# -- writing: never through a link, never waiting ------------------------------


def test_a_hard_link_is_replaced_never_written_through(tmp_path: Path) -> None:
    shadow = decoy(tmp_path)
    before = shadow.stat()
    resolv = tmp_path / "resolv.conf"
    os.link(shadow, resolv)
    assert write_in_place(resolv, TOR_RESOLV_TEXT)
    assert holds(resolv, TOR_RESOLV_TEXT)
    after = shadow.stat()
    assert shadow.read_text() == DECOY_TEXT
    assert (stat.S_IMODE(after.st_mode), after.st_uid, after.st_gid) == (
        0o640, before.st_uid, before.st_gid,
    )  # fmt: skip
    assert after.st_nlink == 1 and resolv.stat().st_ino != after.st_ino


@needs_root
def test_a_file_owned_by_another_user_is_replaced(tmp_path: Path) -> None:
    theirs = tmp_path / "resolv.conf"
    theirs.write_text("nameserver 203.0.113.53\n")
    os.chown(theirs, 65534, 65534)
    inode = theirs.stat().st_ino
    kept = safefile.keep(theirs, TOR_RESOLV_TEXT.encode(), 0o644)
    assert kept.replaced == "a file owned by uid 65534"
    assert holds(theirs, TOR_RESOLV_TEXT) and theirs.stat().st_ino != inode
    assert theirs.stat().st_uid == 0


def test_a_right_file_is_kept_in_place(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 203.0.113.53\n")
    inode = path.stat().st_ino
    assert safefile.keep(path, TOR_RESOLV_TEXT.encode(), 0o644) == safefile.REWRITTEN
    assert path.stat().st_ino == inode and holds(path, TOR_RESOLV_TEXT)
    assert safefile.keep(path, TOR_RESOLV_TEXT.encode(), 0o644) == safefile.UNCHANGED


def test_a_lease_fails_at_once_and_the_next_try_succeeds(tmp_path: Path) -> None:
    """Without O_NONBLOCK the open for writing waits the lease-break time
    (45 s): the loop would stall.  The converge must fail at once, naming
    the file, and succeed once the lease is gone."""
    etc = tmp_path / "etc"
    etc.mkdir()
    files = ResolvFiles(etc / "resolv.conf", etc / "resolv-over-clearnet.conf")
    files.rewrite(resolv_texts(SERVERS))
    files.resolv_conf.chmod(0o600)  # to be put right: the file must be opened for writing
    with leased(files.resolv_conf) as release:
        started = time.monotonic()
        outcome = finishes_within(2.0, lambda: files.rewrite(resolv_texts(SERVERS)))
        assert time.monotonic() - started < 0.5
        assert isinstance(outcome, NotRight), outcome
        assert f"{files.resolv_conf}: under another process's lease" in str(outcome)
        release.send("go")
    assert files.rewrite(resolv_texts(SERVERS)) == [str(files.resolv_conf)]
    assert holds(files.resolv_conf, TOR_RESOLV_TEXT)


# -- the status file -----------------------------------------------------------


def status_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "status.json"


def test_the_status_modes_are_explicit_whatever_the_umask(tmp_path: Path) -> None:
    path = status_path(tmp_path)
    old = os.umask(0)
    try:
        write_status(path, STATUS)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    path.parent.chmod(0o777)  # left so by someone: put right at the next write
    write_status(path, STATUS)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755


@pytest.mark.parametrize("plant", ["fifo", "symlink"])
def test_nothing_at_a_temporary_name_is_opened(tmp_path: Path, plant: str) -> None:
    """A FIFO blocked the writer until read; a symlink aimed it at a decoy."""
    path = status_path(tmp_path)
    path.parent.mkdir()
    shadow = decoy(tmp_path)
    for name in ("status.json.tmp", ".status.json.tmp", "status.json~"):
        planted = path.with_name(name)
        if plant == "fifo":
            os.mkfifo(planted)
        else:
            planted.symlink_to(shadow)
    outcome = finishes_within(2.0, lambda: write_status(path, STATUS))
    assert outcome is None
    assert shadow.read_text() == DECOY_TEXT and stat.S_IMODE(shadow.stat().st_mode) == 0o640
    assert stat.S_ISREG(path.lstat().st_mode)
    leftovers = [p.name for p in path.parent.iterdir() if ".tailsfw-" in p.name]
    assert leftovers == []


def test_a_symlink_as_the_state_directory_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "state").symlink_to(elsewhere)
    with pytest.raises(safefile.Refused, match="a symlink, not a directory"):
        write_status(status_path(tmp_path), STATUS)
    assert list(elsewhere.iterdir()) == []


# -- reading: bounded, regular files only, never waiting -------------------------


@pytest.mark.parametrize(
    ("plant", "why"),
    [
        (lambda p: os.mkfifo(p), "not a regular file (a FIFO)"),
        (lambda p: p.symlink_to("/dev/zero"), "not a regular file (a character device)"),
        (lambda p: p.mkdir(), "not a regular file (a directory)"),
    ],
    ids=["fifo", "dev-zero", "directory"],
)
def test_read_regular_refuses_what_is_not_a_file(
    tmp_path: Path, plant: Callable[[Path], None], why: str
) -> None:
    path = tmp_path / "passwd"
    plant(path)
    outcome = finishes_within(2.0, lambda: safefile.read_regular(path, 1024))
    assert isinstance(outcome, safefile.Refused) and str(outcome) == f"{path}: {why}"


def test_read_regular_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "big"
    with open(path, "wb") as f:
        f.truncate(1 << 30)  # a sparse 1 GB file: nothing of it is read
    with pytest.raises(safefile.TooLarge):
        safefile.read_regular(path, 1024)
    path.write_bytes(b"x" * 1024)
    assert safefile.read_regular(path, 1024) == b"x" * 1024


def test_the_policy_and_passwd_readers_share_it(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(PolicyError, match=r"fifo: not a regular file \(a FIFO\)"):
        read_policy(fifo)
    with pytest.raises(safefile.Refused, match=r"not a regular file \(a FIFO\)"):
        read_passwd(fifo)
    assert read_passwd(tmp_path / "missing") == b""
