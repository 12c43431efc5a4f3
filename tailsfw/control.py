"""The daemon's state, and the one way to steer and ask it: `Control`.

SIGHUP, the D-Bus service and tests all call the same `status()`,
`reload()` and `subscribe()`.  `Control` holds the policy in force, the
facts, what was last reported and the effects' failures; it runs the
effects (`enforce`, `converge`) for the loop, and builds the one `Status`
that its `Reporter` publishes.  Nothing here needs a running loop but the
drops' audit and the throttled publishing.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from .desired import Desired
from .effects import RETRY_DELAY, Effect, Effects
from .events import DnsServers, Event, updated
from .facts import Facts
from .nft import NftError
from .policy import Policy, PolicyError
from .policy import load as load_policy
from .report import Reporter
from .resolv import NotRight
from .status import Counters, DropCounters, NamespaceState, Status

log = logging.getLogger("tailsfwd")


class ControlApi(Protocol):
    """What the D-Bus service (and a fake of it in tests) needs."""

    def status(self) -> Status:
        """What is in force now, as the kernel holds it."""
        ...

    def reload(self) -> bool:
        """Adopt the policy file again; False (and nothing changed) if refused."""
        ...

    def subscribe(self, callback: Callable[[Status], None]) -> None:
        """Call `callback` with the new status every time it is published."""
        ...


@dataclass
class Report:
    """What the daemon remembers only to report it."""

    state: str = "starting"  # starting | enforcing | lockdown | failed
    last_error: str = ""
    last_apply: float = 0.0
    last_apply_cause: str = ""
    dns_refused: tuple[str, ...] = ()
    networkmanager: str = "unknown"
    running_since: float = field(default_factory=time.time)


class Control:
    def __init__(
        self,
        policy_path: Path,
        effects: Effects,
        notify: Callable[..., None],
        status_file: Path,
        netlink_reads: Callable[[], int] = lambda: 0,
    ) -> None:
        self.policy_path = policy_path
        self.effects = effects
        self.notify = notify
        self.netlink_reads = netlink_reads
        self.policy: Policy | None = None
        self.facts = Facts()
        self.report = Report()
        self.counters = Counters()  # the daemon's own; the effects keep theirs
        self.failing: dict[str, str] = {}  # effect name -> why its last converge failed
        self.started = False  # READY=1 said: reloads are taken from then on
        self.reload_pending = False
        self.reporter = Reporter(status_file, notify, self.status, self._drops)
        self._failures: Counter[str] = Counter()
        self._desired: Desired | None = None

    # -- the loop's side ------------------------------------------------------

    def desired(self) -> Desired:
        """What the effects must hold for the policy in force and the facts now."""
        assert self.policy is not None
        d = self._desired
        if d is None or d.policy is not self.policy or d.facts is not self.facts:
            d = self._desired = Desired(self.policy, self.facts, d)
        return d

    def fold(self, event: Event) -> Facts:
        """Fold an event into the facts; returns the facts before it."""
        before = self.facts
        if isinstance(event, DnsServers):
            networkmanager = "available" if event.available else "absent"
            # Available again with the same servers, or a value refused
            # beside the same servers: the facts stay, the status changes.
            reported = (networkmanager, event.refused)
            if reported != (self.report.networkmanager, self.report.dns_refused):
                if event.refused != self.report.dns_refused:
                    for why in event.refused:
                        log.warning("NetworkManager: DNS server refused: %s", why)
                self.report.networkmanager, self.report.dns_refused = reported
                if self.started:  # the start publishes its own
                    self.reporter.publish_soon()
        self.facts = updated(self.facts, event)
        if self.started and self.facts.netns != before.netns:
            self.reporter.publish_soon()  # a namespace came or went: the status lists them
        return before

    def enforce(self, policy: Policy, cause: str) -> None:
        """Put `policy` in force with the facts of now: the ruleset first (an
        exception, and nothing changed, if refused), then the other effects."""
        wanted = Desired(policy, self.facts, self._desired)
        if self.effects.ruleset.converge(wanted):
            self._applied(cause)
        self.failing.pop(self.effects.ruleset.name, None)
        self.policy, self._desired = policy, wanted
        self.converge(self.effects.cheap, cause)

    def converge(self, effects: Iterable[Effect], cause: str) -> None:
        """Converge each effect; a failure is logged, counted and kept in
        `failing` (the daemon retries it), never raised."""
        wanted = self.desired()
        for effect in effects:
            try:
                changed = effect.converge(wanted)
            except Exception as e:  # a bug must not stop the loop that keeps the rules
                self._failed(effect, e)
                continue
            if self.failing.pop(effect.name, None) is not None:
                log.info("%s: in force again", effect.name)
                self.reporter.publish_soon()
            if changed and effect is self.effects.ruleset:
                self._applied(cause)
                self.report.last_error = ""
                self.reporter.publish_soon()
            elif changed and effect is self.effects.guests:
                self.reporter.publish_soon()  # a namespace's guest side now in force

    def _applied(self, cause: str) -> None:
        self.report.last_apply, self.report.last_apply_cause = time.time(), cause
        log.debug("commit (%s)", cause)

    def _failed(self, effect: Effect, error: Exception) -> None:
        self._failures[effect.name] += 1
        why = describe(error)
        if self.failing.get(effect.name) == why:
            return  # the same failure again, at a retry: said and reported already
        self.failing[effect.name] = why
        if effect is self.effects.ruleset:
            if isinstance(error, NftError):
                self.report.last_error = f"commit refused: {error}"
            else:
                log.error("commit failed", exc_info=error)
                self.report.last_error = f"commit failed: {describe(error)}"
            message = f"{self.report.last_error}; ruleset {self.digest()} stays in force"
        else:
            message = f"{effect.name}: {describe(error)}"
        log.error("%s; trying again in %s s", message, RETRY_DELAY)
        self.reporter.publish()

    def retry(self) -> None:
        """Redo every failing effect from scratch."""
        for name in list(self.failing):
            effect = self.effects.named(name)
            effect.forget()  # whatever the world holds now, put it all back
            self.converge([effect], "retry")

    def digest(self) -> str:
        return self.effects.ruleset.digest[:12]

    # -- Control --------------------------------------------------------------

    def reload(self) -> bool:
        """Adopt the policy file again, or keep everything as it is."""
        if not self.started:
            self.reload_pending = True
            return False
        self.notify(RELOADING="1", MONOTONIC_USEC=str(time.monotonic_ns() // 1000))
        self.counters.reloads += 1
        try:
            self.enforce(load_policy(self.policy_path), "reload")
        except Exception as e:  # whatever it is, the reload changes nothing
            self.counters.reloads_refused += 1
            self.report.last_error = f"reload refused: {describe(e)}"
            log.error(
                "%s; ruleset %s and the previous policy stay in force",
                self.report.last_error,
                self.digest(),
            )
            ok = False
        else:
            self.report.last_error = ""
            log.info("policy reloaded: ruleset %s in force", self.digest())
            ok = True
        self.reporter.publish(READY="1")
        return ok

    def subscribe(self, callback: Callable[[Status], None]) -> None:
        self.reporter.subscribe(callback)

    def status(self) -> Status:
        e = self.effects
        ruleset = e.ruleset.in_force
        warnings = list(ruleset.warnings if ruleset is not None else ()) + [
            f"sysctl {s.name}: {s.note}" for s in e.sysctl.states if not s.ok
        ]
        counters = replace(
            self.counters,
            **vars(e.ruleset.counters),
            refused=self._failures[e.ruleset.name],
            files_rewritten=e.files.rewritten if e.files is not None else 0,
            files_refused=self._failures["files"],
            guest_tamperings=e.guests.tamperings if e.guests is not None else 0,
        )
        kernel = e.ruleset.truth.differences()
        state = self.report.state
        return Status(
            pid=os.getpid(),
            state="tampered" if kernel and state == "enforcing" else state,
            kernel_differences=kernel,
            policy=str(self.policy_path),
            ruleset=e.ruleset.digest,
            lan_mode=self.policy.lan.mode if self.policy else "",
            connected=sorted(str(n) for n in self.facts.connected),
            interfaces=dict(sorted(self.facts.interfaces.items())),
            warnings=warnings,
            last_error=self.report.last_error,
            counters=counters,
            sysctls=list(e.sysctl.states),
            netlink_reads=self.netlink_reads(),
            running_since=self.report.running_since,
            last_apply=self.report.last_apply,
            last_apply_cause=self.report.last_apply_cause,
            clearnet_dns=[str(a) for a in self.facts.dns],
            drops=self._drops(),
            dns_refused=list(self.report.dns_refused),
            networkmanager=self.report.networkmanager,
            failing=dict(sorted(self.failing.items())),
            namespaces=self._namespaces(),
        )

    def _namespaces(self) -> list[NamespaceState]:
        guests = self.effects.guests
        return guests.states(self.desired()) if guests and self.policy else []

    def _drops(self) -> DropCounters:
        audit = self.effects.audit
        return audit.counters(self.facts.user_names) if audit is not None else DropCounters()


def describe(error: BaseException) -> str:
    if isinstance(error, (PolicyError, NotRight)):  # they name the file and why
        return str(error)
    if isinstance(error, NftError):
        return f"nft refused the ruleset: {error}"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
