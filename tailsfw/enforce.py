"""The ruleset's world: put a compiled ruleset in force, know what the kernel
holds, undo tampering, and fail closed.

- `RulesetEffect.converge(desired)` commits only what differs from what it
  last put in force (nothing, set elements, or the whole tables, always one
  transaction); `forget()` says the kernel may no longer hold that, so the
  next converge replaces the tables whole.
- `KernelTruth` (`RulesetEffect.truth`) compares the kernel's listing with
  the ruleset in force, always away from the loop (an `nft` child process:
  libnftables reads every link to name `iif`, under the lock that link
  changes take, and one listing took 1.4 s during a storm of interfaces).
  It is a source: its answers come back through the daemon's queue as
  `KernelChecked` events.
- The reaction to tampering: another process changed our tables
  (`RulesetTouched`), or a check asked by a lost-notifications notice found
  the kernel different: forget, and converge at once.
- After a commit, the flows conntrack holds that the new ruleset forbids
  (`flowcut.cuts`) are handed to `cut_flows` (the daemon's deletes them
  with ctnetlink away from the loop): never before the commit.
- `fail_closed` is what a start that cannot load the policy leaves behind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from enum import Enum
from typing import Any, Protocol

from . import compiler, flowcut, verify
from .desired import Desired
from .events import KernelChecked, RulesetTouched
from .nft import NftError
from .status import RulesetCounters

log = logging.getLogger("tailsfwd")

Listing = list[dict[str, Any]]  # `nft -j list ruleset`'s objects
Lister = Callable[[], Awaitable[Listing]]  # the ruleset, listed away from the loop
FlowCutter = Callable[[Sequence[flowcut.Cut]], None]  # deletes conntrack entries, off the loop
# The status says what the kernel holds: asked at most this often, and at
# most a tenth of the time (listing costs more as interfaces grow: libnftables
# reads every link to name `iif`, ~50 ms with 2,000 interfaces; comparing the
# answer costs the loop ~3 ms).  Tampering itself is caught by the monitor.
KERNEL_CHECK = 1.0
KERNEL_CHECK_SHARE = 0.1
# A listing that takes longer is given up (and counts as a difference).
LIST_TIMEOUT = 10.0


class NftApi(Protocol):
    """What the effect needs of libnftables (tailsfw.nft.Nft, or a fake kernel)."""

    def apply(self, document: dict[str, Any]) -> None: ...


class Outcome(Enum):
    UNCHANGED = "unchanged"  # nothing differed: nothing committed
    SETS = "sets"  # set elements only
    REPLACED = "replaced"  # the whole tables, in one transaction


class RulesetEffect:
    name = "ruleset"

    def __init__(
        self, nft: NftApi, list_ruleset: Lister, cut_flows: FlowCutter | None = None
    ) -> None:
        self.nft = nft
        self.cut_flows = cut_flows
        self.committed: Desired | None = None  # what the ruleset in force was made for
        self.in_force: compiler.Ruleset | None = None
        self.counters = RulesetCounters()
        self.generation = 0  # commits so far: a listing older than the last is stale
        self.truth = KernelTruth(self, list_ruleset)
        self._trusted = False  # does the kernel hold `in_force`?
        self._expected: tuple[compiler.Ruleset, str] | None = None  # its kernel digest
        self._digest: tuple[compiler.Ruleset, str] | None = None

    @property
    def digest(self) -> str:
        """The digest of the ruleset in force, computed once per ruleset (every
        status has it; the ruleset's JSON is ~1 ms to make)."""
        if self.in_force is None:
            return ""
        if self._digest is None or self._digest[0] is not self.in_force:
            self._digest = (self.in_force, self.in_force.digest())
        return self._digest[1]

    def differences_in(self, listing: Listing) -> list[str]:
        """What `listing` (the kernel's ruleset) holds that is not what we put
        in force; [] when it is exactly that."""
        if self.in_force is None:
            return ["nothing put in force yet"]
        if self._expected is None or self._expected[0] is not self.in_force:
            self._expected = (self.in_force, verify.expected_digest(self.in_force))
        if verify.kernel_digest(listing) == self._expected[1]:
            return []
        return verify.differences(listing, self.in_force) or ["the tables differ"]

    def forget(self) -> None:
        """The kernel may not hold what we loaded: the next converge replaces it."""
        self._trusted = False

    def converge(self, desired: Desired) -> bool:
        """Make the kernel hold the desired ruleset; True if a commit changed it.
        Raises NftError with the ruleset in force untouched (every commit is
        one transaction)."""
        ruleset = desired.ruleset
        old = self.in_force if self._trusted else None
        changes = None if old is None else ruleset.changes_since(old)
        if changes == []:
            self.counters.unchanged += 1
            self.committed = desired
            return False
        outcome = Outcome.REPLACED
        if changes is not None:
            try:
                self.nft.apply(ruleset.document(changes))
                outcome = Outcome.SETS
            except NftError as e:
                # The tables may not be what we last loaded (someone changed
                # them): replacing them puts the whole ruleset back.
                log.warning("set update refused (%s): replacing the tables instead", e)
        if outcome is Outcome.REPLACED:
            self.nft.apply(ruleset.document())
            self.counters.replacements += 1
        else:
            self.counters.set_updates += 1
        self.counters.commits += 1
        self.generation += 1
        previous = self.in_force.warnings if self.in_force is not None else ()
        for warning in sorted(set(ruleset.warnings) - set(previous)):
            log.warning("%s", warning)
        self.in_force, self._trusted = ruleset, True
        self.truth.committed(outcome)
        cuts = flowcut.cuts(self.committed, desired)
        self.committed = desired
        if cuts and self.cut_flows is not None:
            self.cut_flows(cuts)
        return True

    def touched(self, event: RulesetTouched) -> bool:
        """Another process changed our tables (or may have: pid 0, notices
        lost): True when the tables must be put back now; after a lost
        notice the kernel is asked first, and its answer (`checked`) decides."""
        if event.pid == 0:
            self.counters.unverified_notices += 1
            self.truth.ask(event.what)
            return False
        log.warning(
            "ruleset changed by another process (pid %d, %s): %s; putting it back",
            event.pid,
            event.process or "?",
            event.what,
        )
        self.counters.tamperings += 1
        self.forget()
        return True

    def checked(self, event: KernelChecked) -> bool:
        """The kernel's answer to a check; True when the tables must be put back now."""
        if not event.notice:
            return False
        if not event.differences:
            log.info("nftables monitor: %s; the kernel holds our ruleset", event.notice)
            return False
        log.warning(
            "nftables monitor: %s; the kernel differs: %s; putting it back",
            event.notice,
            "; ".join(event.differences[:3]),
        )
        self.counters.tamperings += 1
        self.forget()
        return True


class KernelTruth:
    """What the kernel holds of our tables, compared with what is in force.

    Asked by `ask()` (a lost-notifications notice), or by `differences()`
    when the last answer is older than the rate allows; an answer to a
    notice, or one that differs from the last, is a `KernelChecked` event.
    An answer to a listing that a commit overtook is dropped (and asked
    again if a notice asked for it).
    """

    name = "kernel"

    def __init__(self, effect: RulesetEffect, list_ruleset: Lister) -> None:
        self._effect = effect
        self._list = list_ruleset
        self._known: tuple[float, tuple[str, ...]] | None = None  # when asked, what differed
        self._cost = 0.0  # how long the last listing took
        self._wake = asyncio.Event()
        self._notice = ""  # the notice waiting for an answer

    def differences(self) -> list[str]:
        """The last known differences ([]: none, or none known yet); asks the
        kernel again when the last answer is stale."""
        if self._effect.in_force is None:
            return []
        every = max(KERNEL_CHECK, self._cost / KERNEL_CHECK_SHARE)
        if self._known is None or time.monotonic() - self._known[0] >= every:
            self.ask()
        return list(self._known[1]) if self._known is not None else []

    def ask(self, notice: str = "") -> None:
        self._notice = self._notice or notice
        self._wake.set()

    def committed(self, outcome: Outcome) -> None:
        if outcome is Outcome.REPLACED:
            # One transaction replaced our tables whole: the kernel holds them
            # now; asked again when the rate allows.
            self._known = (self._known[0] if self._known else time.monotonic(), ())
        elif self._known is not None and self._known[1]:
            self.ask()  # the differences may be others now

    async def events(self) -> AsyncIterator[KernelChecked]:
        while True:
            await self._wake.wait()
            self._wake.clear()
            notice, self._notice = self._notice, ""
            generation, started = self._effect.generation, time.monotonic()
            try:
                listing = await asyncio.wait_for(self._list(), LIST_TIMEOUT)
            except (NftError, OSError, ValueError, TimeoutError) as e:
                why = str(e) or f"no answer within {LIST_TIMEOUT} s"
                listing, error = [], f"cannot list the ruleset: {why}"
            else:
                error = ""
            self._cost = time.monotonic() - started
            if self._effect.generation != generation:
                if notice:
                    self.ask(notice)  # the listing may predate the commit
                continue
            differences = (error,) if error else tuple(self._effect.differences_in(listing))
            known, self._known = self._known, (started, differences)
            if notice or known is None or known[1] != differences:
                yield KernelChecked(differences, notice)  # else nothing new to say


class FailState(Enum):
    KEPT = "kept"  # a tailsfw ruleset was in force: it stays
    LOCKDOWN = "lockdown"  # none was: the lockdown ruleset is loaded
    NOTHING = "nothing"  # none was, and the lockdown was refused too


async def fail_closed(nft: NftApi, list_ruleset: Lister) -> tuple[FailState, str]:
    """Leave a tailsfw ruleset in force after a failed start.

    A tailsfw ruleset already in force in both families (a restart) stays
    as it is; otherwise the lockdown ruleset (loopback only) is loaded.
    Returns what was done and, if the lockdown failed too, why.
    """
    try:
        present = tailsfw_families(await list_ruleset())
    except (NftError, OSError, ValueError) as e:
        log.error("cannot list the ruleset in force (%s): loading the lockdown ruleset", e)
        present = set()
    if present >= set(compiler.FAMILIES.values()):
        log.critical("the tailsfw ruleset already in force stays in force")
        return FailState.KEPT, ""
    try:
        nft.apply(compiler.lockdown().document())
    except NftError as e:
        log.critical("cannot load the lockdown ruleset either: %s", e)
        return FailState.NOTHING, f"the lockdown ruleset was refused too: {e}"
    log.critical("lockdown ruleset loaded: only loopback traffic passes")
    return FailState.LOCKDOWN, ""


def tailsfw_families(ruleset: Listing) -> set[str]:
    """The families that have a tailsfw table in a `list ruleset` answer."""
    return {
        o["table"]["family"]
        for o in ruleset
        if "table" in o and o["table"].get("name") == compiler.TABLE
    }
