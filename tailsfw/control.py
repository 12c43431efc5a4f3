"""The one way to steer and ask the daemon: SIGHUP, the D-Bus service and
tests all go through a `Control`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from .status import Status


class Control(Protocol):
    def status(self) -> Status:
        """What is in force now, as the kernel holds it."""
        ...

    def reload(self) -> bool:
        """Adopt the policy file again; False (and nothing changed) if refused."""
        ...

    def subscribe(self, callback: Callable[[Status], None]) -> None:
        """Call `callback` with the new status every time it is published."""
        ...
