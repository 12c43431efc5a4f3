"""tailsfwd: keeps the ruleset, the kernel settings and the resolv files right.

Sources (netlink, NetworkManager, the watched files, ...) yield events; the
events are folded into one `Facts` value; `desired(policy, facts)` says what
each effect must hold; the effects (ruleset, sysctls, files) make the world
match it.  The daemon only wires them, and keeps the fail-closed rules:

- start: load the policy, set the boot sysctls, wait for the first link and
  address state, put the ruleset in force, and only then tell systemd READY=1
  (NetworkManager never delays this: its servers come when they come);
- events: link and address changes are coalesced, then only what changed is
  committed (nothing, set elements, or everything); a change made to our
  tables by another process is undone at once, without coalescing;
- SIGHUP (and the D-Bus Reload, through `Control`): re-read the policy; a
  broken one changes nothing;
- SIGTERM/SIGINT: exit 0.  Nothing, on any path, removes or loosens rules.

If the first apply fails, a tailsfw ruleset is left in force (the lockdown
one when there is none) and tailsfwd exits non-zero: see enforce.fail_closed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from . import users
from .accounts import PASSWD, AccountsSource
from .desired import (
    Desired,
    desired,
    desired_clearnet_dns,
    desired_interfaces,
    ruleset_facts,
)
from .dropaudit import DropAudit
from .droplog import DropCounters
from .enforce import FailState, NftApi, Outcome, RulesetEffect, fail_closed
from .events import DnsServers, Event, FileChanged, LinksChanged, RulesetTouched, Source
from .facts import Facts, updated
from .logflood import RateLimit
from .netlink import RCVBUF, NetlinkSource
from .nft import Nft, NftError, list_in_child
from .nftmonitor import NftMonitor
from .nm import NetworkManagerSource
from .notify import Notifier, watchdog_interval
from .policy import Policy, PolicyError
from .policy import load as load_policy
from .resolv import NotRight, ResolvFiles, ResolvWatch
from .service import keep_serving
from .status import Counters, Status, write_status
from .sysctl import DEFAULT_ROOT, Sysctl

log = logging.getLogger("tailsfwd")
Listing = list[dict[str, Any]]  # `nft -j list ruleset`'s objects

DEFAULT_POLICY = Path("/etc/tailsfw/policy.toml")
DEFAULT_STATE_DIR = Path("/run/tailsfw")
DEFAULT_RESOLV_CONF = Path("/etc/resolv.conf")
DEFAULT_CLEARNET_CONF = Path("/etc/resolv-over-clearnet.conf")
STATUS_FILE = "status.json"
# Coalescing (measured by bench/daemon.py): a burst is committed 2 ms after
# its last change (NetworkManager's address, route and link events come
# within a millisecond), and during a storm at least every 20 ms: a change is
# in force within 20 ms plus one commit even then, and a storm costs at most
# 50 commits a second however many changes it brings.
QUIET = 0.002
MAX_DELAY = 0.020
# After a refused commit, try again this much later even if nothing changes.
RETRY_DELAY = 1.0
FIRST_SNAPSHOT_TIMEOUT = 5.0
DROPS_REPORT = 1.0
# The status says what the kernel holds: asked at most this often, and at
# most a tenth of the time (listing costs more as interfaces grow: libnftables
# reads every link to name `iif`, ~50 ms with 2,000 interfaces).
KERNEL_CHECK = 0.1
KERNEL_CHECK_SHARE = 0.1
# The status (file, STATUS=, D-Bus) is published at most this often when
# interfaces or the ruleset change: a storm of 2,000 interfaces must not
# cost a 2,000-entry status per change.
PUBLISH_INTERVAL = 0.1
EXIT_FAILED = 1


class NetlinkApi(Source, Protocol):
    reads: int  # full reads of the link and address state


class AccountsApi(Source, Protocol):
    def follow(self, accounts: Collection[str]) -> None: ...


class AuditApi(Protocol):
    """The refused packets' audit (tailsfw.dropaudit.DropAudit)."""

    group: int

    async def run(self) -> None: ...
    def counters(self) -> DropCounters: ...


class FilesApi(Protocol):
    """The resolv files effect (tailsfw.resolv.ResolvFiles)."""

    def converge(self, servers: tuple[ipaddress.IPv4Address, ...] | None) -> list[str]: ...
    def forget(self) -> None: ...


@dataclass(frozen=True)
class Options:
    policy: Path = DEFAULT_POLICY
    state_dir: Path = DEFAULT_STATE_DIR
    proc_sys: Path = DEFAULT_ROOT
    quiet: float = QUIET
    max_delay: float = MAX_DELAY
    netlink_rcvbuf: int = RCVBUF
    resolv_conf: Path = DEFAULT_RESOLV_CONF
    clearnet_conf: Path = DEFAULT_CLEARNET_CONF
    passwd: Path = PASSWD
    nm_bus: str | None = None  # NetworkManager's bus address; None: the system bus
    bus: str | None = None  # where our D-Bus service is; None: the system bus
    serve_bus: bool = True


@dataclass
class Coalescer:
    """When to commit a burst of changes, decided from times alone.

    A burst is due `quiet` seconds after its last change (changes that come
    together are committed together) but never later than `max_delay` after
    its first one (a storm cannot postpone the truth forever).
    """

    quiet: float
    max_delay: float
    first: float | None = None
    last: float | None = None

    def change(self, now: float) -> None:
        if self.first is None:
            self.first = now
        self.last = now

    def due(self) -> float | None:
        if self.first is None or self.last is None:
            return None
        return min(self.last + self.quiet, self.first + self.max_delay)

    def take(self, now: float) -> bool:
        """True (and idle again) if the burst is due at `now`."""
        due = self.due()
        if due is None or now < due:
            return False
        self.first = self.last = None
        return True


class StartError(RuntimeError):
    """The daemon could not put its ruleset in force at start."""


@dataclass
class Parts:
    """The outside worlds the daemon is wired to; `main` builds the real ones,
    tests build fakes the same way."""

    nft: NftApi
    netlink: NetlinkApi
    sysctl: Sysctl
    notify: Notifier
    sources: Sequence[Source] = ()  # besides netlink and accounts
    files: FilesApi | None = None
    accounts: AccountsApi | None = None  # follows the policy's accounts live
    audit: Callable[[int], AuditApi] | None = None  # an audit of an NFLOG group
    lookup_uids: Callable[[Policy], Mapping[str, int]] = users.lookup_uids
    # The ruleset listed away from the loop (for the status); None: by `nft`.
    list_ruleset: Callable[[], Awaitable[Listing]] | None = None


@dataclass
class _Report:
    """What the daemon remembers only to report it."""

    state: str = "starting"
    last_error: str = ""
    last_apply: float = 0.0
    last_apply_cause: str = ""
    dns_refused: tuple[str, ...] = ()
    networkmanager: str = "unknown"
    files_wrong: str = ""  # why the resolv files are not right ("" when they are)
    running_since: float = field(default_factory=time.time)


class Daemon:
    """The wiring, and the `Control` (status, reload) that SIGHUP, D-Bus and
    tests share."""

    def __init__(self, options: Options, parts: Parts) -> None:
        self.options = options
        self.parts = parts
        self.ruleset = RulesetEffect(parts.nft)
        self.policy: Policy | None = None
        self.facts = Facts()
        self.counters = Counters()
        self.report = _Report()
        self.coalescer = Coalescer(options.quiet, options.max_delay)
        self.started = False
        self.reload_pending = False
        self._pending_cause = ""
        self._reads = 0  # netlink's full reads, as last reported
        self._subscribers: list[Callable[[Status], None]] = []
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._timer: asyncio.TimerHandle | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._files_retry: asyncio.TimerHandle | None = None
        self._audit: tuple[AuditApi, asyncio.Task[None]] | None = None
        self._kernel: tuple[float, list[str]] | None = None  # when asked, what differed
        self._kernel_cost = 0.0  # how long the last asking took
        self._checking: asyncio.Task[None] | None = None
        self._published = -PUBLISH_INTERVAL  # loop time of the last publish
        self._publish_timer: asyncio.TimerHandle | None = None

    # -- Control ------------------------------------------------------------

    def status(self) -> Status:
        ruleset = self.ruleset.in_force
        warnings = list(ruleset.warnings if ruleset is not None else ()) + [
            f"sysctl {s.name}: {s.note}" for s in self.parts.sysctl.states if not s.ok
        ]
        if self.report.files_wrong:
            warnings.append(f"resolv files not right: {self.report.files_wrong}")
        counters = replace(self.counters, **vars(self.ruleset.counters))
        kernel = self._kernel_truth()
        return Status(
            pid=os.getpid(),
            state="tampered" if kernel and self.report.state == "enforcing" else self.report.state,
            kernel_differences=kernel,
            policy=str(self.options.policy),
            ruleset=self.ruleset.digest,
            lan_mode=self.policy.lan.mode if self.policy else "",
            connected=sorted(str(n) for n in self.facts.connected),
            interfaces=dict(sorted(self.facts.interfaces.items())),
            warnings=warnings,
            last_error=self.report.last_error,
            counters=counters,
            sysctls=list(self.parts.sysctl.states),
            netlink_reads=self.parts.netlink.reads,
            running_since=self.report.running_since,
            last_apply=self.report.last_apply,
            last_apply_cause=self.report.last_apply_cause,
            clearnet_dns=[str(a) for a in self.facts.dns],
            drops=self._audit[0].counters() if self._audit else DropCounters(),
            dns_refused=list(self.report.dns_refused),
            networkmanager=self.report.networkmanager,
        )

    def _kernel_truth(self) -> list[str]:
        """What the kernel holds differently from what we put in force ([]:
        nothing), asked at most every KERNEL_CHECK seconds and at most a
        KERNEL_CHECK_SHARE of the time; by a child process when the parts
        have one (the answer is then published when it changes)."""
        if self.ruleset.in_force is None:
            return []
        now = time.monotonic()
        every = max(KERNEL_CHECK, self._kernel_cost / KERNEL_CHECK_SHARE)
        if self._kernel is not None and now - self._kernel[0] < every:
            return self._kernel[1]
        if self.parts.list_ruleset is not None and self._kernel is not None:
            if self._checking is None:
                self._checking = asyncio.create_task(self._check_kernel(self.parts.list_ruleset))
            return self._kernel[1]
        try:
            wrong = self.ruleset.differences()
        except NftError as e:
            wrong = [f"cannot list the ruleset: {e}"]
        self._kernel_cost = time.monotonic() - now
        self._kernel = (now, wrong)
        return wrong

    async def _check_kernel(self, list_ruleset: Callable[[], Awaitable[Listing]]) -> None:
        started, in_force = time.monotonic(), self.ruleset.in_force
        try:
            wrong = self.ruleset.differences_in(await list_ruleset())
        except (NftError, OSError, ValueError) as e:
            wrong = [f"cannot list the ruleset: {e}"]
        finally:
            self._checking = None
        self._kernel_cost = time.monotonic() - started
        if self.ruleset.in_force is not in_force:
            return  # committed meanwhile: the listing may predate it; ask again
        known = self._kernel[1] if self._kernel is not None else None
        self._kernel = (started, wrong)
        if wrong != known:
            self.publish_soon()

    def reload(self) -> bool:
        """Adopt the policy file again, or keep everything as it is."""
        if not self.started:
            self.reload_pending = True
            return False
        self.parts.notify(RELOADING="1", MONOTONIC_USEC=str(time.monotonic_ns() // 1000))
        self.counters.reloads += 1
        try:
            policy = load_policy(self.options.policy)
            facts = self._with_uids(policy)
            self._converge_ruleset(desired(policy, facts), "reload")
        except Exception as e:  # whatever it is, the reload changes nothing
            self.counters.reloads_refused += 1
            self.report.last_error = f"reload refused: {_describe(e)}"
            log.error(
                "%s; ruleset %s and the previous policy stay in force",
                self.report.last_error,
                self.ruleset.digest[:12],
            )
            ok = False
        else:
            self._adopt(policy, facts)
            self.report.last_error = ""
            self._audit_group(policy.log.group)
            log.info("policy reloaded: ruleset %s in force", self.ruleset.digest[:12])
            ok = True
        self.publish(READY="1")
        return ok

    def subscribe(self, callback: Callable[[Status], None]) -> None:
        self._subscribers.append(callback)

    # -- reporting ----------------------------------------------------------

    def publish_soon(self) -> None:
        """Publish now, or PUBLISH_INTERVAL after the last publish if that is later."""
        if self._publish_timer is not None:
            return
        loop = asyncio.get_running_loop()
        due = self._published + PUBLISH_INTERVAL
        if loop.time() >= due:
            self.publish()
        else:
            self._publish_timer = loop.call_at(due, self.publish)

    def publish(self, **extra: str) -> None:
        """Tell systemd, the state file and the subscribers; failures are only logged."""
        if self._publish_timer is not None:
            self._publish_timer.cancel()
            self._publish_timer = None
        with contextlib.suppress(RuntimeError):  # no loop: the start's failure
            self._published = asyncio.get_running_loop().time()
        status = self.status()
        # The file first: whoever hears READY=1 can read the status at once.
        try:
            write_status(self.options.state_dir / STATUS_FILE, status)
        except OSError as e:
            log.error("cannot write the status file in %s: %s", self.options.state_dir, e)
        self.parts.notify(**extra, STATUS=status.line())
        for callback in self._subscribers:
            try:
                callback(status)
            except Exception:
                log.exception("a status subscriber failed")

    # -- the drops' audit -----------------------------------------------------

    def _audit_group(self, group: int) -> None:
        """Audit the policy's NFLOG group (a side stream: it never stops enforcement)."""
        make = self.parts.audit
        if make is None or (self._audit is not None and self._audit[0].group == group):
            return
        self._stop_audit()
        audit = make(group)
        self._audit = (audit, asyncio.create_task(audit.run(), name="nflog"))

    def _stop_audit(self) -> asyncio.Task[None] | None:
        if self._audit is None:
            return None
        task = self._audit[1]
        task.cancel()  # it writes its open summaries, then ends
        self._audit = None
        return task

    # -- effects ------------------------------------------------------------

    def _with_uids(self, policy: Policy) -> Facts:
        """The facts with the uids of `policy`'s accounts."""
        return replace(self.facts, uids=self.parts.lookup_uids(policy))

    def _adopt(self, policy: Policy, facts: Facts) -> None:
        """`policy` is in force: its accounts are the ones followed from now on
        (not before: a refused reload keeps following the policy in force)."""
        self.policy, self.facts = policy, facts
        if self.parts.accounts is not None:
            self.parts.accounts.follow(users.accounts_of(policy))

    def _converge_ruleset(self, wanted: Desired, cause: str) -> Outcome:
        outcome = self.ruleset.converge(wanted.ruleset)
        if outcome is Outcome.UNCHANGED:
            return outcome
        self.report.last_apply, self.report.last_apply_cause = time.time(), cause
        if outcome is Outcome.REPLACED:
            # One transaction replaced our tables whole: the kernel holds them
            # now; asked again when the rate allows.
            self._kernel = (self._kernel[0] if self._kernel else time.monotonic(), [])
        elif self._kernel and self._kernel[1]:
            self._kernel = None  # the differences may be others now: ask again
        return outcome

    def _converge_sysctls(self) -> None:
        """IPv6 off on new interfaces at once, before any coalescing: the
        ruleset drops IPv6 anyway, this is the second line."""
        for state in self.parts.sysctl.converge_interfaces(desired_interfaces(self.facts)):
            if not state.ok:
                log.warning("sysctl %s: %s", state.name, state.note)

    def _converge_files(self, touched: bool = False) -> None:
        """The resolv files right; `touched`: another process (or we) changed one."""
        files = self.parts.files
        if files is None:
            return
        if self._files_retry is not None:
            self._files_retry.cancel()
            self._files_retry = None
        try:
            rewritten = files.converge(desired_clearnet_dns(self.facts))
        except NotRight as e:
            # No event may come when what stopped us is undone (a lease
            # released, chattr -i): try again on a timer until they are right.
            self.counters.files_refused += 1
            log.error("cannot make the resolv files right: %s; trying again in %s s",
                      e, RETRY_DELAY)  # fmt: skip
            if str(e) != self.report.files_wrong:
                self.report.files_wrong = str(e)
                self.publish_soon()
            self._files_retry = asyncio.get_running_loop().call_later(
                RETRY_DELAY, self._converge_files
            )
            return
        if self.report.files_wrong:
            self.report.files_wrong = ""
            self.publish_soon()
        for path in rewritten:
            # Only a file that differed is rewritten: the events of our own
            # writes find nothing, and are never reported as another's.
            self.counters.files_rewritten += 1
            if touched:
                log.warning("%s was changed by another process: rewrote it", path)
            else:
                log.info("rewrote %s", path)

    # -- start --------------------------------------------------------------

    async def start(self) -> None:
        policy = load_policy(self.options.policy)
        for state in self.parts.sysctl.apply_boot():
            if not state.ok:
                log.warning("sysctl %s: %s", state.name, state.note)
        # Other sources may speak first: fold what they say, wait for netlink.
        deadline = asyncio.get_running_loop().time() + FIRST_SNAPSHOT_TIMEOUT
        while True:
            left = deadline - asyncio.get_running_loop().time()
            try:
                event = await asyncio.wait_for(self._events.get(), max(left, 0))
            except TimeoutError:
                raise StartError(
                    f"no link and address state from netlink within {FIRST_SNAPSHOT_TIMEOUT} s"
                ) from None
            self._fold(event)
            if isinstance(event, LinksChanged):
                break
        self._reads = self.parts.netlink.reads
        self._converge_sysctls()
        facts = self._with_uids(policy)
        self._converge_ruleset(desired(policy, facts), "start")
        self._adopt(policy, facts)
        self.report.state = "enforcing"
        self._converge_files()
        log.info("ruleset %s in force (%s)", self.ruleset.digest[:12], self.options.policy)

    def _fail_closed(self, error: BaseException) -> int:
        """The first apply failed: leave a tailsfw ruleset in force, and exit.

        Exiting, rather than running degraded, lets systemd see the failure
        (the unit fails, Restart= tries again) and never says READY=1 about
        a ruleset that is not the policy's; the kernel keeps the rules.
        """
        self.report.last_error = _describe(error)
        log.critical("cannot enforce the policy: %s", self.report.last_error)
        done, why = fail_closed(self.parts.nft)
        self.report.state = "lockdown" if done is FailState.LOCKDOWN else "failed"
        if why:
            self.report.last_error += f"; and {why}"
        self.publish()
        return EXIT_FAILED

    # -- events -------------------------------------------------------------

    def _fold(self, event: Event) -> Facts:
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
                if self.report.state != "starting":  # the start publishes its own
                    self.publish_soon()
        self.facts = updated(self.facts, event)
        return before

    def handle(self, event: Event) -> None:
        before = self._fold(event)
        if isinstance(event, RulesetTouched):
            self._touched(event)
            return
        if isinstance(event, FileChanged):
            if self.parts.files is not None:
                self.parts.files.forget()
            self._converge_files(touched=True)
            return
        if isinstance(event, LinksChanged) and self.parts.netlink.reads != self._reads:
            self._reads = self.parts.netlink.reads
            self.publish()  # a full re-read (after lost events) is worth reporting
        if self.facts is before:
            return
        interfaces_changed = self.facts.interfaces != before.interfaces
        if interfaces_changed:
            self._converge_sysctls()
        if isinstance(event, DnsServers):
            self._converge_files()
        if ruleset_facts(self.facts) != ruleset_facts(before):
            self.changed(type(event).__name__)
        if interfaces_changed or isinstance(event, DnsServers):
            self.publish_soon()  # the status lists interfaces, sysctls and servers

    def _touched(self, event: RulesetTouched) -> None:
        """Another process changed our tables: put them back at once.  pid 0:
        the monitor may have missed changes; the kernel says whether it did."""
        if event.pid == 0:
            self.counters.unverified_notices += 1
            try:
                wrong = self.ruleset.differences()
            except NftError as e:
                wrong = [f"cannot list the ruleset: {e}"]
            if not wrong:
                log.info("nftables monitor: %s; the kernel holds our ruleset", event.what)
                return
            log.warning("nftables monitor: %s; the kernel differs: %s; putting it back",
                        event.what, "; ".join(wrong[:3]))  # fmt: skip
        else:
            log.warning(
                "ruleset changed by another process (pid %d, %s): %s; putting it back",
                event.pid,
                event.process or "?",
                event.what,
            )
        self.counters.tamperings += 1
        self.ruleset.forget()
        self.commit("tampering")

    def changed(self, cause: str) -> None:
        """The facts changed: commit once the burst is due."""
        loop = asyncio.get_running_loop()
        self.coalescer.change(loop.time())
        self._pending_cause = self._pending_cause or cause
        if self._timer is None:
            self._schedule(loop)

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        due = self.coalescer.due()
        if due is not None:
            self._timer = loop.call_at(due, self._due)

    def _due(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        if not self.coalescer.take(loop.time()):
            self._schedule(loop)  # the burst went on: its due time moved
            return
        cause, self._pending_cause = self._pending_cause or "retry", ""
        self.commit(cause)

    def commit(self, cause: str) -> None:
        """Enforce the current policy with the latest facts; never raises."""
        assert self.policy is not None
        try:
            outcome = self._converge_ruleset(desired(self.policy, self.facts), cause)
        except NftError as e:
            self._refused(f"commit refused: {e}")
            return
        except Exception as e:  # a bug must not stop the loop that keeps the rules
            log.exception("commit failed")
            self._refused(f"commit failed: {_describe(e)}")
            return
        log.debug("commit (%s): %s", cause, outcome.value)
        if outcome is not Outcome.UNCHANGED:
            self.report.last_error = ""
            self.publish_soon()

    def _refused(self, message: str) -> None:
        self.counters.refused += 1
        self.report.last_error = message
        log.error(
            "%s; ruleset %s stays in force; trying again in %s s",
            message,
            self.ruleset.digest[:12],
            RETRY_DELAY,
        )
        self.publish()
        if self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(RETRY_DELAY, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self.ruleset.forget()  # whatever the kernel holds now, put it all back
        self.changed("retry")

    # -- the loop -----------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop: asyncio.Future[None] = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _set, stop)
        # Installed before the start: SIGHUP's default action would kill us.
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        accounts = [self.parts.accounts] if self.parts.accounts is not None else []
        sources = [self.parts.netlink, *accounts, *self.parts.sources]
        pumps = {asyncio.create_task(self._pump(s), name=s.name) for s in sources}
        try:
            return await self._run(stop, pumps)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def _run(self, stop: asyncio.Future[None], pumps: set[asyncio.Task[None]]) -> int:
        starting = asyncio.create_task(self.start())
        await asyncio.wait({starting, stop, *pumps}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            if stop.done():
                return 0  # stopped before any rule was loaded: nothing to keep
            ended = next(t for t in pumps if t.done())
            return self._fail_closed(StartError(f"the {ended.get_name()} source ended"))
        if (error := starting.exception()) is not None:
            return self._fail_closed(error)
        self.started = True
        # What the start made (modules, the policy, the first facts) lives as
        # long as the daemon: out of the collector's sight, its full passes
        # stay short (a 30 ms pause would delay a DNS update past its bound).
        gc.freeze()
        assert self.policy is not None
        self._audit_group(self.policy.log.group)
        self.publish(READY="1")
        tasks = {
            asyncio.create_task(self._loop(), name="loop"),
            asyncio.create_task(self._report_drops(), name="drops report"),
        }
        # The bus comes later in boot than we do, and may restart: the service
        # waits for it, and its troubles never stop the daemon.
        serving = (
            asyncio.create_task(keep_serving(self, self.options.bus), name="dbus")
            if self.options.serve_bus
            else None
        )
        interval = watchdog_interval()
        if interval is not None:
            tasks.add(asyncio.create_task(self._watchdog(interval), name="watchdog"))
        if self.reload_pending:
            self.reload()
        try:
            done, _ = await asyncio.wait(
                {stop, *tasks, *pumps}, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for timer in (self._publish_timer, self._files_retry):
                if timer is not None:
                    timer.cancel()
            side = [t for t in (serving, self._stop_audit(), self._checking) if t is not None]
            for task in (*tasks, *side):
                task.cancel()
            await asyncio.gather(*tasks, *side, return_exceptions=True)
        if stop in done:
            log.info("stopping; ruleset %s stays in force", self.ruleset.digest[:12])
            return 0
        for ended in (tasks | pumps) & done:
            error = None if ended.cancelled() else ended.exception()
            log.critical(
                "%s stopped: %r; ruleset %s stays in force",
                ended.get_name(),
                error,
                self.ruleset.digest[:12],
            )
        return EXIT_FAILED

    async def _pump(self, source: Source) -> None:
        events: AsyncIterator[Event] = source.events()
        try:
            async for event in events:
                self._events.put_nowait(event)
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        raise RuntimeError(f"the {source.name} source ended")

    async def _loop(self) -> None:
        while True:
            events = [await self._events.get()]
            while not self._events.empty():
                events.append(self._events.get_nowait())
            for event in _superseded_dropped(events):
                self.handle(event)

    async def _report_drops(self) -> None:
        """Drops change with every refused packet: they are published at most
        once a DROPS_REPORT seconds, when they changed."""
        last = None
        while True:
            await asyncio.sleep(DROPS_REPORT)
            if self._audit is not None and (now := self._audit[0].counters()) != last:
                last = now
                self.publish()

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.parts.notify(WATCHDOG="1")
            await asyncio.sleep(interval)


def _superseded_dropped(events: list[Event]) -> list[Event]:
    """`events` without the link states a later one replaces (each is whole):
    when the loop falls behind, only the newest is folded."""
    last = max((i for i, e in enumerate(events) if isinstance(e, LinksChanged)), default=-1)
    return [e for i, e in enumerate(events) if i >= last or not isinstance(e, LinksChanged)]


def _set(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _describe(error: BaseException) -> str:
    if isinstance(error, (PolicyError, StartError)):
        return str(error)
    if isinstance(error, NftError):
        return f"nft refused the ruleset: {error}"
    return f"{type(error).__name__}: {error}"


def stderr_is_journal() -> bool:
    """True when stderr is systemd's journal stream (see systemd.exec(5))."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(2)
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


def setup_logging() -> None:
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("tailsfwd: %(levelname)s: %(message)s"))
    if stderr_is_journal():
        # The journal reads our stderr anyway: send it structured entries
        # (priority, code location) instead.
        try:
            from systemd.journal import JournalHandler
        except ImportError:
            pass
        else:
            handler = JournalHandler(SYSLOG_IDENTIFIER="tailsfwd")
            handler.setFormatter(logging.Formatter("%(message)s"))  # PRIORITY says the level
    # Whatever another program makes us repeat is summarized, not repeated.
    handler.addFilter(RateLimit())
    debug = bool(os.environ.get("TAILSFWD_DEBUG"))
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO, handlers=[handler], force=True
    )


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="tailsfwd", description="The Tails network filter daemon.")
    p.add_argument("--policy", type=Path, default=DEFAULT_POLICY, help="policy file")
    p.add_argument(
        "--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="where status.json is kept"
    )
    p.add_argument(
        "--proc-sys", type=Path, default=DEFAULT_ROOT, help="root of the sysctl tree to set"
    )
    p.add_argument("--quiet-ms", type=float, default=QUIET * 1000, help=argparse.SUPPRESS)
    p.add_argument("--max-delay-ms", type=float, default=MAX_DELAY * 1000, help=argparse.SUPPRESS)
    p.add_argument(
        "--resolv-conf", type=Path, default=DEFAULT_RESOLV_CONF, help="kept on Tor's DNS"
    )
    p.add_argument(
        "--clearnet-resolv-conf",
        type=Path,
        default=DEFAULT_CLEARNET_CONF,
        help="NetworkManager's DNS servers, for the clearnet users",
    )
    p.add_argument("--passwd", type=Path, default=PASSWD, help="the account database")
    p.add_argument(
        "--nm-bus", metavar="ADDRESS", help="NetworkManager's D-Bus address (default: system bus)"
    )
    p.add_argument(
        "--bus",
        metavar="ADDRESS",
        help="where to offer org.boum.tails.Firewall (default: the system bus; 'none': nowhere)",
    )
    # Tests shrink it to make the kernel drop events (ENOBUFS) on purpose.
    p.add_argument("--netlink-rcvbuf", type=int, default=RCVBUF, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return Options(
        policy=args.policy,
        state_dir=args.state_dir,
        proc_sys=args.proc_sys,
        quiet=args.quiet_ms / 1000,
        max_delay=args.max_delay_ms / 1000,
        netlink_rcvbuf=args.netlink_rcvbuf,
        resolv_conf=args.resolv_conf,
        clearnet_conf=args.clearnet_resolv_conf,
        passwd=args.passwd,
        nm_bus=args.nm_bus,
        bus=None if args.bus == "none" else args.bus,
        serve_bus=args.bus != "none",
    )


def real_parts(options: Options) -> Parts:
    """The composition root: the real outside worlds."""
    files = (options.resolv_conf, options.clearnet_conf)
    return Parts(
        nft=Nft(),
        netlink=NetlinkSource(options.netlink_rcvbuf),
        sysctl=Sysctl(options.proc_sys),
        notify=Notifier(),
        sources=[ResolvWatch(files), NetworkManagerSource(options.nm_bus), NftMonitor()],
        files=ResolvFiles(*files),
        accounts=AccountsSource((), options.passwd),
        audit=lambda group: DropAudit(group=group),
        lookup_uids=lambda policy: users.lookup_uids(policy, options.passwd),
        list_ruleset=list_in_child,
    )


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    setup_logging()
    return asyncio.run(Daemon(options, real_parts(options)).run())


if __name__ == "__main__":
    sys.exit(main())
