"""The clean-up of what a crashed lab run, test or bench left on this machine.

It knows every prefix in names.py: network namespaces (and what still runs
in them), temporary directories, the Lab's accounts and groups, and the
empty cgroups systemd-nspawn leaves. Run by a Lab on start, holding the
machine-wide lock; what another process still uses is never touched.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import tempfile
from pathlib import Path

from tests.lab.command import run
from tests.lab.names import (
    LOCKED_PREFIX,
    NAMESPACE_PREFIXES,
    TEMP_PREFIX,
    USER_PREFIX,
    alive,
    owner,
)
from tests.lab.netns import delete_namespace

CGROUP_ROOT = Path("/sys/fs/cgroup")


def left_behind(name: str, prefixes: tuple[str, ...]) -> bool:
    """Made by one of the prefixes' owners, who is gone; a name without an
    owner only under LOCKED_PREFIX (whose maker held the lock we hold)."""
    for prefix in prefixes:
        if not name.startswith(prefix):
            continue
        pid = owner(name, prefix)
        if pid is None:
            return prefix == LOCKED_PREFIX
        return not alive(pid)
    return False


def namespaces() -> list[str]:
    listing = run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in listing.splitlines() if line.strip()]


def prefixed_accounts() -> list[str]:
    return [entry.pw_name for entry in pwd.getpwall() if entry.pw_name.startswith(USER_PREFIX)]


def remove_empty_cgroups() -> None:
    """nspawn leaves two empty cgroups (and empty ones below them) at the top of
    each hierarchy: remove them, deepest first.  rmdir refuses a cgroup that
    has processes, so one in use (another container's) is never touched."""
    for hierarchy in CGROUP_ROOT.iterdir():
        for name in ("payload", "supervisor"):
            top = hierarchy / name
            if not top.is_dir():
                continue
            for below, _, _ in os.walk(top, topdown=False):
                with contextlib.suppress(OSError):
                    os.rmdir(below)


def remove_leftovers() -> None:
    """Deletes every left-behind namespace and temporary directory, every
    ``tfwt-*`` account or group and every empty nspawn cgroup. Call it
    holding the lab's lock (accounts carry no owner)."""
    for namespace in namespaces():
        if left_behind(namespace, NAMESPACE_PREFIXES):
            delete_namespace(namespace)
    for directory in Path(tempfile.gettempdir()).iterdir():
        stale = left_behind(directory.name, (TEMP_PREFIX, LOCKED_PREFIX))
        if stale and directory.is_dir() and not directory.is_symlink():
            shutil.rmtree(directory, ignore_errors=True)
    for name in prefixed_accounts():
        # --force: a killed process may still be a zombie owned by the account.
        run(["userdel", "--force", name])
    groups = run(["getent", "group"]).stdout.splitlines()
    for name in (line.split(":", 1)[0] for line in groups):
        if name.startswith(USER_PREFIX):
            run(["groupdel", name])
    remove_empty_cgroups()
