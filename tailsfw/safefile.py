"""Local files, read and written as if every other program were hostile.

One place for what the daemon does to files it does not fully control
(`/etc`, its state directory) and for what it reads (the policy, passwd):

- `read_regular`: a regular file's bytes, bounded; opened non-blocking, so
  a FIFO, a device or a file under another process's lease never waits,
  and checked with fstat before any read.
- `replace`: a new regular file at a path by an atomic rename, from a
  temporary file made with O_CREAT|O_EXCL|O_NOFOLLOW under a random name
  (nothing that exists is ever opened for writing), with the mode and owner
  set explicitly whatever the umask.
- `keep`: make a path hold a text, in place (same inode) when it is safe
  to write through, by `replace` otherwise.
- `ensure_directory`: a directory of ours with an explicit mode.

Nothing here follows a symlink for writing, opens a path that exists to
create it, or waits for a lease: a lease held by another process makes the
open fail at once with BlockingIOError (EWOULDBLOCK), and the caller tries
again later instead of sleeping the kernel's lease-break time (45 s) on
the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

READ_CHUNK = 1 << 20


class Refused(OSError):
    """A file that is not what may be read or written here; str() says why."""

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


class TooLarge(Refused):
    """A file larger than the bound of what is read."""


def kind(mode: int) -> str:
    """What a file of this st_mode is, for a message ("a FIFO", ...)."""
    kinds = (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "not a file")


def read_regular(
    path: Path | str,
    limit: int,
    follow: bool = True,
    refusal: Callable[[os.stat_result], str | None] = lambda _: None,
) -> bytes:
    """The bytes of the regular file at `path`, at most `limit`.

    Raises FileNotFoundError if there is none, Refused if it is not a
    regular file (or `refusal` of its fstat says why not), TooLarge beyond
    `limit` bytes (also when it grows while read), BlockingIOError if
    another process holds a lease that the open would have to wait for,
    another OSError if it cannot be read (ELOOP: a symlink, when not
    `follow`).
    """
    nofollow = 0 if follow else os.O_NOFOLLOW
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | nofollow)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise Refused(errno.EINVAL, f"not a regular file ({kind(info.st_mode)})", str(path))
        if (why := refusal(info)) is not None:
            raise Refused(errno.EPERM, why, str(path))
        if info.st_size > limit:
            raise TooLarge(errno.EFBIG, f"{info.st_size} bytes, over {limit}", str(path))
        chunks = []
        left = limit + 1  # the file may grow after fstat
        while left > 0:
            chunk = os.read(fd, min(left, READ_CHUNK))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise TooLarge(errno.EFBIG, f"over {limit} bytes", str(path))
    return data


def _owner() -> tuple[int, int]:
    return os.geteuid(), os.getegid()


def _write_all(fd: int, data: bytes) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], done)


def _set_mode_and_owner(fd: int, info: os.stat_result, mode: int) -> bool:
    """fchmod/fchown what differs; True if something did."""
    changed = False
    if stat.S_IMODE(info.st_mode) != mode:
        os.fchmod(fd, mode)
        changed = True
    if (info.st_uid, info.st_gid) != _owner():
        os.fchown(fd, *_owner())
        changed = True
    return changed


def replace(path: Path, data: bytes, mode: int) -> None:
    """A new regular file at `path` holding `data`, `mode`, owned by us.

    Written to a temporary file that did not exist (random name,
    O_CREAT|O_EXCL|O_NOFOLLOW: a FIFO, symlink or file planted under any
    name we could pick is never opened), then renamed over whatever is at
    `path`: readers see the old entry or the new file, nothing between.
    """
    tmp = path.with_name(f".{path.name}.tailsfw-{os.urandom(8).hex()}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o600)
        try:
            _write_all(fd, data)
            _set_mode_and_owner(fd, os.fstat(fd), mode)  # the umask took bits away
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Kept:
    """What `keep` did: nothing, rewrote the file in place, or replaced it."""

    changed: bool
    replaced: str = ""  # why the file was replaced rather than written in place ("" if not)


UNCHANGED = Kept(False)
REWRITTEN = Kept(True)


def keep(path: Path, data: bytes, mode: int) -> Kept:
    """Make `path` a regular file of `mode`, ours, holding exactly `data`.

    Written in place (same inode: a bind mount of it sees the change) only
    when that cannot write through to another file: a regular file with one
    link, owned by us.  Anything else is replaced by `replace`: a symlink
    (never followed), a hard link (a link to /etc/shadow must not become our
    text), a file owned by another user, a FIFO, socket or device (never
    opened), or no file.  A directory in the way is not removed
    (IsADirectoryError).  Every OSError names `path`.
    """
    try:
        return _keep(path, data, mode)
    except OSError as e:
        if e.filename == str(path) or isinstance(e, Refused):
            raise
        raise type(e)(e.errno, e.strerror, str(path)) from e


def _keep(path: Path, data: bytes, mode: int) -> Kept:
    try:
        # O_PATH opens nothing: a device or FIFO planted here is not touched.
        handle = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        replace(path, data, mode)
        return Kept(True, "missing")
    try:
        info = os.fstat(handle)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, "a directory is in the way", str(path))
        if (why := _unsafe(info)) is not None:
            replace(path, data, mode)
            return Kept(True, why)
        # Reopen this very inode for writing, without waiting for a lease.
        flags = os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        fd = os.open(f"/proc/self/fd/{handle}", flags)
    finally:
        os.close(handle)
    try:
        info = os.fstat(fd)
        if (why := _unsafe(info)) is not None:  # linked meanwhile: never write through
            replace(path, data, mode)
            return Kept(True, why)
        return REWRITTEN if _rewrite(fd, info, data, mode) else UNCHANGED
    finally:
        os.close(fd)


def _unsafe(info: os.stat_result) -> str | None:
    """Why writing through this file in place could reach another (None: it cannot)."""
    if not stat.S_ISREG(info.st_mode):
        return kind(info.st_mode)
    if info.st_nlink != 1:
        return f"a file with {info.st_nlink} links"
    if info.st_uid != os.geteuid():
        return f"a file owned by uid {info.st_uid}"
    return None


def _rewrite(fd: int, info: os.stat_result, data: bytes, mode: int) -> bool:
    """Emptied, then written: a reader sees the old text, nothing, or the new text
    (see docs/resolv.md); only what differs is done."""
    changed = False
    if _read_at_most(fd, len(data) + 1) != data:
        os.ftruncate(fd, 0)
        _write_all(fd, data)
        changed = True
    return _set_mode_and_owner(fd, info, mode) or changed


def _read_at_most(fd: int, size: int) -> bytes:
    chunks = []
    got = 0
    while got < size:
        chunk = os.pread(fd, size - got, got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def ensure_directory(path: Path, mode: int) -> None:
    """`path` a directory (not a symlink) of `mode`, owned by us, whatever the umask.

    Its parent must exist.  Something else at `path` is an error naming it.
    """
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        what = kind(os.lstat(path).st_mode)
        raise Refused(errno.ENOTDIR, f"{what}, not a directory", str(path)) from None
    try:
        _set_mode_and_owner(fd, os.fstat(fd), mode)
    finally:
        os.close(fd)
