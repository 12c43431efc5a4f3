"""What tailsfwd reports: counters, the status it writes, and reading it back.

A leaf: the effects' and the audit's reports (`SysctlState`,
`NamespaceState`, `DropCounters`) are plain values defined here, so that
`tailsfwctl status` reads them without importing the parts that make them."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import safefile

# status.json is written again at least this often (seconds), even when
# nothing changed: its `updated` time says the daemon was alive then, and
# readers treat a file much older than this as no daemon's.
HEARTBEAT = 5.0


@dataclass
class RulesetCounters:
    """Kept by the ruleset effect (tailsfw/enforce.py)."""

    commits: int = 0  # transactions that changed the ruleset in force
    replacements: int = 0  # ... of which replaced the tables
    set_updates: int = 0  # ... of which changed set elements only
    unchanged: int = 0  # converges that needed no commit
    tamperings: int = 0  # changes to our tables by other processes, undone
    unverified_notices: int = 0  # lost change notifications: the kernel was checked


@dataclass
class Counters(RulesetCounters):
    """Everything tailsfwd counts: the ruleset effect's counters and the daemon's."""

    refused: int = 0  # commits nft refused (the ruleset in force stayed)
    reloads: int = 0
    reloads_refused: int = 0
    files_rewritten: int = 0  # resolv files written because they differed
    files_refused: int = 0  # writes of them that failed
    guest_tamperings: int = 0  # changes by other processes to a namespace's ruleset, undone


@dataclass(frozen=True)
class SysctlState:
    """One setting: what we want, what the kernel says after the write, and why."""

    name: str
    wanted: str | None
    actual: str | None
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.wanted is None or self.actual == self.wanted


@dataclass
class DropCounters:
    """What the audit has seen since it started; goes into the status."""

    drops: int = 0  # refused packets decoded
    logged: int = 0  # ... written one by one
    suppressed: int = 0  # ... counted in summaries instead
    summaries: int = 0
    lost: int = 0  # refused packets the kernel could not hand over (queue full)
    overruns: int = 0  # times the kernel's queue overflowed (ENOBUFS)
    malformed: int = 0  # messages skipped as malformed
    unwritten: int = 0  # entries dropped because the journal writer was behind
    by_user: dict[str, int] = field(default_factory=dict)
    by_reason: dict[str, int] = field(default_factory=dict)
    bound: bool = False  # the NFLOG group is being read
    last_error: str = ""


@dataclass(frozen=True)
class NamespaceState:
    """A policy namespace as the daemon sees it: present in /run/netns or
    not, and if present whether its guest side (ruleset committed, settings
    written) is in force for the namespace there now, or why not."""

    name: str
    present: bool
    in_force: bool = False
    note: str = ""  # present and not in force: the failure, or "being set up"


@dataclass(frozen=True)
class Status:
    """What tailsfwd reports, in its state file and (shorter) to systemd."""

    pid: int
    state: str  # starting | enforcing | tampered | lockdown | failed
    policy: str
    ruleset: str
    lan_mode: str
    connected: list[str]
    interfaces: dict[int, str]
    warnings: list[str]
    last_error: str
    counters: Counters
    sysctls: list[SysctlState]
    netlink_reads: int
    running_since: float = 0.0  # wall-clock time the daemon started
    last_apply: float = 0.0  # wall-clock time of the last commit
    last_apply_cause: str = ""  # what made it: start, reload, links, dns, accounts, ...
    clearnet_dns: list[str] = field(default_factory=list)
    dns_refused: list[str] = field(default_factory=list)  # NetworkManager values refused
    networkmanager: str = "unknown"  # unknown | available | absent
    drops: DropCounters = field(default_factory=DropCounters)  # the refused packets' audit
    # What the kernel holds that differs from the ruleset in force ([]: none).
    kernel_differences: list[str] = field(default_factory=list)
    # The effects whose last converge failed, and why (retried until they succeed).
    failing: dict[str, str] = field(default_factory=dict)
    # The policy's application namespaces, in its order (tailsfw/guests.py).
    namespaces: list[NamespaceState] = field(default_factory=list)
    # Wall-clock time the status was made and written (every HEARTBEAT at least).
    updated: float = field(default_factory=time.time)

    def line(self) -> str:
        """The STATUS= line: what is in force, in a few words."""
        if self.state != "enforcing":
            return f"{self.state.upper()}: {self.last_error or 'see the journal'}"
        text = (
            f"ruleset {self.ruleset[:12]} in force; lan {self.lan_mode};"
            f" {len(self.connected)} on-link networks; {len(self.warnings)} warnings;"
            f" {self.counters.commits} commits; {self.drops.drops} drops"
            + (f" ({self.drops.lost} lost)" if self.drops.lost else "")
        )
        if self.failing:
            text += f"; failing: {', '.join(self.failing)}"
        return f"{text}; last error: {self.last_error}" if self.last_error else text


STATE_DIR_MODE = 0o755
STATUS_MODE = 0o644


def write_status(path: Path, status: Status) -> None:
    """Replace the state file atomically: a reader never sees half of it.

    The directory and the file get their modes (0755, 0644) and owner (us)
    explicitly, whatever the umask, and the temporary file is a new one of
    a random name (safefile.replace): nothing planted in the directory is
    opened or followed.
    """
    safefile.ensure_directory(path.parent, STATE_DIR_MODE)
    text = json.dumps(asdict(status), indent=1, sort_keys=True) + "\n"
    safefile.replace(path, text.encode(), STATUS_MODE)
