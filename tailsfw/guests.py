"""The effect that puts each present application namespace's guest side in
force: its ruleset (nsrules.guest_ruleset, one transaction: all or nothing)
and its kernel settings (nsrules.GUEST_SETTINGS), inside the namespace.

The work runs in short-lived threads, one per namespace, joined at once
(tailsfw/netnsfiles.py): each enters the namespace with setns(), which
moves that thread only (the loop's thread never leaves the host's
namespace), talks to nftables through its own libnftables context, writes
/proc/sys (which shows the writer's namespace), and ends.  A namespace is
done once per identity (`NetnsId`): one made again under the same name is
done again; one removed is forgotten; one whose ruleset another process
changed (`touched`, from the sockets the threads hand to
tailsfw/guestwatch.py) is done again.  What is in force, or failing and
why, is kept per namespace for the status (`states`); `read_guest` reads a
guest side back for tailsfwctl.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import nsrules
from .guestwatch import GuestWatch, past_own_commit, subscribed
from .netnsfiles import NetnsId, entered, in_threads
from .nft import Nft
from .nsrules import Guest
from .status import NamespaceState
from .sysctl import sysctl_name

if TYPE_CHECKING:
    from .desired import Desired
    from .events import GuestTouched

log = logging.getLogger("tailsfwd")

PROC_SYS = Path("/proc/sys")
SETTING_UP = "being set up"  # present, not yet done, no failure yet


class GuestError(RuntimeError):
    """A namespace's guest side could not be put in force."""


def put_in_force(path: Path, guest: Guest, follow: bool) -> socket.socket | None:
    """Inside the namespace at `path` (checked to still be `guest`'s), from
    the calling thread: the ruleset, then the settings; and, if `follow`, a
    socket that holds what others commit there after our commit.  A socket
    that cannot be had is raised only once the guest side is in force."""
    with entered(path, guest.identity):
        watch, unwatched = None, None
        if follow:
            try:
                watch = subscribed()
            except OSError as e:
                unwatched = e
        try:
            Nft().apply(nsrules.guest_ruleset(guest.ns).document())
            for parts, value in nsrules.GUEST_SETTINGS:
                PROC_SYS.joinpath(*parts).write_text(value + "\n")
            if watch is not None:
                past_own_commit(*watch)
        except BaseException:
            if watch is not None:
                watch[0].close()
            raise
    if unwatched is not None:
        raise GuestError(f"in force, but not watched: {unwatched}")
    return watch[0] if watch is not None else None


def read_guest(path: Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """From the calling thread, inside the namespace at `path`: its ruleset
    listed, and the guest settings' values (tailsfwctl status, verify)."""
    with entered(path):
        listing = Nft().list_ruleset()
        values = {}
        for parts, _ in nsrules.GUEST_SETTINGS:
            try:
                values[sysctl_name(parts)] = PROC_SYS.joinpath(*parts).read_text().strip()
            except OSError as e:
                values[sysctl_name(parts)] = f"unreadable ({e.strerror})"
        return listing, values


class GuestsEffect:
    """Each present policy namespace's guest side, done once per identity,
    and again when another process changes it (`watch`: see guestwatch.py)."""

    name = "namespaces"

    def __init__(self, directory: Path, prefix: str = "", watch: GuestWatch | None = None) -> None:
        self.directory = directory
        self.prefix = prefix
        self.watch = watch
        self.done: dict[str, NetnsId] = {}  # name -> identity in force
        self.errors: dict[str, str] = {}  # name -> why its last attempt failed
        self.tamperings = 0  # changes by other processes, undone

    def path(self, name: str) -> Path:
        return self.directory / f"{self.prefix}{name}"

    def converge(self, desired: Desired) -> bool:
        wanted: Mapping[str, Guest] = desired.guests
        self.done = {n: i for n, i in self.done.items() if n in wanted and wanted[n].identity == i}
        self.errors = {n: e for n, e in self.errors.items() if n in wanted}
        todo = [g for n, g in wanted.items() if self.done.get(n) != g.identity]
        watch = self.watch
        if watch is not None:
            # Closed first: our own commit is never read as another's.
            watch.unfollow_all_but(self.done)
        if not todo:
            return False
        follow = watch is not None
        results = in_threads(lambda g: put_in_force(self.path(g.ns.name), g, follow), todo)
        for guest, result in zip(todo, results, strict=True):
            if isinstance(result, Exception):
                self.errors[guest.ns.name] = str(result)
                continue
            self.done[guest.ns.name] = guest.identity
            self.errors.pop(guest.ns.name, None)
            if watch is not None and result is not None:
                watch.follow(guest.ns.name, guest.identity, result)
        if self.errors:  # every name in it was to do: the others are done
            raise GuestError(
                "; ".join(f"namespace {n}: {e}" for n, e in sorted(self.errors.items()))
            )
        return True

    def forget(self) -> None:
        self.done.clear()
        if self.watch is not None:
            self.watch.unfollow_all_but(self.done)

    def touched(self, event: GuestTouched) -> bool:
        """Another process changed a guest's table (or may have: pid 0):
        True when that guest must be done again now."""
        if self.done.get(event.name) != event.identity:
            return False  # gone, or made again: being done anyway
        if event.pid:
            log.warning("namespace %s: ruleset changed by another process (pid %d, %s): %s; "
                        "putting it back", event.name, event.pid, event.process or "?",
                        event.what)  # fmt: skip
        else:
            log.warning("namespace %s: %s; putting its ruleset back", event.name, event.what)
        self.tamperings += event.pid != 0
        del self.done[event.name]
        return True

    def states(self, desired: Desired) -> list[NamespaceState]:
        """Each policy namespace: present or not, its guest side in force or why not."""
        states = []
        for ns in desired.policy.namespaces:
            guest = desired.guests.get(ns.name)
            if guest is None:
                states.append(NamespaceState(ns.name, present=False))
            elif self.done.get(ns.name) == guest.identity:
                states.append(NamespaceState(ns.name, present=True, in_force=True))
            else:
                why = self.errors.get(ns.name, SETTING_UP)
                states.append(NamespaceState(ns.name, present=True, note=why))
        return states
