"""When the loop acts on a burst of changes: decided from times and order
alone (`Coalescer`, `superseded_dropped`: pure), and timed on the loop (`Burst`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from .events import Event, LinksChanged

# Coalescing (measured by bench/daemon.py): a burst is committed 2 ms after
# its last change (NetworkManager's address, route and link events come
# within a millisecond), and during a storm at least every 20 ms: a change is
# in force within 20 ms plus one commit even then, and a storm costs at most
# 50 commits a second however many changes it brings.
QUIET = 0.002
MAX_DELAY = 0.020


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


def superseded_dropped(events: list[Event]) -> list[Event]:
    """`events` without the link states a later one replaces (each is whole):
    when the loop falls behind, only the newest is folded."""
    last = max((i for i, e in enumerate(events) if isinstance(e, LinksChanged)), default=-1)
    return [e for i, e in enumerate(events) if i >= last or not isinstance(e, LinksChanged)]


class Burst:
    """A `Coalescer` on the running loop: `action(cause)` once each burst is
    due, the cause being what started the burst."""

    def __init__(self, quiet: float, max_delay: float, action: Callable[[str], None]) -> None:
        self.coalescer = Coalescer(quiet, max_delay)
        self._action = action
        self._timer: asyncio.TimerHandle | None = None
        self._cause = ""

    def change(self, cause: str) -> None:
        loop = asyncio.get_running_loop()
        self.coalescer.change(loop.time())
        self._cause = self._cause or cause
        if self._timer is None:
            self._schedule(loop)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

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
        cause, self._cause = self._cause, ""
        self._action(cause)
