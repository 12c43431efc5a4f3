"""The one shape of every effect, and the set of them the daemon keeps.

An effect makes one part of the world hold what `Desired` says:
`converge(desired)` does nothing when nothing differs, returns True when it
changed the world, and raises (the old state intact) when refused;
`forget()` says the world was changed behind its back, so the next
converge checks or redoes everything.  A converge that raised is retried
by the daemon every RETRY_DELAY until it succeeds.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from .desired import Desired
from .dropaudit import AuditEffect
from .enforce import RulesetEffect
from .guests import GuestsEffect
from .resolv import ResolvFiles
from .sysctl import Sysctl

# After a failed converge, try that effect again this much later even if
# nothing changes.
RETRY_DELAY = 1.0


class Effect(Protocol):
    name: str

    def converge(self, desired: Desired) -> bool: ...
    def forget(self) -> None: ...


@dataclass
class Effects:
    """The effects of one daemon: the ruleset, and the cheap ones done at
    once on every change (each skips what did not change for it)."""

    ruleset: RulesetEffect
    sysctl: Sysctl
    files: ResolvFiles | None = None
    audit: AuditEffect | None = None
    guests: GuestsEffect | None = None

    @property
    def cheap(self) -> list[Effect]:
        return [e for e in (self.sysctl, self.files, self.audit, self.guests) if e is not None]

    def named(self, name: str) -> Effect:
        return next(e for e in (self.ruleset, *self.cheap) if e.name == name)

    def stop(self) -> list[asyncio.Task[None]]:
        """Stop what runs on its own (the drops' audit); the tasks to await."""
        task = self.audit.stop() if self.audit is not None else None
        return [task] if task is not None else []
