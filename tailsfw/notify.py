"""sd_notify(3) for tailsfwd: READY, STATUS, RELOADING and WATCHDOG messages."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("tailsfwd")

# How long READY=1 may wait for room in the manager's queue.
NOTIFY_WAIT = 1.0


class Notifier:
    """sd_notify(3) that never blocks the loop for long.

    A datagram socket blocks while the receiver's queue is full; a stuck or
    slow manager must not stop the loop that keeps the rules.  STATUS and
    WATCHDOG messages are dropped then (the next one supersedes them);
    READY=1 waits a little, since systemd would fail the start without it.
    """

    def __init__(self, address: str | None = None) -> None:
        address = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self._address = None
        if address:
            # "@name" is a Linux abstract socket, "\0name" on the wire.
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def __call__(self, **fields: str) -> None:
        address = self._address
        if address is None:
            return
        message = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            self._sock.sendto(message, socket.MSG_DONTWAIT, address)
        except BlockingIOError:
            if "READY" in fields:
                self._send_waiting(message, address)
            else:
                log.debug("sd_notify: the manager's queue is full: message dropped")
        except OSError as e:
            log.warning("sd_notify to %s: %s", self._address, e)

    def _send_waiting(self, message: bytes, address: str) -> None:
        self._sock.settimeout(NOTIFY_WAIT)
        try:
            self._sock.sendto(message, address)
        except OSError as e:
            log.warning("sd_notify READY=1 to %s: %s", address, e)
        finally:
            self._sock.setblocking(True)


def watchdog_interval() -> float | None:
    """Half of systemd's watchdog timeout, if it watches this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2 / 1_000_000
