"""The dropped-packet audit: NFLOG group -> rate limit -> journal, as one asyncio task.

    audit = DropAudit(group=policy.log.group)
    task = asyncio.create_task(audit.run())   # cancel it to stop
    audit.counters(names)                     # for the status (uid -> name given)

`AuditEffect` keeps one audit on the policy's group for the daemon.

The loop only reads and counts: the socket is nonblocking and read through
`loop.add_reader`, a read takes at most a `Budget` share of a core (past it,
reading pauses and the kernel counts what it could not queue as lost), and
journal entries are rendered and sent by one writer thread, so a slow or
stopped journald never stalls the loop: when the writer falls behind, its
entries are counted as unwritten instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pwd
import queue
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

from systemd import journal

from .droplog import (
    DEFAULT_LIMITS,
    Budget,
    DropKey,
    DropSummary,
    DropUser,
    Fields,
    Limiter,
    Limits,
    Summary,
    drop_entry,
    loss_entry,
    summary_entry,
)
from .nflog import Batch, Drop, NflogSocket
from .status import DropCounters

if TYPE_CHECKING:
    from .desired import Desired

log = logging.getLogger(__name__)

Send = Callable[..., Any]
RETRY_SECONDS = 5.0  # between attempts to bind the group
QUEUE = 1024  # entries waiting for the writer
READ_LIMIT = 256  # datagrams per wake-up, so other tasks get their turn
COUNTED_USERS = 64  # distinct uids counted by name; more go to "(other users)"
COUNTED_REASONS = 16
NO_SOCKET = "(no socket)"
OTHER_USERS = "(other users)"
OTHER_REASONS = "(other reasons)"
LOSS_LIMITS = Limits(burst=1, share=1, users=1)


def user_name(uid: int | None) -> str:
    if uid is None:
        return NO_SOCKET
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def interface_name(index: int) -> str:
    if index == 0:
        return ""
    try:
        return socket.if_indextoname(index)
    except OSError:
        return str(index)  # gone already


class JournalWriter:
    """One thread that renders and sends entries, in order; never blocks the caller."""

    def __init__(self, send: Send, size: int = QUEUE) -> None:
        self._send = send
        self._queue: queue.Queue[Callable[[], Fields] | None] = queue.Queue(size)
        self._thread = threading.Thread(target=self._run, name="journal-writer", daemon=True)
        self.errors = 0
        self.last_error = ""

    def start(self) -> None:
        self._thread.start()

    def put(self, render: Callable[[], Fields]) -> bool:
        """Queue an entry; False (not queued) when the writer is that far behind."""
        try:
            self._queue.put_nowait(render)
        except queue.Full:
            return False
        return True

    def stop(self, timeout: float = 1.0) -> None:
        """Write what is queued (for up to `timeout`), then end the thread."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (render := self._queue.get()) is not None:
            try:
                self._send(**render())
            except Exception as e:  # a bad entry must not end the writer
                self.errors += 1
                self.last_error = f"journal: {e}"


class DropAudit:
    def __init__(
        self,
        group: int,
        send: Send = journal.send,
        clock: Callable[[], float] = time.monotonic,
        user_name: Callable[[int | None], str] = user_name,
        interface_name: Callable[[int], str] = interface_name,
        limits: Limits = DEFAULT_LIMITS,
        budget: Budget | None = None,
        open_socket: Callable[[int], NflogSocket] = NflogSocket,
        cpu_clock: Callable[[], float] = time.thread_time,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.group = group
        self.bound = asyncio.Event()
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._wall_clock = wall_clock
        self._user_name = user_name
        self._interface_name = interface_name
        self._limiter: Limiter[DropUser, DropKey] = Limiter(limits)
        self._losses: Limiter[str, str] = Limiter(LOSS_LIMITS)
        self._budget = budget if budget is not None else Budget()
        self._open_socket = open_socket
        self._writer = JournalWriter(send)
        self._counters = DropCounters()
        self._by_uid: dict[int | None, int] = {}
        self._sock: NflogSocket | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False

    def counters(self, names: Mapping[int, str] | None = None) -> DropCounters:
        """A copy, with users by name: from `names` (uid -> account, the
        daemon's accounts facts: no lookup on its loop) when given, else by
        the `user_name` function."""
        by_user: dict[str, int] = {}
        for uid, n in self._by_uid.items():
            if uid == -1:
                name = OTHER_USERS
            elif names is None or uid is None:
                name = self._user_name(uid)
            else:
                name = names.get(uid, str(uid))
            by_user[name] = by_user.get(name, 0) + n
        return replace(
            self._counters,
            by_user=dict(sorted(by_user.items())),
            by_reason=dict(sorted(self._counters.by_reason.items())),
            last_error=self._counters.last_error or self._writer.last_error,
        )

    async def run(self) -> None:
        """Bind the group (retrying while it cannot), then read until cancelled.
        On the way out every open summary is written: no count is left unsaid."""
        loop = asyncio.get_running_loop()
        self._writer.start()
        try:
            self._sock = await self._bind()
            self._counters.bound = True
            self.bound.set()
            loop.add_reader(self._sock.fileno(), self._readable)
            await asyncio.Future()  # until cancelled
        finally:
            if self._timer is not None:
                self._timer.cancel()
            if self._sock is not None:
                loop.remove_reader(self._sock.fileno())
                self._sock.close()
            self._counters.bound = False
            self._summaries(self._limiter.flush(), self._losses.flush())
            self._writer.stop()

    async def _bind(self) -> NflogSocket:
        while True:
            try:
                return self._open_socket(self.group)
            except OSError as e:
                message = f"cannot read NFLOG group {self.group}: {e}; retrying"
                if message != self._counters.last_error:
                    log.warning("%s", message)
                self._counters.last_error = message
            await asyncio.sleep(RETRY_SECONDS)

    def _readable(self) -> None:
        assert self._sock is not None
        cpu = self._cpu_clock()
        try:
            self.account(self._sock.read(self._wall_clock(), READ_LIMIT), self._clock())
        except OSError as e:  # not ENOBUFS (counted): note it, keep reading
            self._counters.last_error = f"NFLOG group {self.group}: {e}"
        # Within the budget even if an error repeats: never a busy loop.
        resume = self._budget.spend(self._cpu_clock() - cpu, self._clock())
        if resume is not None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._sock.fileno())
            loop.call_later(resume - self._clock(), self._resume)

    def _resume(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().add_reader(self._sock.fileno(), self._readable)

    def account(self, batch: Batch, now: float) -> None:
        """Count a batch, and queue what the limiter lets through."""
        c = self._counters
        c.overruns += batch.overruns
        c.malformed += len(batch.malformed)
        if batch.malformed:
            c.last_error = f"skipped a malformed NFLOG message: {batch.malformed[-1]}"
        if batch.lost:
            c.lost += batch.lost
            if self._losses.offer("lost", "lost", now, batch.lost):
                self._write(partial(loss_entry, batch.lost))
        by_uid, by_reason = self._by_uid, c.by_reason
        for drop in batch.drops:
            c.drops += 1
            uid = drop.uid if drop.uid in by_uid or len(by_uid) < COUNTED_USERS else -1
            by_uid[uid] = by_uid.get(uid, 0) + 1
            reason = drop.prefix
            if reason not in by_reason and len(by_reason) >= COUNTED_REASONS:
                reason = OTHER_REASONS
            by_reason[reason] = by_reason.get(reason, 0) + 1
            if self._limiter.offer(drop.uid, (drop.dst, drop.prefix), now):
                if self._write(partial(self._drop_fields, drop)):
                    c.logged += 1
            else:
                c.suppressed += 1
        self._summaries(self._limiter.due(now), self._losses.due(now))
        self._schedule()

    def _write(self, render: Callable[[], Fields]) -> bool:
        if self._writer.put(render):
            return True
        self._counters.unwritten += 1
        return False

    def _drop_fields(self, drop: Drop) -> Fields:
        names = self._interface_name
        return drop_entry(drop, self._user_name(drop.uid), names(drop.indev), names(drop.outdev))

    def _summaries(self, drops: list[DropSummary], losses: list[Summary[str, str]]) -> None:
        for summary in drops:
            if self._write(partial(summary_entry, summary, self._user_name)):
                self._counters.summaries += 1
        for loss in losses:
            self._write(partial(loss_entry, loss.suppressed, loss.seconds))

    def _schedule(self) -> None:
        """A timer for the next summary, so that it comes even when traffic stops."""
        due = min(
            (t for t in (self._limiter.next_due(), self._losses.next_due()) if t is not None),
            default=None,
        )
        if due is None:
            return
        loop = asyncio.get_running_loop()
        at = loop.time() + max(due - self._clock(), 0.0)
        if self._timer is not None and not self._timer.cancelled():
            if self._timer.when() <= at:
                return
            self._timer.cancel()
        self._timer = loop.call_at(at, self._tick)

    def _tick(self) -> None:
        self._timer = None
        now = self._clock()
        self._summaries(self._limiter.due(now), self._losses.due(now))
        self._schedule()


class AuditEffect:
    """The audit of the policy's NFLOG group, as an effect: one `DropAudit`
    task, replaced when the group changes.  A side stream: it binds and
    retries by itself, and never stops enforcement."""

    name = "drops"

    def __init__(self, make: Callable[[int], DropAudit]) -> None:
        self._make = make
        self._running: tuple[DropAudit, asyncio.Task[None]] | None = None

    def converge(self, desired: Desired) -> bool:
        if self._running is not None and self._running[0].group == desired.log_group:
            return False
        self.stop()
        audit = self._make(desired.log_group)
        self._running = (audit, asyncio.create_task(audit.run(), name="nflog"))
        return True

    def forget(self) -> None:
        """Nothing to redo: the audit's socket is its own to keep."""

    def stop(self) -> asyncio.Task[None] | None:
        """Stop the audit (it writes its open summaries, then ends); its task."""
        if self._running is None:
            return None
        task = self._running[1]
        task.cancel()
        self._running = None
        return task

    def counters(self, names: Mapping[int, str]) -> DropCounters:
        return self._running[0].counters(names) if self._running else DropCounters()
