"""The one reporter: one `Status` value, published to status.json, systemd's
`STATUS=` and the subscribers (the D-Bus service), in that order.

Published at once when asked (`publish`), at most every PUBLISH_INTERVAL
during storms (`publish_soon`: a storm of 2,000 interfaces must not cost a
2,000-entry status per change, and the last change is always published),
when a `probe` value changes (the drops, polled every POLL seconds), and at
least every HEARTBEAT seconds even when nothing changes, so that the file's
`updated` time says the daemon is alive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from .status import HEARTBEAT, Status, write_status

log = logging.getLogger("tailsfwd")

PUBLISH_INTERVAL = 0.1
POLL = 1.0


class Reporter:
    def __init__(
        self,
        path: Path,
        notify: Callable[..., None],
        status: Callable[[], Status],
        probe: Callable[[], object] = lambda: None,
    ) -> None:
        self.path = path
        self._notify = notify
        self._status = status
        self._probe = probe
        self._subscribers: list[Callable[[Status], None]] = []
        self._published = -HEARTBEAT  # monotonic time of the last publish
        self._timer: asyncio.TimerHandle | None = None

    def subscribe(self, callback: Callable[[Status], None]) -> None:
        self._subscribers.append(callback)

    def publish(self, **extra: str) -> None:
        """Tell the file, systemd and the subscribers now; failures are only logged."""
        self.cancel()
        self._published = time.monotonic()
        status = self._status()
        # The file first: whoever hears READY=1 can read the status at once.
        try:
            write_status(self.path, status)
        except OSError as e:
            log.error("cannot write the status file %s: %s", self.path, e)
        self._notify(**extra, STATUS=status.line())
        for callback in self._subscribers:
            try:
                callback(status)
            except Exception:
                log.exception("a status subscriber failed")

    def publish_soon(self) -> None:
        """Publish now, or PUBLISH_INTERVAL after the last publish if that is later."""
        if self._timer is not None:
            return
        wait = self._published + PUBLISH_INTERVAL - time.monotonic()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a test driving Control): nothing to wait with
            wait = 0
        if wait <= 0:
            self.publish()
        else:
            self._timer = loop.call_later(wait, self.publish)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def run(self) -> None:
        """The probe's changes and the heartbeat, for as long as the daemon runs."""
        last = self._probe()
        while True:
            await asyncio.sleep(min(POLL, HEARTBEAT))
            now = self._probe()
            if now != last or time.monotonic() - self._published >= HEARTBEAT - POLL / 2:
                last = now
                self.publish()
