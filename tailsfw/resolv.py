"""The resolver files: `/etc/resolv.conf` on Tor's DNS, and the clearnet servers.

Three steps, as systemd-resolved writes its resolv.conf: the text is
rendered by a pure function, compared with what the file holds on disk, and
written only when it differs.  `ResolvFiles` is the effect; `ResolvWatch`
is the source that tells the daemon when another process touched a file.

Both files are rewritten in place (same inode), for these reasons:
- `/etc/resolv-over-clearnet.conf` is bind-mounted over `/etc/resolv.conf`
  in the mount namespaces of the few programs allowed clearnet DNS; a bind
  mount keeps the inode it was made with, so a file replaced by rename would
  never reach them.
- `/etc/resolv.conf` could be replaced atomically (nothing of Tails
  bind-mounts it), but in place is as safe for it: the only view a reader
  can get between the old text and ours is an empty file (see
  `write_in_place`), which resolvers read as "nameserver 127.0.0.1", the
  very text we write.  In place also keeps any bind mount of the host's
  file (`systemd-nspawn --resolv-conf=bind-host`, chroots) in step, and one
  writer serves both files.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import secrets
import stat
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .events import FileChanged
from .inotify import watch_paths

log = logging.getLogger(__name__)

TOR_RESOLV_TEXT = "nameserver 127.0.0.1\n"
MODE = 0o644
MAX_SHOWN = 48  # characters of a refused value quoted in the error
THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")  # "this host": never a server


def refusal(server: object) -> str | None:
    """Why `server` may not be a clearnet DNS server, or None if it may."""
    if not isinstance(server, ipaddress.IPv4Address):
        return "not an IPv4 address"
    if server.is_unspecified or server in THIS_NETWORK:
        return "unspecified"
    if server.is_loopback:
        return "loopback"
    if server.is_multicast:
        return "multicast"
    if server.is_reserved:  # 240.0.0.0/4, with the broadcast address
        return "reserved or broadcast"
    return None


def render_clearnet(servers: Sequence[ipaddress.IPv4Address]) -> str:
    """One `nameserver` line per server, in the given order, without repeats.

    Checks every value again (NetworkManager's client already did): a
    ValueError names the first that is not a unicast IPv4 address.
    """
    seen: dict[ipaddress.IPv4Address, None] = {}
    for server in servers:
        why = refusal(server)
        if why is not None:
            shown = repr(server)
            shown = shown if len(shown) <= MAX_SHOWN else shown[: MAX_SHOWN - 3] + "..."
            raise ValueError(f"clearnet DNS server {shown} refused: {why}")
        seen[server] = None
    return "".join(f"nameserver {server}\n" for server in seen)


def write_in_place(path: Path, text: str) -> bool:
    """Make `path` a regular file of mode 0644, ours, holding `text`; True if it changed.

    A regular file keeps its inode: it is emptied and the new text written.
    A reader that reads meanwhile sees the old text, an empty file, or the
    new text: the kernel grows the file's size only once a page's bytes are
    copied, so a reader never sees part of a page being written (a text
    longer than a page may show whole first pages; resolvers use only the
    first three `nameserver` lines, always in the first page).  An empty
    file means "ask 127.0.0.1" to every resolver: Tor's DNS, never an
    address outside, for the microseconds the window lasts.  Writing over
    the old text and then cutting it would instead show the new text
    followed by the old one's tail, and a read racing the copy could even
    tear a line into an address of neither.

    Symlinks are never followed (a link planted at `path` would aim our
    write anywhere).  A symlink, FIFO, socket or device at `path`, or no
    file at all, is replaced by a new regular file through an atomic
    rename; readers then see the old entry or the new file, nothing else.
    A directory at `path` is not removed: OSError.
    """
    try:
        return _write(path, text.encode())
    except OSError as e:
        if e.filename == str(path):
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e


def _write(path: Path, data: bytes) -> bool:
    try:
        # O_PATH opens nothing: a device or FIFO planted here is not touched.
        handle = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        _replace(path, data, "missing")
        return True
    try:
        st = os.fstat(handle)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "a directory is in the way", str(path))
        if not stat.S_ISREG(st.st_mode):
            _replace(path, data, _kind(st.st_mode))
            return True
        # Reopen this very inode for writing: no race with a swap of the path.
        fd = os.open(f"/proc/self/fd/{handle}", os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
    finally:
        os.close(handle)
    try:
        return _rewrite(fd, data)
    finally:
        os.close(fd)


def _rewrite(fd: int, data: bytes) -> bool:
    st = os.fstat(fd)
    changed = False
    if _read_at_most(fd, len(data) + 1) != data:
        os.ftruncate(fd, 0)
        _write_all(fd, data)
        changed = True
    if stat.S_IMODE(st.st_mode) != MODE:
        os.fchmod(fd, MODE)
        changed = True
    owner = (os.geteuid(), os.getegid())
    if (st.st_uid, st.st_gid) != owner:
        os.fchown(fd, *owner)  # whoever owns it could rewrite it
        changed = True
    return changed


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


def _write_all(fd: int, data: bytes) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], done)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device"


def _replace(path: Path, data: bytes, was: str) -> None:
    """A new regular file at `path`, by an atomic rename over what is there."""
    tmp = path.with_name(f".{path.name}.tailsfw-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            _write_all(fd, data)
            os.fchmod(fd, MODE)  # the umask may have taken bits away
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    if was == "missing":
        log.info("%s was missing: created", path)
    else:
        log.warning("%s was %s: replaced by a regular file", path, was)


@dataclass(frozen=True)
class ResolvTexts:
    """What the two resolver files must hold."""

    resolv: str  # /etc/resolv.conf
    # /etc/resolv-over-clearnet.conf; None: left as it is (NetworkManager has
    # not answered yet, or its servers could not be rendered: `refused` says why).
    clearnet: str | None
    refused: str = ""


class WithFiles(Protocol):
    """What the files effect reads of tailsfw.desired.Desired (named
    structurally: desired.py imports this module to render the texts)."""

    @property
    def files(self) -> ResolvTexts: ...


def resolv_texts(servers: Sequence[ipaddress.IPv4Address] | None) -> ResolvTexts:
    """The files' text for NetworkManager's servers (None: not known yet)."""
    if servers is None:
        return ResolvTexts(TOR_RESOLV_TEXT, None)
    try:
        return ResolvTexts(TOR_RESOLV_TEXT, render_clearnet(servers))
    except ValueError as e:  # checked by nm.py already: a second line
        return ResolvTexts(TOR_RESOLV_TEXT, None, str(e))


class ResolvFiles:
    """The effect: both files as `Desired.files` says.

    `rewrite` compares with the disk every time; `converge` does so only when
    the wanted text changed or after `forget()` (the watch saw a process,
    maybe us, touch a file).
    """

    name = "files"

    def __init__(self, resolv_conf: Path, clearnet_conf: Path) -> None:
        self.resolv_conf = resolv_conf
        self.clearnet_conf = clearnet_conf
        self.rewritten = 0  # files written because they differed
        self._done: ResolvTexts | None = None  # what the disk held at the last converge

    def converge(self, desired: WithFiles) -> bool:
        """`rewrite` if needed; True if a file was rewritten."""
        texts = desired.files
        if texts == self._done:
            return False
        changed = bool(self.rewrite(texts))
        self._done = texts
        return changed

    def forget(self) -> None:
        """A file was touched: the next converge reads both again."""
        self._done = None

    def rewrite(self, texts: ResolvTexts) -> list[str]:
        """Rewrite what differs from `texts`; the paths rewritten.

        A clearnet text of None leaves that file as it is.  resolv.conf comes
        first and is written even if the clearnet file fails; an OSError names
        the first path that could not be written, after both were tried, and
        a ValueError says why NetworkManager's servers could not be rendered.
        """
        wanted = [(self.resolv_conf, texts.resolv)]
        if texts.clearnet is not None:
            wanted.append((self.clearnet_conf, texts.clearnet))
        failed: OSError | None = None
        rewritten = []
        for path, text in wanted:
            try:
                if write_in_place(path, text):
                    self.rewritten += 1
                    rewritten.append(str(path))
                    log.info("rewrote %s", path)
            except OSError as e:
                failed = failed or e
        if failed is not None:
            raise failed
        if texts.refused:
            raise ValueError(texts.refused)
        return rewritten


class ResolvWatch:
    """The source: which of `paths` another process (or we) touched.

    Watches their directories, so an edit, a chmod or chown, a replacement
    by rename, a deletion or a symlink put in a file's place are all seen.
    Every path is reported once at start and again after any gap (queue
    overflow, a directory that went away and came back).
    """

    name = "resolv"

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = tuple(paths)

    async def events(self) -> AsyncIterator[FileChanged]:
        async for hit in watch_paths(self.paths):
            for path in self.paths:
                if path in hit:
                    yield FileChanged(path)
