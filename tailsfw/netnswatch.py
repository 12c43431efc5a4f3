"""The network namespaces that exist, named in /run/netns (as `ip netns add`
makes them): a source of `NamespacesPresent`.

The directory's entries are followed with inotify (created, deleted, moved
in or out); each is identified by the namespace file's (device, inode), so
that a namespace deleted and made again under the same name is told from
the old one.  The directory may not exist yet (no namespace made since
boot): its parent is watched until it does.  Which names are the policy's
is for `desired` to say; the rest are never touched.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

from .events import Event, NamespacesPresent
from .inotify import (
    IN_CREATE,
    IN_DELETE,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    IN_Q_OVERFLOW,
    LOST_EVENTS,
    Inotify,
)

log = logging.getLogger("tailsfwd")

NETNS_DIR = Path("/run/netns")
ENTRY_MASK = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_ONLYDIR
RETRY = 1.0
PENDING_FIRST = 0.002  # ip netns add mounts its file right after making it


def present(directory: Path, prefix: str = "") -> tuple[dict[str, tuple[int, int]], bool]:
    """name -> (dev, inode) of each namespace file in `directory` whose name
    starts with `prefix` (stripped), and whether an entry is not one yet.

    A namespace file is on nsfs (the device of our own namespace's file);
    `ip netns add` first makes an empty file on tmpfs, then mounts the
    namespace on it, and the mount makes no inotify event: such an entry is
    said to be pending, and looked at again shortly.
    """
    found: dict[str, tuple[int, int]] = {}
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
            found[entry[len(prefix) :]] = (st.st_dev, st.st_ino)
        elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
            pending = True
    return found, pending


class NetnsWatch:
    """The namespaces in `directory`, whole, at start and after each change."""

    name = "netns"

    def __init__(self, directory: Path = NETNS_DIR, prefix: str = "") -> None:
        self.directory = directory
        self.prefix = prefix

    async def events(self) -> AsyncIterator[Event]:
        last: dict[str, tuple[int, int]] | None = None
        while True:
            try:
                with Inotify() as inotify:
                    parent = inotify.add_watch(self.directory.parent, ENTRY_MASK)
                    watched = self.directory.is_dir()
                    if watched:
                        inotify.add_watch(self.directory, ENTRY_MASK | LOST_EVENTS)
                    wait = PENDING_FIRST
                    while True:
                        now, pending = present(self.directory, self.prefix)
                        if now != last:
                            last = now
                            yield NamespacesPresent(tuple(sorted(now.items())))
                        try:
                            events = await asyncio.wait_for(
                                inotify.read(), wait if pending else None
                            )
                        except TimeoutError:
                            wait = min(wait * 2, RETRY)  # a file left empty: not for ever
                            continue
                        wait = PENDING_FIRST
                        lost = any(e.mask & (IN_Q_OVERFLOW | LOST_EVENTS) and not e.name
                                   and e.wd != parent for e in events)  # fmt: skip
                        made = not watched and any(
                            e.wd == parent and e.name == self.directory.name for e in events
                        )
                        if lost or made:
                            break  # watch (the new) directory again
            except OSError as e:
                log.error("netns: %s: retrying in %s s", e, RETRY)
                await asyncio.sleep(RETRY)
