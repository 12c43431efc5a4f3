"""tailsfwd's loop: sources -> one queue -> facts -> effects.

Every source (netlink, accounts, NetworkManager, the watched files, /run/netns, nftables'
notifications on the host and in the guests, the kernel's listing of our tables) is pumped into
one queue; each event is folded into the `Facts`; the cheap effects (sysctls, files, the drops'
audit, the namespaces' guests) converge at once; a change of what the ruleset reads is coalesced
(tailsfw/coalesce.py), then the ruleset converges; tampering is undone at once; an effect whose
converge failed is retried every RETRY_DELAY.

The start fails closed: the policy, the boot sysctls, the first link and address state (and
account database), the ruleset in force, and only then READY=1; if that fails, a tailsfw ruleset
is left in force (the lockdown one when there is none) and the daemon exits non-zero.  SIGHUP
reloads, SIGTERM and SIGINT exit 0; nothing, on any path, removes or loosens rules.  The
composition root is tailsfw/tailsfwd.py; the state and `Control`, control.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

from .coalesce import Burst, superseded_dropped
from .control import Control, describe
from .effects import RETRY_DELAY
from .enforce import FailState, fail_closed
from .events import (
    AccountsChanged,
    DnsServers,
    Event,
    FileChanged,
    GuestTouched,
    KernelChecked,
    LinksChanged,
    RulesetTouched,
    Source,
)
from .parts import Parts, Settings, effects_of
from .policy import load as load_policy

log = logging.getLogger("tailsfwd")

FIRST_STATE_TIMEOUT = 5.0
EXIT_FAILED = 1
Service = Callable[[Control], Coroutine[Any, Any, None]]


class StartError(RuntimeError):
    """The daemon could not put its ruleset in force at start."""


class Daemon:
    def __init__(self, settings: Settings, parts: Parts) -> None:
        self.settings = settings
        self.parts = parts
        self.control = Control(
            settings.policy,
            effects_of(parts),
            parts.notify,
            settings.status_file,
            lambda: parts.netlink.reads,
        )
        ruleset = self.control.effects.ruleset
        self.burst = Burst(
            settings.quiet,
            settings.max_delay,
            lambda cause: self.control.converge([ruleset], cause),
        )
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._stop: asyncio.Future[None] | None = None
        self._reads = 0  # netlink's full reads, as last reported

    def stop(self) -> None:
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(None)

    async def run(self, services: Sequence[Service] = ()) -> int:
        """Until stopped (0) or failed (EXIT_FAILED); `services` (the bus,
        the watchdog) run once the ruleset is in force."""
        loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        # Installed before the start: SIGHUP's default action would kill us.
        loop.add_signal_handler(signal.SIGHUP, self.control.reload)
        p = self.parts
        truth, accounts = self.control.effects.ruleset.truth, [p.accounts] if p.accounts else []
        sources: list[Source] = [p.netlink, truth, *accounts, *p.sources]
        pumps = {asyncio.create_task(self._pump(s), name=s.name) for s in sources}
        try:
            return await self._run(pumps, services)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def _run(self, pumps: set[asyncio.Task[None]], services: Sequence[Service]) -> int:
        stop = self._stop
        assert stop is not None  # made by run(), with the loop
        starting = asyncio.create_task(self._start())
        await asyncio.wait({starting, stop, *pumps}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            if stop.done():
                return 0  # stopped before any rule was loaded: nothing to keep
            ended = next(t for t in pumps if t.done())
            return await self._fail_closed(StartError(f"the {ended.get_name()} source ended"))
        if (error := starting.exception()) is not None:
            return await self._fail_closed(error)
        c = self.control
        c.started = True
        # What the start made lives as long as the daemon: out of the collector's
        # sight, its full passes stay short (a 30 ms pause would delay a DNS update).
        gc.freeze()
        c.reporter.publish(READY="1")
        tasks = {
            asyncio.create_task(self._loop(), name="loop"),
            asyncio.create_task(self._retrying(), name="retry"),
            asyncio.create_task(c.reporter.run(), name="report"),
        }
        # Their troubles (the bus comes later in boot, and may restart) never stop the daemon.
        side = [asyncio.create_task(service(c)) for service in services]
        if c.reload_pending:
            c.reload()
        try:
            done, _ = await asyncio.wait(
                {stop, *tasks, *pumps}, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            c.reporter.cancel()
            self.burst.cancel()
            side += c.effects.stop()
            for task in (*tasks, *side):
                task.cancel()
            await asyncio.gather(*tasks, *side, return_exceptions=True)
        if stop in done:
            log.info("stopping; ruleset %s stays in force", c.digest())
            return 0
        for ended in (tasks | pumps) & done:
            error = None if ended.cancelled() else ended.exception()
            log.critical(
                "%s stopped: %r; ruleset %s stays in force", ended.get_name(), error, c.digest()
            )
        return EXIT_FAILED

    async def _start(self) -> None:
        c, p = self.control, self.parts
        policy = load_policy(self.settings.policy)
        p.sysctl.apply_boot()
        # Other sources may speak first: fold what they say, wait for these.
        waiting: dict[type, str] = {LinksChanged: "link and address state from netlink"}
        if p.accounts is not None:
            waiting[AccountsChanged] = "account database"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FIRST_STATE_TIMEOUT
        while waiting:
            try:
                event = await asyncio.wait_for(self._queue.get(), max(deadline - loop.time(), 0))
            except TimeoutError:
                missing = " nor ".join(waiting.values())
                raise StartError(f"no {missing} within {FIRST_STATE_TIMEOUT} s") from None
            c.fold(event)
            waiting.pop(type(event), None)
        self._reads = p.netlink.reads
        c.enforce(policy, "start")
        c.report.state = "enforcing"
        log.info("ruleset %s in force (%s)", c.digest(), self.settings.policy)

    async def _fail_closed(self, error: BaseException) -> int:
        """The first apply failed: leave a tailsfw ruleset in force, and exit
        (systemd sees the failure and restarts us; never READY=1 about a
        ruleset that is not the policy's)."""
        c = self.control
        c.report.last_error = str(error) if isinstance(error, StartError) else describe(error)
        log.critical("cannot enforce the policy: %s", c.report.last_error)
        done, why = await fail_closed(self.parts.nft, self.parts.list_ruleset)
        c.report.state = "lockdown" if done is FailState.LOCKDOWN else "failed"
        if why:
            c.report.last_error += f"; and {why}"
        c.reporter.publish()
        return EXIT_FAILED

    async def _pump(self, source: Source) -> None:
        events: AsyncIterator[Event] = source.events()
        try:
            async for event in events:
                self._queue.put_nowait(event)
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        raise RuntimeError(f"the {source.name} source ended")

    async def _loop(self) -> None:
        while True:
            events = [await self._queue.get()]
            while not self._queue.empty():
                events.append(self._queue.get_nowait())
            for event in superseded_dropped(events):
                self._handle(event)

    async def _retrying(self) -> None:
        while True:
            await asyncio.sleep(RETRY_DELAY)
            if self.control.failing:
                self.control.retry()

    def _handle(self, event: Event) -> None:
        c = self.control
        ruleset, files, guests = c.effects.ruleset, c.effects.files, c.effects.guests
        if isinstance(event, RulesetTouched):
            if ruleset.touched(event):
                c.converge([ruleset], "tampering")
        elif isinstance(event, KernelChecked):
            if ruleset.checked(event):
                c.converge([ruleset], "tampering")
            c.reporter.publish_soon()  # what the kernel holds changed
        elif isinstance(event, FileChanged):
            # Our own writes are seen too: only what differs is news (resolv.py).
            if files is not None:
                files.forget()
                c.converge([files], "files")
        elif isinstance(event, GuestTouched):
            if guests is not None and guests.touched(event):
                c.converge([guests], "tampering")
        else:
            self._facts(event)

    def _facts(self, event: Event) -> None:
        c = self.control
        before = c.desired()
        c.fold(event)
        if self.parts.netlink.reads != self._reads:
            self._reads = self.parts.netlink.reads
            c.reporter.publish()  # a full re-read (after lost events) is worth reporting
        if c.facts is before.facts:
            return
        cause = type(event).__name__
        c.converge(c.effects.cheap, cause)  # each does only what changed for it
        if c.desired().ruleset_key != before.ruleset_key:
            self.burst.change(cause)
        if c.facts.interfaces != before.facts.interfaces or isinstance(event, DnsServers):
            c.reporter.publish_soon()  # the status lists interfaces, sysctls and servers
