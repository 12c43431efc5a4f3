"""Watching nftables in a lab namespace from this process, to time tailsfwd:

- `NftGenerations`: the kernel's notice of every committed nftables
  transaction; `CommitClock` timestamps them from a thread of its own;
- `MonitorThread`: tailsfw's own nftables monitor, run by a thread inside
  the namespace.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tailsfw import nlsock
from tailsfw.events import RulesetTouched
from tailsfw.nft import Nft
from tailsfw.nftmonitor import NETLINK_NETFILTER, NFNLGRP_NFTABLES, NftMonitor
from tests.lab.netns import enter_netns, in_netns

# (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN: the end of every transaction.
NFT_NEWGEN = (10 << 8) | 15


class NftGenerations:
    """Receives a timestamp for each nftables transaction committed in a namespace."""

    def __init__(self, namespace: str) -> None:
        # Every commit's notices carry the whole ruleset: room for a storm's
        # worth of them between two drains (a full buffer lost them: ENOBUFS).
        self.sock = in_netns(namespace, lambda: nlsock.open_socket(
            NETLINK_NETFILTER, rcvbuf=1 << 25, memberships=(NFNLGRP_NFTABLES,),
            blocking=True))  # fmt: skip

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> NftGenerations:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def drain(self) -> int:
        """Forget what came so far; returns how many transactions that was."""
        count = 0
        self.sock.setblocking(False)
        try:
            while True:
                count += self._count(self.sock.recv(1 << 16))
        except BlockingIOError:
            return count
        finally:
            self.sock.setblocking(True)

    def wait(self, timeout: float) -> float | None:
        """The monotonic time at which the next transaction was seen, or None."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                return None
            if self._count(data):
                return time.monotonic()

    @staticmethod
    def _count(data: bytes) -> int:
        frames, _ = nlsock.split(data)  # the lab's own kernel: nothing malformed to count
        return sum(kind == NFT_NEWGEN for kind, *_ in frames)


@dataclass(frozen=True)
class Seen:
    """An event of the monitor and the monotonic time it came out."""

    at: float
    event: RulesetTouched


class MonitorThread:
    """tailsfw's `NftMonitor`, run by a thread of this process inside a namespace.

    `commit()` commits a JSON document through libnftables from that same
    thread (as tailsfwd commits from its event loop): the monitor must take
    those commits as its own.
    """

    def __init__(
        self,
        namespace: str,
        react: Callable[[RulesetTouched, Nft], None] | None = None,
        **options: Any,
    ) -> None:
        """`react(event, nft)`, if given, runs on the monitor's thread as each
        event comes (as tailsfwd's loop would restore the ruleset)."""
        self.namespace = namespace
        self.react = react
        self.options = options
        self.seen: queue.Queue[Seen] = queue.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._nft: Nft | None = None
        self._errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MonitorThread:
        self._thread.start()
        first = self.next(5.0)  # "monitor started": subscribed from here on
        if first is None:
            self.close()
            raise RuntimeError(f"monitor did not start: {self._errors}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop is not None and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(5)

    def _run(self) -> None:
        try:
            enter_netns(self.namespace)
            asyncio.run(self._follow())
        except asyncio.CancelledError:
            pass
        except BaseException as e:
            self._errors.append(e)

    async def _follow(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._nft = Nft()  # made here: its socket is in the namespace
        async for event in NftMonitor(**self.options).events():
            at = time.monotonic()
            if self.react is not None:
                self.react(event, self._nft)
            self.seen.put(Seen(at, event))

    def next(self, timeout: float) -> Seen | None:
        try:
            return self.seen.get(timeout=timeout)
        except queue.Empty:
            return None

    def stall(self, seconds: float) -> None:
        """Keep the monitor's loop busy, as a long commit would."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(time.sleep, seconds)

    def commit(self, document: dict[str, Any]) -> None:
        """Commit from the monitor's own thread (and process)."""
        assert self._loop is not None
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def apply() -> None:
            try:
                assert self._nft is not None
                self._nft.apply(document)
                done.set_result(None)
            except BaseException as e:
                done.set_exception(e)

        self._loop.call_soon_threadsafe(apply)
        done.result(10)


class CommitClock:
    """The monotonic time at which each nftables commit in a namespace was
    announced, taken by a thread that does nothing else."""

    def __init__(self, namespace: str) -> None:
        self.generations = NftGenerations(namespace)
        self.times: queue.Queue[float] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            at = self.generations.wait(0.1)
            if at is not None:
                self.times.put(at)

    def next(self, timeout: float) -> float | None:
        try:
            return self.times.get(timeout=timeout)
        except queue.Empty:
            return None

    def drain(self) -> None:
        while not self.times.empty():
            self.times.get_nowait()

    def close(self) -> None:
        self._closed = True
        self._thread.join()
        self.generations.close()

    def __enter__(self) -> CommitClock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
