"""The network namespaces that exist, named in /run/netns (as `ip netns add`
makes them): a source of `NamespacesPresent`.

The directory's entries are followed with inotify (created, deleted, moved
in or out); each is identified by the namespace file's (device, inode) and
the serial of the event that made its name (`NetnsId.birth`), so that a
namespace deleted and made again under the same name is told from the old
one even when the kernel gave the new one the old one's inode (it does,
once the old one is freed) and both changes came in one read.  The
directory may not exist yet (no namespace made since boot): its parent is
watched until it does.  Which names are the policy's is for `desired` to
say; the rest are never touched.
"""

from __future__ import annotations

import asyncio
import logging
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
from .netnsfiles import NETNS_DIR, NetnsId, present

log = logging.getLogger("tailsfwd")

ENTRY_MASK = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_ONLYDIR
RETRY = 1.0
PENDING_FIRST = 0.002  # ip netns add mounts its file right after making it


class NetnsWatch:
    """The namespaces in `directory`, whole, at start and after each change."""

    name = "netns"

    def __init__(self, directory: Path = NETNS_DIR, prefix: str = "") -> None:
        self.directory = directory
        self.prefix = prefix

    async def events(self) -> AsyncIterator[Event]:
        last: dict[str, NetnsId] | None = None
        births: dict[str, int] = {}  # name -> serial of the event that made it
        serial = 0
        while True:
            try:
                with Inotify() as inotify:
                    parent = inotify.add_watch(self.directory.parent, ENTRY_MASK)
                    watched = self.directory.is_dir()
                    if watched:
                        inotify.add_watch(self.directory, ENTRY_MASK | LOST_EVENTS)
                    # Events may have been missed before this watch: every
                    # name is taken as made anew (its guest side done again).
                    serial += 1
                    epoch = serial
                    wait = PENDING_FIRST
                    while True:
                        found, pending = present(self.directory, self.prefix)
                        now = {n: i._replace(birth=max(births.get(n, 0), epoch))
                               for n, i in found.items()}  # fmt: skip
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
                        for e in events:  # in order: a name deleted, then made again
                            if e.wd == parent or not e.name.startswith(self.prefix):
                                continue
                            name = e.name.removeprefix(self.prefix)
                            if e.mask & (IN_CREATE | IN_MOVED_TO):
                                serial += 1
                                births[name] = serial
                            elif e.mask & (IN_DELETE | IN_MOVED_FROM):
                                births.pop(name, None)
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
