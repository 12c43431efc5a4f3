"""The outside worlds a daemon is wired to, and its effects made of them.

`tailsfwd.real_parts` builds the real ones; tests build fakes the same way
(a stateful fake kernel, sources fed by the test, a temporary /proc/sys).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .coalesce import MAX_DELAY, QUIET
from .dropaudit import AuditEffect, DropAudit
from .effects import Effects
from .enforce import FlowCutter, Lister, NftApi, RulesetEffect
from .events import Source
from .guests import GuestsEffect
from .resolv import ResolvFiles
from .sysctl import Sysctl


class NetlinkApi(Source, Protocol):
    reads: int  # full reads of the link and address state


@dataclass(frozen=True)
class Settings:
    policy: Path
    state_dir: Path
    quiet: float = QUIET
    max_delay: float = MAX_DELAY

    @property
    def status_file(self) -> Path:
        return self.state_dir / "status.json"


@dataclass
class Parts:
    nft: NftApi
    list_ruleset: Lister  # the ruleset listed away from the loop
    netlink: NetlinkApi
    sysctl: Sysctl
    notify: Callable[..., None]
    accounts: Source | None = None  # the account database (waited for at start)
    sources: Sequence[Source] = ()  # the others
    files: ResolvFiles | None = None
    audit: Callable[[int], DropAudit] | None = None  # an audit of an NFLOG group
    cut_flows: FlowCutter | None = None  # deletes the flows a commit forbids
    guests: GuestsEffect | None = None  # the application namespaces' guest sides


def effects_of(parts: Parts) -> Effects:
    audit = AuditEffect(parts.audit) if parts.audit is not None else None
    ruleset = RulesetEffect(parts.nft, parts.list_ruleset, parts.cut_flows)
    return Effects(ruleset, parts.sysctl, parts.files, audit, parts.guests)
