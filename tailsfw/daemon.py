"""tailsfwd: keeps the ruleset and the kernel settings right while it runs.

Lifetime, fail closed on every path:
- start: load the policy, set the sysctls, read links and addresses,
  compile, apply in one transaction, and only then tell systemd READY=1;
- events: link and address snapshots are coalesced, recompiled, and only
  what changed is committed (nothing, the set elements, or everything);
- SIGHUP: re-read the policy; a broken one changes nothing;
- SIGTERM/SIGINT: exit 0.  Nothing, on any path, removes or loosens rules.

If the first apply fails, tailsfwd makes sure a tailsfw ruleset is in force
(the lockdown one when there is none) and exits non-zero: see `fail_closed`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from . import compiler, users
from .facts import Facts
from .netlink import RCVBUF, NetlinkSource, Snapshot
from .nft import Nft, NftError
from .notify import Notifier, watchdog_interval
from .policy import Policy, PolicyError
from .policy import load as load_policy
from .status import Counters, Status, write_status
from .sysctl import DEFAULT_ROOT, Sysctl

log = logging.getLogger("tailsfwd")

DEFAULT_POLICY = Path("/etc/tailsfw/policy.toml")
DEFAULT_STATE_DIR = Path("/run/tailsfw")
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
EXIT_FAILED = 1


class NftApi(Protocol):
    def apply(self, document: dict[str, Any]) -> None: ...
    def list_ruleset(self) -> list[dict[str, Any]]: ...


class SnapshotSource(Protocol):
    reads: int
    last_error: str

    def snapshots(self) -> AsyncIterator[Snapshot]: ...


@dataclass(frozen=True)
class Options:
    policy: Path = DEFAULT_POLICY
    state_dir: Path = DEFAULT_STATE_DIR
    proc_sys: Path = DEFAULT_ROOT
    quiet: float = QUIET
    max_delay: float = MAX_DELAY
    netlink_rcvbuf: int = RCVBUF


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


class Daemon:
    def __init__(
        self,
        options: Options,
        nft: NftApi | None = None,
        source: SnapshotSource | None = None,
        notify: Notifier | None = None,
    ) -> None:
        self.options = options
        self.nft: NftApi = nft if nft is not None else Nft()
        self.source: SnapshotSource = (
            source if source is not None else NetlinkSource(options.netlink_rcvbuf)
        )
        self.notify = notify if notify is not None else Notifier()
        self.sysctl = Sysctl(options.proc_sys)
        self.policy: Policy | None = None
        self.uids: Mapping[str, int] = MappingProxyType({})
        self.snapshot = Snapshot()
        self.in_force: compiler.Ruleset | None = None
        self.digest = ""
        self.state = "starting"
        self.last_error = ""
        self.counters = Counters()
        self.interfaces: dict[int, str] = {}
        self.coalescer = Coalescer(options.quiet, options.max_delay)
        self.started = False
        self.reload_pending = False
        self._timer: asyncio.TimerHandle | None = None
        self._retry: asyncio.TimerHandle | None = None

    # -- enforcing ----------------------------------------------------------

    def enforce(self, policy: Policy, uids: Mapping[str, int]) -> str:
        """Compile with the latest facts and commit what changed.

        Returns "unchanged", "sets" or "replaced".  Raises NftError
        with the ruleset in force untouched (every commit is
        one transaction).
        """
        ruleset = compiler.compile_policy(
            policy, Facts(uids=uids, connected=self.snapshot.connected)
        )
        changes = None if self.in_force is None else ruleset.changes_since(self.in_force)
        if changes == []:
            self.counters.unchanged += 1
            return "unchanged"
        outcome = "replaced"
        if changes is not None:
            try:
                self.nft.apply(ruleset.document(changes))
                outcome = "sets"
            except NftError as e:
                # The tables may not be what we last loaded (someone changed
                # them): replacing them puts the whole ruleset back.
                log.warning("set update refused (%s): replacing the tables instead", e)
        if outcome == "replaced":
            self.nft.apply(ruleset.document())
            self.counters.replacements += 1
        else:
            self.counters.set_updates += 1
        self.counters.commits += 1
        for warning in sorted(set(ruleset.warnings) - set(self._warnings())):
            log.warning("%s", warning)
        self.in_force = ruleset
        self.digest = ruleset.digest()
        return outcome

    def _warnings(self) -> tuple[str, ...]:
        return self.in_force.warnings if self.in_force is not None else ()

    # -- facts --------------------------------------------------------------

    def observe(self, snapshot: Snapshot) -> bool:
        """Take a new snapshot; True if the ruleset's facts changed.

        New (or renamed) interfaces get IPv6 switched off at once, before any
        coalescing: the ruleset drops IPv6 anyway, this is the second line.
        """
        names = snapshot.names
        for index, name in sorted(names.items()):
            old = self.interfaces.get(index)
            if old == name:
                continue
            if old is not None:
                self.sysctl.forget_interface(old)
            state = self.sysctl.interface(name)
            if not state.ok:
                log.warning("interface %s: %s", name, state.note)
        for index in self.interfaces.keys() - names.keys():
            self.sysctl.forget_interface(self.interfaces[index])
        interfaces_changed = names != self.interfaces
        self.interfaces = dict(names)
        changed = snapshot.connected != self.snapshot.connected
        if changed and log.isEnabledFor(logging.DEBUG):
            log.debug("connected: %s", ", ".join(sorted(map(str, snapshot.connected))))
        self.snapshot = snapshot
        if interfaces_changed and self.started:
            self.publish()  # the status lists interfaces and their sysctls
        return changed

    # -- start --------------------------------------------------------------

    async def start(self, snapshots: AsyncIterator[Snapshot]) -> None:
        policy = load_policy(self.options.policy)
        for state in self.sysctl.apply_boot():
            if not state.ok:
                log.warning("sysctl %s: %s", state.name, state.note)
        try:
            first = await asyncio.wait_for(anext(snapshots), FIRST_SNAPSHOT_TIMEOUT)
        except TimeoutError:
            raise StartError(
                f"no link and address state from netlink within {FIRST_SNAPSHOT_TIMEOUT} s"
            ) from None
        self.observe(first)
        uids = users.lookup_uids(policy)
        self.enforce(policy, uids)
        self.policy, self.uids = policy, uids
        self.state = "enforcing"
        log.info("ruleset %s in force (%s)", self.digest[:12], self.options.policy)

    def fail_closed(self, error: BaseException) -> int:
        """The first apply failed: leave a tailsfw ruleset in force, and exit.

        A tailsfw ruleset already in force (a restart) stays as it is;
        otherwise the lockdown ruleset (loopback only) is loaded.  Exiting,
        rather than running degraded, lets systemd see the failure (the unit
        fails, Restart= tries again) and never says READY=1 about a ruleset
        that is not the policy's; the kernel keeps the rules after we exit.
        """
        self.last_error = _describe(error)
        log.critical("cannot enforce the policy: %s", self.last_error)
        try:
            present = tailsfw_families(self.nft.list_ruleset())
        except NftError as e:
            log.error("cannot list the ruleset in force (%s): loading the lockdown ruleset", e)
            present = set()
        if present >= set(compiler.FAMILIES.values()):
            self.state = "failed"
            log.critical("the tailsfw ruleset already in force stays in force; exiting")
        else:
            try:
                self.nft.apply(compiler.lockdown().document())
            except NftError as e:
                self.state = "failed"
                self.last_error += f"; and the lockdown ruleset was refused too: {e}"
                log.critical("cannot load the lockdown ruleset either: %s", e)
            else:
                self.state = "lockdown"
                log.critical("lockdown ruleset loaded: only loopback traffic passes; exiting")
        self.publish()
        return EXIT_FAILED

    # -- events -------------------------------------------------------------

    def changed(self) -> None:
        """The facts changed: commit once the burst is due."""
        loop = asyncio.get_running_loop()
        self.coalescer.change(loop.time())
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
        self.commit()

    def commit(self) -> None:
        """Enforce the current policy with the latest facts; never raises."""
        assert self.policy is not None
        try:
            outcome = self.enforce(self.policy, self.uids)
        except NftError as e:
            self._refused(f"commit refused: {e}")
            return
        except Exception as e:  # a bug must not stop the loop that keeps the rules
            log.exception("commit failed")
            self._refused(f"commit failed: {_describe(e)}")
            return
        log.debug("commit: %s", outcome)
        if outcome != "unchanged":
            self.last_error = ""
            self.publish()

    def _refused(self, message: str) -> None:
        self.counters.refused += 1
        self.last_error = message
        log.error(
            "%s; ruleset %s stays in force; trying again in %s s",
            message,
            self.digest[:12],
            RETRY_DELAY,
        )
        self.publish()
        if self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(RETRY_DELAY, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self.changed()

    def reload(self) -> bool:
        """SIGHUP: adopt the policy file again, or keep everything as it is."""
        if not self.started:
            self.reload_pending = True
            return False
        self.notify(RELOADING="1", MONOTONIC_USEC=str(time.monotonic_ns() // 1000))
        self.counters.reloads += 1
        try:
            policy = load_policy(self.options.policy)
            uids = users.lookup_uids(policy)
            self.enforce(policy, uids)
        except Exception as e:  # whatever it is, the reload changes nothing
            self.counters.reloads_refused += 1
            self.last_error = f"reload refused: {_describe(e)}"
            log.error(
                "%s; ruleset %s and the previous policy stay in force",
                self.last_error,
                self.digest[:12],
            )
            ok = False
        else:
            self.policy, self.uids = policy, uids
            self.last_error = ""
            log.info("policy reloaded: ruleset %s in force", self.digest[:12])
            ok = True
        self.publish(READY="1")
        return ok

    # -- reporting ----------------------------------------------------------

    def status(self) -> Status:
        sysctls = list(self.sysctl.states)
        warnings = list(self._warnings()) + [
            f"sysctl {s.name}: {s.note}" for s in sysctls if not s.ok
        ]
        return Status(
            pid=os.getpid(),
            state=self.state,
            policy=str(self.options.policy),
            ruleset=self.digest,
            lan_mode=self.policy.lan.mode if self.policy else "",
            connected=sorted(str(n) for n in self.snapshot.connected),
            interfaces=dict(sorted(self.interfaces.items())),
            warnings=warnings,
            last_error=self.last_error,
            counters=self.counters,
            sysctls=sysctls,
            netlink_reads=self.source.reads,
        )

    def publish(self, **extra: str) -> None:
        """Tell systemd and the state file; a failure here is only logged."""
        status = self.status()
        # The file first: whoever hears READY=1 can read the status at once.
        try:
            write_status(self.options.state_dir / STATUS_FILE, status)
        except OSError as e:
            log.error("cannot write the status file in %s: %s", self.options.state_dir, e)
        self.notify(**extra, STATUS=status.line())

    # -- the loop -----------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop: asyncio.Future[None] = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _set, stop)
        # Installed before the start: SIGHUP's default action would kill us.
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        snapshots = self.source.snapshots()
        try:
            await self.start(snapshots)
        except Exception as e:
            await _close(snapshots)
            return self.fail_closed(e)
        self.started = True
        self.publish(READY="1")
        tasks = {asyncio.create_task(self._follow(snapshots), name="netlink")}
        interval = watchdog_interval()
        if interval is not None:
            tasks.add(asyncio.create_task(self._watchdog(interval), name="watchdog"))
        if self.reload_pending:
            self.reload()
        try:
            done, _ = await asyncio.wait({stop, *tasks}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await _close(snapshots)
        if stop in done:
            log.info("stopping; ruleset %s stays in force", self.digest[:12])
            return 0
        for ended in tasks & done:
            log.critical(
                "%s stopped: %r; ruleset %s stays in force",
                ended.get_name(),
                ended.exception(),
                self.digest[:12],
            )
        return EXIT_FAILED

    async def _follow(self, snapshots: AsyncIterator[Snapshot]) -> None:
        async for snapshot in snapshots:
            if self.observe(snapshot):
                self.changed()
        raise RuntimeError("the netlink source ended")

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notify(WATCHDOG="1")
            await asyncio.sleep(interval)


def tailsfw_families(ruleset: list[dict[str, Any]]) -> set[str]:
    """The families that have a tailsfw table in a `list ruleset` answer."""
    return {
        o["table"]["family"]
        for o in ruleset
        if "table" in o and o["table"].get("name") == compiler.TABLE
    }


def _set(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _close(snapshots: AsyncIterator[Snapshot]) -> None:
    aclose = getattr(snapshots, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


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
    debug = bool(os.environ.get("TAILSFWD_DEBUG"))
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO, handlers=[handler], force=True
    )
    logging.getLogger("pyroute2").setLevel(logging.WARNING)  # its debug is per message


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
    )


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    setup_logging()
    return asyncio.run(Daemon(options).run())


if __name__ == "__main__":
    sys.exit(main())
