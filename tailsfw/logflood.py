"""Log floods held back: repeated messages of one kind become one summary.

A hostile program can make tailsfwd log at its own rate (rewriting a file we
keep a thousand times a second, a NetworkManager changing as often); each
line would be true, and journald's per-service limit (10,000 per 30 s by
default) would then drop our other messages, refused-packet entries
included.  `RateLimit` lets the first `burst` messages of each kind (logger,
level, message template: "rewrote %s" is one kind whatever the path) through
in a window, counts the rest, and logs one summary per kind when its window
ends (at once if an asyncio loop runs, else with the next message).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

BURST = 10
WINDOW = 10.0  # seconds
MAX_KINDS = 256  # kinds followed at once; beyond, the oldest windows end early
SUMMARY = "tailsfw_summary"  # the attribute that marks our own summaries


@dataclass
class _Window:
    start: float
    passed: int = 1
    held: int = 0


Kind = tuple[str, int, str]


class RateLimit(logging.Filter):
    """A filter for a handler: at most `burst` messages of a kind a `window`."""

    def __init__(
        self,
        burst: int = BURST,
        window: float = WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.window = window
        self.clock = clock
        self._windows: dict[Kind, _Window] = {}
        self._timer: asyncio.TimerHandle | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, SUMMARY, False) or record.levelno < logging.INFO:
            return True
        now = self.clock()
        self.flush(now)
        kind = (record.name, record.levelno, str(record.msg))
        window = self._windows.get(kind)
        if window is None:
            if len(self._windows) >= MAX_KINDS:
                self._end(next(iter(self._windows)))
            self._windows[kind] = _Window(now)
            return True
        if window.passed < self.burst:
            window.passed += 1
            return True
        window.held += 1
        self._wake_at(window.start + self.window - now)
        return False

    def flush(self, now: float | None = None) -> None:
        """Ends the windows that are over, with a summary for each that held messages."""
        now = self.clock() if now is None else now
        for kind in [k for k, w in self._windows.items() if now - w.start >= self.window]:
            self._end(kind)

    def _end(self, kind: Kind) -> None:
        window = self._windows.pop(kind)
        if window.held:
            name, level, template = kind
            logging.getLogger(name).log(
                level,
                "%d more messages like %r left out (over %d in %g s)",
                window.held, template, self.burst, self.window,
                extra={SUMMARY: True},
            )  # fmt: skip

    def _wake_at(self, delay: float) -> None:
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: the next message brings the summary
        self._timer = loop.call_later(max(delay, 0.0), self._woken)

    def _woken(self) -> None:
        self._timer = None
        self.flush()
        if self._windows and any(w.held for w in self._windows.values()):
            first = min(w.start for w in self._windows.values() if w.held)
            self._wake_at(first + self.window - self.clock())
