"""The effect that puts each present application namespace's guest side in
force: its ruleset (nsrules.guest_ruleset, one transaction: all or nothing)
and its kernel settings (nsrules.GUEST_SETTINGS), inside the namespace.

The work runs in short-lived threads, one per namespace, joined at once:
each enters the namespace with setns(), which moves that thread only (the
loop's thread never leaves the host's namespace), talks to nftables through
its own libnftables context, writes /proc/sys (which shows the writer's
namespace), and ends.  A namespace is done once per identity (the namespace
file's device and inode): one made again under the same name is done
again; one removed is forgotten.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from . import nsrules
from .nft import Nft
from .nsrules import Guest

if TYPE_CHECKING:
    from .desired import Desired

CLONE_NEWNET = 0x40000000
PROC_SYS = Path("/proc/sys")
_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


class GuestError(RuntimeError):
    """A namespace's guest side could not be put in force."""


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


def put_in_force(path: Path, guest: Guest) -> None:
    """Inside the namespace at `path` (checked to still be `guest`'s), from
    the calling thread: the ruleset, then the settings."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != guest.identity:
            raise GuestError(f"{path} changed while being set up")
        _setns(fd)
        try:
            Nft().apply(nsrules.guest_ruleset(guest.ns).document())
            for parts, value in nsrules.GUEST_SETTINGS:
                PROC_SYS.joinpath(*parts).write_text(value + "\n")
        finally:
            _setns(home)
    finally:
        os.close(fd)
        os.close(home)


class GuestsEffect:
    """Each present policy namespace's guest side, done once per identity."""

    name = "namespaces"

    def __init__(self, directory: Path, prefix: str = "") -> None:
        self.directory = directory
        self.prefix = prefix
        self.done: dict[str, tuple[int, int]] = {}  # name -> identity in force

    def path(self, name: str) -> Path:
        return self.directory / f"{self.prefix}{name}"

    def converge(self, desired: Desired) -> bool:
        wanted: Mapping[str, Guest] = desired.guests
        self.done = {n: i for n, i in self.done.items() if n in wanted and wanted[n].identity == i}
        todo = [g for n, g in wanted.items() if self.done.get(n) != g.identity]
        if not todo:
            return False
        errors: dict[str, str] = {}

        def work(guest: Guest) -> None:
            try:
                put_in_force(self.path(guest.ns.name), guest)
            except Exception as e:  # reported below, named
                errors[guest.ns.name] = str(e)

        threads = [threading.Thread(target=work, args=(g,), daemon=True) for g in todo]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for guest in todo:
            if guest.ns.name not in errors:
                self.done[guest.ns.name] = guest.identity
        if errors:
            raise GuestError("; ".join(f"namespace {n}: {e}" for n, e in sorted(errors.items())))
        return True

    def forget(self) -> None:
        self.done.clear()
