"""The lab's one way to wait for a condition: poll it until it holds."""

from __future__ import annotations

import time
from collections.abc import Callable


class NotInTime(AssertionError):
    """A condition did not hold within its time; the message names it."""


def wait_for(
    check: Callable[[], bool],
    timeout: float = 2.0,
    poll: float = 0.002,
    *,
    what: str = "the condition",
    why: Callable[[], str] | None = None,
) -> float:
    """Seconds until `check()` held; NotInTime after `timeout`, naming `what`
    and, if given, `why()` (a log's tail, say)."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            detail = f": {why()}" if why is not None else ""
            raise NotInTime(f"{what} not within {timeout:g} s{detail}")
        time.sleep(poll)
    return time.monotonic() - start
