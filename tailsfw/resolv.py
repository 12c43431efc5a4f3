"""The resolver files: `/etc/resolv.conf` on Tor's DNS, and the clearnet servers.

Three steps, as systemd-resolved writes its resolv.conf: the text is
rendered by a pure function, compared with what the file holds on disk, and
written only when it differs.  `ResolvFiles` is the effect; `ResolvWatch`
is the source that tells the daemon when another process touched a file.

Both files are rewritten in place (same inode) when that cannot write
through to another file (a regular file with one link, owned by root;
anything else is replaced by rename: tailsfw/safefile.py), for these reasons:
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
A file that could not be made right (a lease, an immutable file, a
read-only directory) raises NotRight; the daemon tries again on a timer.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from . import safefile
from .dnsserver import Refused, check_address, show
from .events import FileChanged
from .inotify import watch_paths

log = logging.getLogger(__name__)

TOR_RESOLV_TEXT = "nameserver 127.0.0.1\n"
MODE = 0o644


def render_clearnet(servers: Sequence[ipaddress.IPv4Address]) -> str:
    """One `nameserver` line per server, in the given order, without repeats.

    Checks every value again with the rule NetworkManager's client used
    (tailsfw/dnsserver.py): a ValueError names the first that is not an
    IPv4Address that may be a server.
    """
    seen: dict[ipaddress.IPv4Address, None] = {}
    for server in servers:
        try:
            if not isinstance(server, ipaddress.IPv4Address):
                raise Refused(f"{show(server)}: not an IPv4 address")
            seen[check_address(server)] = None
        except Refused as e:
            raise ValueError(f"clearnet DNS server {e}") from None
    return "".join(f"nameserver {server}\n" for server in seen)


def write_in_place(path: Path, text: str) -> bool:
    """Make `path` a regular file of mode 0644, ours, holding `text`; True if it changed.

    A regular file with one link, owned by us, keeps its inode: it is
    emptied and the new text written.  A reader that reads meanwhile sees
    the old text, an empty file, or the new text: the kernel grows the
    file's size only once a page's bytes are copied, so a reader never sees
    part of a page being written (a text longer than a page may show whole
    first pages; resolvers use only the first three `nameserver` lines,
    always in the first page).  An empty file means "ask 127.0.0.1" to
    every resolver: Tor's DNS, never an address outside, for the
    microseconds the window lasts.  Writing over the old text and then
    cutting it would instead show the new text followed by the old one's
    tail, and a read racing the copy could even tear a line into an address
    of neither.

    Anything that could make a write in place reach another file (a
    symlink, a hard link, a file owned by another user) or block (a FIFO,
    socket or device), and a missing file, is replaced by a new regular
    file through an atomic rename (safefile.keep); readers then see the old
    entry or the new file, nothing else.  A directory at `path` is not
    removed: OSError.  A lease held by another process: BlockingIOError at
    once (the caller tries again later), never a wait.
    """
    kept = safefile.keep(path, text.encode(), MODE)
    if kept.replaced == "missing":
        log.info("%s was missing: created", path)
    elif kept.replaced:
        log.warning("%s was %s: replaced by a new regular file", path, kept.replaced)
    return kept.changed


class NotRight(Exception):
    """Kept files that could not be made right; the message names each and why."""


def _why(error: OSError) -> str:
    if isinstance(error, BlockingIOError):
        return "under another process's lease (not waited for)"
    return error.strerror or str(error)


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
    maybe us, touch a file; or a retry).
    """

    name = "files"

    def __init__(self, resolv_conf: Path, clearnet_conf: Path) -> None:
        self.resolv_conf = resolv_conf
        self.clearnet_conf = clearnet_conf
        self.rewritten = 0  # files written because they differed
        self._done: ResolvTexts | None = None  # what the disk held at the last converge
        # After forget(), a file that differs was changed by another process
        # (the events of our own writes find nothing to rewrite).
        self._touched = False

    def converge(self, desired: WithFiles) -> bool:
        """`rewrite` if needed; True if a file was rewritten."""
        texts = desired.files
        if texts == self._done:
            return False
        try:
            changed = bool(self.rewrite(texts))
        finally:
            self._touched = False
        self._done = texts
        return changed

    def forget(self) -> None:
        """A file was touched: the next converge reads both again."""
        self._done = None
        self._touched = True

    def rewrite(self, texts: ResolvTexts) -> list[str]:
        """Rewrite what differs from `texts`; the paths rewritten.

        A clearnet text of None leaves that file as it is.  Both files are
        always tried, resolv.conf first; if either could not be made right
        (or NetworkManager's servers could not be rendered), NotRight names
        each one and why (the daemon tries again later: nothing here waits).
        """
        wanted = [(self.resolv_conf, texts.resolv)]
        if texts.clearnet is not None:
            wanted.append((self.clearnet_conf, texts.clearnet))
        rewritten = []
        wrong: list[str] = []
        for path, text in wanted:
            try:
                if write_in_place(path, text):
                    self.rewritten += 1
                    rewritten.append(str(path))
                    if self._touched:
                        log.warning("%s was changed by another process: rewrote it", path)
                    else:
                        log.info("rewrote %s", path)
            except OSError as e:
                wrong.append(f"{path}: {_why(e)}")
        if texts.refused:
            wrong.append(f"{self.clearnet_conf}: {texts.refused}")
        if wrong:
            raise NotRight("; ".join(wrong))
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
