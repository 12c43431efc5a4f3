"""Foreign changes to each guest's ruleset, from nftables' notifications
inside the guest: a source of `GuestTouched`.

nftables tells only the members of NFNLGRP_NFTABLES in the namespace where
a transaction commits, so each guest needs a socket of its own, opened from
inside it (a socket stays in the namespace it was made in).  The guests
effect opens it just before its own commit there (`tailsfw.guests`), and
reads it up to the end of that commit (`past_own_commit`): what the socket
holds from then on about the `tailsfw` table is another process's doing,
or notifications lost, and the guest side is done again.  (Opened after
the commit, a change made in between would go unseen: a few milliseconds,
which a flush every 20 ms hit.)  The effect closes the socket before it
commits there again.  The sockets are read by the loop (`add_reader`,
non-blocking), decoded as nftmonitor decodes the host's.
"""

from __future__ import annotations

import asyncio
import errno
import os
import secrets
import socket
import threading
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from .events import GuestTouched
from .netnsfiles import NetnsId
from .nftmonitor import RECV_SIZE, Generation, Transactions, decode, open_socket, own_task

TABLE = "tailsfw"
# A guest's table is small: room for a few replacements while the loop is busy.
RCVBUF = 256 * 1024


Task = tuple[int, str]  # a committing thread: its id, and the name it took


def subscribed() -> tuple[socket.socket, Task]:
    """From the thread inside the guest that is about to commit there: a
    socket for the guest's notifications, and the thread as the end of its
    commit will name it: its id, and a name of its own given now (in a
    container the kernel names the thread by its id outside, which the
    thread cannot know)."""
    sock = open_socket(RCVBUF)
    try:
        name = "tfw" + secrets.token_hex(6)  # a task's name holds 15 characters
        Path("/proc/thread-self/comm").write_text(name)
    except BaseException:
        sock.close()
        raise
    return sock, (threading.get_native_id(), name)


def past_own_commit(sock: socket.socket, task: Task) -> None:
    """Read `sock` up to the end of the transaction `task` (`subscribed()`)
    committed: its notifications are queued before the commit returns, and
    it replaced the table whole, so what came before it is moot."""
    while True:
        try:
            data = sock.recv(RECV_SIZE)
        except BlockingIOError:
            raise OSError(errno.ENOBUFS, "the commit's notifications were lost") from None
        for n in decode(data):
            if isinstance(n, Generation) and (n.pid == task[0] or n.process == task[1]):
                return


@dataclass
class _Followed:
    identity: NetnsId
    sock: socket.socket
    transactions: Transactions


class GuestWatch:
    """The guests' sockets, handed over by the guests effect (`follow`,
    `unfollow`), and what they say, as events."""

    name = "guestwatch"

    def __init__(self) -> None:
        self._events: asyncio.Queue[GuestTouched] = asyncio.Queue()
        self._followed: dict[str, _Followed] = {}

    async def events(self) -> AsyncIterator[GuestTouched]:
        while True:
            yield await self._events.get()

    def follow(self, name: str, identity: NetnsId, sock: socket.socket) -> None:
        """Read `sock` (opened inside `name`, read past our commit there)."""
        self.unfollow(name)
        transactions = Transactions(TABLE, own_task(os.getpid()))
        self._followed[name] = _Followed(identity, sock, transactions)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._read, name)

    def unfollow(self, name: str) -> None:
        followed = self._followed.pop(name, None)
        if followed is not None:
            asyncio.get_running_loop().remove_reader(followed.sock.fileno())
            followed.sock.close()

    def unfollow_all_but(self, kept: Mapping[str, NetnsId]) -> None:
        """Stop reading every guest but those of `kept` (name -> identity)."""
        for name, followed in list(self._followed.items()):
            if kept.get(name) != followed.identity:
                self.unfollow(name)

    def _read(self, name: str) -> None:
        followed = self._followed[name]
        try:
            data = followed.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as e:
            # ENOBUFS: what overflowed is gone; anything else: the socket is.
            what = "notifications lost" if e.errno == errno.ENOBUFS else f"socket: {e}"
            self._touched(name, followed, 0, "", what)
            return
        for notice in decode(data):
            event = followed.transactions.feed(notice)
            if event is not None:
                self._touched(name, followed, event.pid, event.process, event.what)
                return

    def _touched(self, name: str, followed: _Followed, pid: int, process: str, what: str) -> None:
        # One is enough: the guest is done again, with a socket of its own.
        self.unfollow(name)
        self._events.put_nowait(GuestTouched(name, followed.identity, pid, process, what))
