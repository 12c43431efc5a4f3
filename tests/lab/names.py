"""Every name prefix the lab gives what it makes on this machine, so that one
clean-up (leftovers.py) knows them all.

A network namespace or temporary directory is named
``<prefix>-<pid>-<random>``: the pid is the process that made it, so a
clean-up run by another lab, a bench or a test running in parallel (several
checkouts share this machine) removes only what a dead process left behind.
Accounts cannot carry a pid (their names are fixed by role); only a lab
holding the machine-wide lock makes them.

Links (veth, ifb) are only ever made inside these namespaces (``ip -n NS
link add``) and go with them; nothing is made in the machine's own namespace.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

LAB_NS = "tfwlab"  # the Lab's host and peer (topology.py), made under the lock
SCRATCH_NS = "tfwnm"  # netns.scratch_namespace: the D-Bus and NetworkManager labs
BENCH_NS = "tfwbench"  # bench/daemon.py's namespace, shared by the daemon benches
NAMESPACE_PREFIXES = (LAB_NS, SCRATCH_NS, BENCH_NS)
USER_PREFIX = "tfwt-"  # the Lab's accounts (and groups), made under the lock
TEMP_PREFIX = "tfwtmp"  # every temporary directory: lab_temp_dir
# What the lock holder alone made before names carried a pid: the Lab's
# namespaces, staged scripts and Tor keys (tfwlab-scripts-*, tfwlab-tmp-*).
LOCKED_PREFIX = LAB_NS


def owned_name(prefix: str) -> str:
    """A fresh name under `prefix` that says which process made it."""
    return f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"


def owner(name: str, prefix: str) -> int | None:
    """The pid in a name made by `owned_name` (or `lab_temp_dir`), else None."""
    field = name.removeprefix(f"{prefix}-").split("-", 1)[0]
    return int(field) if name.startswith(f"{prefix}-") and field.isdecimal() else None


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def temp_prefix(kind: str) -> str:
    """The `prefix=` for a temporary directory of the lab's (`kind` says whose)."""
    return f"{TEMP_PREFIX}-{os.getpid()}-{kind}-"
