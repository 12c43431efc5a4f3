"""The ruleset effect: put a compiled ruleset in force, and fail closed.

`RulesetEffect.converge` commits only what differs from what it last put in
force (nothing, set elements, or the whole tables, always one transaction);
`forget` says the kernel may no longer hold that (another program changed
it), so the next converge replaces the tables whole.  `fail_closed` is what
a start that cannot load the policy leaves behind.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import Any, Protocol

from . import compiler, verify
from .nft import NftError
from .status import RulesetCounters

log = logging.getLogger("tailsfwd")


class NftApi(Protocol):
    """What the effect needs of libnftables (tailsfw.nft.Nft, or a fake kernel)."""

    def apply(self, document: dict[str, Any]) -> None: ...
    def list_ruleset(self) -> list[dict[str, Any]]: ...


class Outcome(Enum):
    UNCHANGED = "unchanged"  # nothing differed: nothing committed
    SETS = "sets"  # set elements only
    REPLACED = "replaced"  # the whole tables, in one transaction


class RulesetEffect:
    def __init__(self, nft: NftApi) -> None:
        self.nft = nft
        self.in_force: compiler.Ruleset | None = None
        self.counters = RulesetCounters()
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

    def differences(self) -> list[str]:
        """What the kernel holds that is not what we put in force; [] when it
        is exactly that.  Asks the kernel (a few ms)."""
        if self.in_force is None:
            return ["nothing put in force yet"]
        return self.differences_in(self.nft.list_ruleset())

    def differences_in(self, listing: list[dict[str, Any]]) -> list[str]:
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

    def converge(self, ruleset: compiler.Ruleset) -> Outcome:
        """Make the kernel hold `ruleset`.  Raises NftError with the ruleset in
        force untouched (every commit is one transaction)."""
        old = self.in_force if self._trusted else None
        changes = None if old is None else ruleset.changes_since(old)
        if changes == []:
            self.counters.unchanged += 1
            return Outcome.UNCHANGED
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
        previous = self.in_force.warnings if self.in_force is not None else ()
        for warning in sorted(set(ruleset.warnings) - set(previous)):
            log.warning("%s", warning)
        self.in_force, self._trusted = ruleset, True
        return outcome


class FailState(Enum):
    KEPT = "kept"  # a tailsfw ruleset was in force: it stays
    LOCKDOWN = "lockdown"  # none was: the lockdown ruleset is loaded
    NOTHING = "nothing"  # none was, and the lockdown was refused too


def fail_closed(nft: NftApi) -> tuple[FailState, str]:
    """Leave a tailsfw ruleset in force after a failed start.

    A tailsfw ruleset already in force in both families (a restart) stays
    as it is; otherwise the lockdown ruleset (loopback only) is loaded.
    Returns what was done and, if the lockdown failed too, why.
    """
    try:
        present = tailsfw_families(nft.list_ruleset())
    except NftError as e:
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


def tailsfw_families(ruleset: list[dict[str, Any]]) -> set[str]:
    """The families that have a tailsfw table in a `list ruleset` answer."""
    return {
        o["table"]["family"]
        for o in ruleset
        if "table" in o and o["table"].get("name") == compiler.TABLE
    }
