"""A bus connection that waits when its socket is full, instead of dying.

dbus-fast's asyncio writer (inherited from python-dbus-next) calls
`sock.send()` on a non-blocking socket and treats every exception as fatal,
BlockingIOError (EAGAIN: the socket's buffer is full) included: a bus that
stalls for a while (dbus-daemon stopped, swapped out, flooded) makes it drop
the connection.  Known upstream: altdesktop/python-dbus-next#153 ("Aio
write_callback terminates connection upon EAGAIN error instead of ignoring
this error and retrying", fix proposed in PR #154, not merged); dbus-fast
5.2's `_MessageWriter.write_callback` still does the same.

`patient(bus)` wraps the writer's socket so that a full socket reads as
"0 bytes sent": the writer then keeps the rest of the message and waits for
the socket to be writable, which is what it does after a partial write.
Bounded: once more than MAX_QUEUED messages wait, the error goes through
and the connection ends as before (the callers reconnect).  Only plain
`send` is wrapped: tailsfwd never passes file descriptors (`sendmsg`).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from dbus_fast.aio import MessageBus

MAX_QUEUED = 4096  # messages waiting for the socket before the connection is given up


class _PatientSocket:
    def __init__(self, sock: socket.socket, queued: Callable[[], int]) -> None:
        self._sock = sock
        self._queued = queued

    def send(self, data: Any) -> int:
        try:
            return self._sock.send(data)
        except BlockingIOError:
            if self._queued() > MAX_QUEUED:
                raise
            return 0  # the writer waits for writability, as after a partial write

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def patient(bus: MessageBus) -> MessageBus:
    """`bus` (connected) with a writer that waits on a full socket; returns it."""
    writer = bus._writer
    sock: Any = None if writer is None else writer.sock
    if writer is not None and isinstance(sock, socket.socket):
        messages = writer.messages
        writer.sock = _PatientSocket(sock, lambda: len(messages))  # type: ignore[assignment]
    return bus
