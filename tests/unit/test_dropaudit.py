"""DropAudit with a fake NFLOG socket and a fake journal: what it counts, what it
writes, and that a stuck journal never stalls the loop."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import pytest

from tailsfw import dropaudit
from tailsfw.dropaudit import DropAudit
from tailsfw.droplog import DROP_MESSAGE_ID, LOSS_MESSAGE_ID, SUMMARY_MESSAGE_ID, UNLIMITED, Limits
from tailsfw.nflog import Batch, Drop, NflogSocket


class FakeSocket:
    """Readable while batches are queued; `read` hands out one batch."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._batches: deque[Batch] = deque()
        self.closed = False

    def push(self, batch: Batch) -> None:
        self._batches.append(batch)
        self._w.send(b"x")

    def fileno(self) -> int:
        return self._r.fileno()

    def read(self, received: float, limit: int = 256) -> Batch:
        self._r.recv(1)
        return self._batches.popleft()

    def close(self) -> None:
        self.closed = True
        self._r.close()
        self._w.close()


class Journal:
    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self.gate = threading.Event()
        self.gate.set()

    def send(self, **fields: Any) -> None:
        if not self.gate.wait(3):  # a stuck journald, for 3 s
            raise TimeoutError("journald does not answer")
        self.entries.append(fields)

    def of(self, message_id: str) -> list[dict[str, Any]]:
        return [e for e in self.entries if e["MESSAGE_ID"] == message_id]


def drop(uid: int | None = 1000, dst: str = "198.51.100.10", dport: int = 42) -> Drop:
    gid = None if uid is None else uid + 7  # never equal: a uid/gid swap shows
    return Drop(4, 17, "192.168.77.2", dst, 29, "Dropped outbound packet: ", 0.0,
                sport=40000, dport=dport, uid=uid, gid=gid, outdev=2)  # fmt: skip


@pytest.fixture
def fake() -> Iterator[FakeSocket]:
    sock = FakeSocket()
    yield sock
    if not sock.closed:
        sock.close()


BURST_2 = Limits(burst=2)


def make_audit(fake: FakeSocket, journal: Journal, limits: Limits = BURST_2) -> DropAudit:
    def open_socket(group: int) -> NflogSocket:
        assert group == 3
        return fake  # type: ignore[return-value]

    return DropAudit(3, send=journal.send, user_name=lambda uid: f"user{uid}",
                     interface_name=lambda index: f"if{index}", limits=limits,
                     open_socket=open_socket)  # fmt: skip


async def settle(condition: Any, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never met"
        await asyncio.sleep(0.005)


def test_counts_logs_a_burst_and_summarises_the_rest_on_stop(fake: FakeSocket) -> None:
    journal = Journal()

    async def scenario() -> None:
        audit = make_audit(fake, journal)
        task = asyncio.create_task(audit.run())
        await audit.bound.wait()
        fake.push(Batch([drop() for _ in range(5)] + [drop(uid=None)], ["bad attribute"], 1, 7))
        await settle(lambda: audit.counters().drops == 6)
        await settle(lambda: len(journal.entries) == 4)  # 2 + 1 drops, 1 loss
        counters = audit.counters()
        assert (counters.logged, counters.suppressed, counters.lost) == (3, 3, 7)
        assert (counters.overruns, counters.malformed) == (1, 1)
        assert counters.by_user == {"user1000": 5, "userNone": 1}
        # The daemon names the uids from its accounts facts, without a lookup.
        assert audit.counters({1000: "amnesia"}).by_user == {"amnesia": 5, "userNone": 1}
        assert audit.counters({}).by_user == {"1000": 5, "userNone": 1}
        assert counters.by_reason == {"Dropped outbound packet: ": 6}
        assert "bad attribute" in counters.last_error
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert fake.closed and not audit.counters().bound

    asyncio.run(scenario())
    first = journal.of(DROP_MESSAGE_ID)[0]
    assert first["TAILSFW_USER"] == "user1000" and first["TAILSFW_OUTDEV"] == "if2"
    assert (first["TAILSFW_UID"], first["TAILSFW_GID"]) == ("1000", "1007")
    assert "OUT=if2 " in first["MESSAGE"] and first["MESSAGE"].endswith(" UID=1000 GID=1007")
    assert [e["TAILSFW_LOST"] for e in journal.of(LOSS_MESSAGE_ID)] == ["7"]
    (summary,) = journal.of(SUMMARY_MESSAGE_ID)  # written on stop
    assert summary["TAILSFW_SUPPRESSED"] == "3" and summary["TAILSFW_USER"] == "user1000"


def test_a_stuck_journal_never_stalls_the_loop(fake: FakeSocket) -> None:
    journal = Journal()
    journal.gate.clear()  # journald stops answering

    async def scenario() -> None:
        audit = make_audit(fake, journal, UNLIMITED)
        task = asyncio.create_task(audit.run())
        await audit.bound.wait()
        many = dropaudit.QUEUE + 500
        started = time.monotonic()
        fake.push(Batch([drop(dport=p) for p in range(many)], []))
        await settle(lambda: audit.counters().drops == many)
        assert time.monotonic() - started < 1.0
        counters = audit.counters()
        assert counters.unwritten >= 499 and counters.logged + counters.unwritten == many
        journal.gate.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())


def test_binding_is_retried_and_the_error_kept(
    fake: FakeSocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dropaudit, "RETRY_SECONDS", 0.01)
    attempts: list[int] = []

    def open_socket(group: int) -> NflogSocket:
        attempts.append(group)
        if len(attempts) < 3:
            raise OSError(1, "NFLOG group 3 is bound by another process")
        return fake  # type: ignore[return-value]

    async def scenario() -> None:
        audit = DropAudit(3, send=Journal().send, open_socket=open_socket)
        task = asyncio.create_task(audit.run())
        await asyncio.sleep(0.005)
        assert "bound by another process" in audit.counters().last_error
        await asyncio.wait_for(audit.bound.wait(), 2)
        assert audit.counters().bound
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    assert len(attempts) == 3
