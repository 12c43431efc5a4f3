"""nftables' own change notifications, as a source: who touched our tables.

The kernel tells every member of the netlink group NFNLGRP_NFTABLES about
each object a committed transaction added or deleted, and ends the
transaction with NFT_MSG_NEWGEN, which names the committing task (its id
and name).  A transaction that touched a `tailsfw` table and was not
committed by this process becomes one `RulesetTouched` event.

Pure part: `decode` (bytes -> `Change` / `Generation` / `Unreadable`) and
`Transactions` (notices -> events, with a readable summary).  Thin part:
`NftMonitor`, the socket.  When notices are lost (ENOBUFS, an unreadable
message, a socket that had to be reopened) the event has pid 0: the kernel
must then be compared with what should be in force.

Decoded by hand, not by pyroute2's nftables socket: only the header and a
few top-level attributes are needed, and decoding every rule's expressions
(as pyroute2 does) costs far more per message, on every one of our own
commits too (bench/tamper.py measures both).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import secrets
import socket
import struct
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from . import nlsock
from .events import RulesetTouched
from .nlsock import ATTR, NLA_TYPE_MASK, NLMSG_OVERRUN

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
# Room for a few full replacements of a large ruleset while the loop is busy.
RCVBUF = 8 * 1024 * 1024
RECV_SIZE = 1 << 17

NFNL_SUBSYS_NFTABLES = 10
NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (big endian)

# NFT_MSG_* -> (op, kind); the name attribute of each kind (table: 1).
MESSAGES = {
    0: ("add", "table"), 2: ("delete", "table"),
    3: ("add", "chain"), 5: ("delete", "chain"),
    6: ("add", "rule"), 8: ("delete", "rule"),
    9: ("add", "set"), 11: ("delete", "set"),
    12: ("add", "element"), 14: ("delete", "element"),
    18: ("add", "object"), 20: ("delete", "object"),
    22: ("add", "flowtable"), 24: ("delete", "flowtable"),
    # NFT_MSG_DESTROY* (Linux 6.3): delete, if it exists.
    26: ("delete", "table"), 27: ("delete", "chain"), 28: ("delete", "rule"),
    29: ("delete", "set"), 30: ("delete", "element"), 31: ("delete", "object"),
    32: ("delete", "flowtable"),
}  # fmt: skip
NFT_MSG_NEWGEN = 15
NAME_ATTR = {"chain": 3, "rule": 2, "set": 2, "element": 2, "object": 2, "flowtable": 2}
NFTA_TABLE_FLAGS = 2
NFT_TABLE_F_DORMANT = 1
NFTA_RULE_HANDLE = 3
NFTA_CHAIN_POLICY = 5
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_SET_ELEM_FLAGS = 3
NFT_SET_ELEM_INTERVAL_END = 1
NFTA_GEN_PROC_PID = 2
NFTA_GEN_PROC_NAME = 3
FAMILIES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}
# The families a table named like ours can be hooked in where it matters.
WATCHED_FAMILIES = frozenset({1, 2, 10})
POLICIES = {0: "drop", 1: "accept"}
MAX_PARTS = 8  # a summary names this many changes, then counts the rest
MAX_RETRY_DELAY = 5.0  # s, between attempts to open the socket


@dataclass(frozen=True)
class Change:
    """One object added or deleted by a transaction."""

    op: str  # "add" | "delete"
    kind: str  # "table" | "chain" | "rule" | "set" | "element" | "object" | "flowtable"
    family: int
    table: str
    name: str = ""  # the chain of a chain or rule; the set of a set or its elements
    handle: int = 0  # rules
    count: int = 1  # elements (the end markers of intervals are not counted)
    detail: str = ""  # a base chain's "policy accept", a table's "dormant"


@dataclass(frozen=True)
class Generation:
    """The end of a committed transaction, and the task that committed it."""

    pid: int
    process: str


@dataclass(frozen=True)
class Unreadable:
    """A notification that could not be decoded: what it said is unknown."""

    reason: str


Notice = Change | Generation | Unreadable
# Not malformed: the kernel says it dropped notices.
OVERRUN = Unreadable("the kernel reported an overrun")


def _attributes(data: bytes, offset: int, end: int) -> dict[int, bytes]:
    """Netlink attributes between offset and end (the first of each type)."""
    found: dict[int, bytes] = {}
    while offset + 4 <= end:
        length, kind = ATTR.unpack_from(data, offset)
        if length < 4 or offset + length > end:
            raise nlsock.Malformed(f"attribute of length {length} at byte {offset}")
        found.setdefault(kind & NLA_TYPE_MASK, data[offset + 4 : offset + length])
        offset += (length + 3) & ~3
    return found


def _all_attributes(data: bytes) -> list[tuple[int, bytes]]:
    """Every attribute of a nested list, in order (repeated types kept)."""
    found: list[tuple[int, bytes]] = []
    offset = 0
    while offset + 4 <= len(data):
        length, kind = ATTR.unpack_from(data, offset)
        if length < 4 or offset + length > len(data):
            raise nlsock.Malformed(f"nested attribute of length {length}")
        found.append((kind & NLA_TYPE_MASK, data[offset + 4 : offset + length]))
        offset += (length + 3) & ~3
    return found


def _string(value: bytes | None) -> str:
    if value is None:
        return ""
    return value.split(b"\0", 1)[0].decode("utf-8", "replace")


def _be(value: bytes | None, size: int) -> int:
    if value is None or len(value) < size:
        return 0
    return int.from_bytes(value[:size], "big")


def _element_count(elements: bytes | None) -> int:
    count = 0
    for _, element in _all_attributes(elements or b""):
        flags = _attributes(element, 0, len(element)).get(NFTA_SET_ELEM_FLAGS)
        count += not _be(flags, 4) & NFT_SET_ELEM_INTERVAL_END
    return count


def _notice(kind: int, data: bytes, offset: int, end: int) -> Notice | None:
    msg = kind & 0xFF
    if msg != NFT_MSG_NEWGEN and msg not in MESSAGES:
        return None  # NFT_MSG_TRACE and the like: no change
    if end - offset < NFGENMSG.size:
        raise nlsock.Malformed("message shorter than its nfgenmsg header")
    family = data[offset]
    attrs = _attributes(data, offset + NFGENMSG.size, end)
    if msg == NFT_MSG_NEWGEN:
        pid = _be(attrs.get(NFTA_GEN_PROC_PID), 4)
        return Generation(pid, _string(attrs.get(NFTA_GEN_PROC_NAME)))
    op, what = MESSAGES[msg]
    table = _string(attrs.get(1))
    if what == "table":
        # A dormant table's base chains see no packet: the filter is off.
        dormant = _be(attrs.get(NFTA_TABLE_FLAGS), 4) & NFT_TABLE_F_DORMANT
        return Change(op, what, family, table, detail="dormant" if dormant else "")
    name = _string(attrs.get(NAME_ATTR[what]))
    if what == "rule":
        return Change(op, what, family, table, name, handle=_be(attrs.get(NFTA_RULE_HANDLE), 8))
    if what == "chain" and NFTA_CHAIN_POLICY in attrs:
        code = _be(attrs[NFTA_CHAIN_POLICY], 4)
        policy = POLICIES.get(code, str(code))
        return Change(op, what, family, table, name, detail=f"policy {policy}")
    if what == "element":
        count = _element_count(attrs.get(NFTA_SET_ELEM_LIST_ELEMENTS))
        return Change(op, what, family, table, name, count=count)
    return Change(op, what, family, table, name)


def decode(data: bytes) -> list[Notice]:
    """The notices in one datagram from the NFNLGRP_NFTABLES group.

    Never raises: a message that cannot be read becomes `Unreadable`, and
    nothing after it in the datagram is trusted (see nlsock).
    """
    notices: list[Notice] = []
    frames, malformed = nlsock.split(data)
    for kind, _, _, body, end in frames:
        if kind == NLMSG_OVERRUN:
            notices.append(OVERRUN)
        elif kind >> 8 == NFNL_SUBSYS_NFTABLES:
            try:
                notice = _notice(kind, data, body, end)
            except nlsock.Malformed as e:
                notices.append(Unreadable(f"message type {kind:#x}: {e}"))
                return notices
            if notice is not None:
                notices.append(notice)
    if malformed:
        notices.append(Unreadable(malformed))
    return notices


@dataclass
class Transactions:
    """Turns notices into events: one per foreign transaction touching `table`.

    It also counts the rules of each chain whose creation it saw, so that
    deleting every rule of a chain reads as "flushed chain".
    """

    table: str
    is_own: Callable[[int], bool]
    pending: list[Change] = field(default_factory=list)
    rules: dict[tuple[int, str], int] = field(default_factory=dict)
    probe: str = ""  # the table our probe transaction makes and deletes (`NftMonitor`)
    probed: set[int] = field(default_factory=set)  # the ids our probes' commits carried
    probing: bool = False

    def feed(self, notice: Notice) -> RulesetTouched | None:
        if isinstance(notice, Unreadable):
            self.reset()
            return RulesetTouched(0, "", f"unreadable change notification ({notice.reason})")
        if isinstance(notice, Change):
            if notice.table == self.table and notice.family in WATCHED_FAMILIES:
                self.pending.append(notice)
            self.probing |= bool(self.probe) and notice.table == self.probe
            return None
        if self.probing:
            self.probed.add(notice.pid)
            self.probing = False
        changes, self.pending = self.pending, []
        event = None
        if changes and not (self.is_own(notice.pid) or notice.pid in self.probed):
            event = RulesetTouched(notice.pid, notice.process, summarize(changes, self.rules))
        self._count(changes)
        return event

    def reset(self) -> None:
        """Notices were lost: what is pending and every count is unknown."""
        self.pending.clear()
        self.rules.clear()
        self.probing = False

    def _count(self, changes: Iterable[Change]) -> None:
        for c in changes:
            key = (c.family, c.name)
            if c.kind == "table" and c.op == "delete":
                self.rules = {k: n for k, n in self.rules.items() if k[0] != c.family}
            elif c.kind == "chain" and c.op == "add":
                self.rules.setdefault(key, 0)
            elif c.kind == "chain":
                self.rules.pop(key, None)
            elif c.kind == "rule" and key in self.rules:
                self.rules[key] += 1 if c.op == "add" else -1


def _plural(count: int, noun: str) -> str:
    return f"{noun}" if count == 1 else f"{count} {noun}s"


def summarize(changes: list[Change], rules: dict[tuple[int, str], int] | None = None) -> str:
    """A short readable account of what a transaction did to our tables.

    `rules` is the count of rules per (family, chain) before it, where known.
    """
    rules = rules or {}
    parts: list[str] = []
    for family in sorted({c.family for c in changes}):
        mine = [c for c in changes if c.family == family]
        where = f"{FAMILIES.get(family, str(family))} {mine[0].table}"
        tables = {c.op for c in mine if c.kind == "table"}
        if "delete" in tables:
            # Its contents went with it; what was added after it is the new table.
            parts.append(f"{'replaced' if 'add' in tables else 'deleted'} table {where}")
            continue
        if "add" in tables:
            detail = next((f" ({c.detail})" for c in mine if c.kind == "table" and c.detail), "")
            parts.append(f"added table {where}{detail}")
        parts += _objects(mine, where, family, rules)
    if len(parts) > MAX_PARTS:
        parts = [*parts[:MAX_PARTS], f"and {len(parts) - MAX_PARTS} more changes"]
    return "; ".join(parts) or "changed nothing visible"


def _objects(
    changes: list[Change], where: str, family: int, rules: dict[tuple[int, str], int]
) -> list[str]:
    parts: list[str] = []
    for c in changes:
        if c.kind == "chain":
            verb = "deleted" if c.op == "delete" else (
                "changed" if (family, c.name) in rules else "added")  # fmt: skip
            detail = f" ({c.detail})" if c.detail else ""
            parts.append(f"{verb} chain {where} {c.name}{detail}")
        elif c.kind in ("set", "object", "flowtable") and not c.name.startswith("__"):
            # Sets named "__..." are the anonymous sets of rules.
            parts.append(f"{'added' if c.op == 'add' else 'deleted'} {c.kind} {where} {c.name}")
    for chain in dict.fromkeys(c.name for c in changes if c.kind == "rule"):
        parts += _rules([c for c in changes if c.kind == "rule" and c.name == chain],
                        f"{where} {chain}", rules.get((family, chain)))  # fmt: skip
    elements: Counter[tuple[str, str]] = Counter()
    for c in changes:
        if c.kind == "element" and not c.name.startswith("__"):
            elements[(c.op, c.name)] += c.count
    for (op, name), count in elements.items():
        if op == "add":
            parts.append(f"added {_plural(count, 'element')} to set {where} {name}")
        else:
            parts.append(f"deleted {_plural(count, 'element')} from set {where} {name}")
    return parts


def _rules(changes: list[Change], chain: str, before: int | None) -> list[str]:
    added = {c.handle for c in changes if c.op == "add"}
    deleted = {c.handle for c in changes if c.op == "delete"}
    replaced = len(added & deleted)
    added_only, deleted_only = len(added - deleted), len(deleted - added)
    parts = []
    if replaced:
        parts.append(f"replaced {_plural(replaced, 'rule')} in {chain}")
    if deleted_only and deleted_only == before and not replaced:
        parts.append(f"flushed chain {chain} ({deleted_only} rule{'s' * (deleted_only > 1)})")
    elif deleted_only:
        parts.append(f"deleted {_plural(deleted_only, 'rule')} from {chain}")
    if added_only:
        parts.append(f"added {_plural(added_only, 'rule')} to {chain}")
    return parts


def own_task(own_pid: int) -> Callable[[int], bool]:
    """Whether a committing task id is `own_pid` or one of its threads.

    The kernel names the committing thread: a commit made from a worker
    thread carries that thread's id, not the process id.
    """
    tasks = Path(f"/proc/{own_pid}/task")
    return lambda pid: pid == own_pid or (pid > 0 and (tasks / str(pid)).exists())


class NftMonitor:
    """Foreign changes to our tables, from nftables' notifications.

    `events()` first yields a pid-0 event ("monitor started"): changes made
    before the subscription are not seen, so the kernel must be checked
    once.  It yields pid-0 events again whenever notices were lost.

    Our own commits are told by the task id they carry.  In a container the
    kernel gives the id outside it, which this process cannot know; so, once
    subscribed, `probe(name)` commits from the loop's thread (where the
    ruleset's commits are made) a transaction that makes and deletes a table
    of a random name, and the id at its end is ours too.  Without it, each
    of our commits there read as another's, and put back, is a commit again:
    a hundred restores a second (seen in the nspawn boot test).
    """

    name = "nftmonitor"

    def __init__(
        self,
        table: str = "tailsfw",
        own_pid: int | None = None,
        rcvbuf: int = RCVBUF,
        retry_delay: float = 0.05,
        probe: Callable[[str], None] | None = None,
    ) -> None:
        self.table = table
        self.probe = probe
        self.own_pid = os.getpid() if own_pid is None else own_pid
        self.rcvbuf = rcvbuf
        self.retry_delay = retry_delay
        self.touched = 0  # foreign transactions seen
        self.lost = 0  # times notices were lost
        self.last_error = ""
        self.malformed = nlsock.Malformations(self.name)

    async def events(self) -> AsyncIterator[RulesetTouched]:
        transactions = Transactions(self.table, own_task(self.own_pid))
        why = "monitor started"
        delay = self.retry_delay
        while True:
            try:
                sock = open_socket(self.rcvbuf)
            except OSError as e:
                self._failed(f"cannot follow nftables' notifications: {e}")
                await asyncio.sleep(delay)
                delay = min(2 * delay, MAX_RETRY_DELAY)  # do not flood the log
                continue
            delay = self.retry_delay
            try:
                self._probe(transactions)
                yield RulesetTouched(0, "", why)
                async for event in self._follow(sock, transactions):
                    yield event
            except Exception as e:  # the socket's errors, or a bug: never the daemon's end
                self.lost += 1
                self._failed(f"notification socket: {e!r}")
                why = "notifications lost (socket reopened)"
                await asyncio.sleep(self.retry_delay)
            finally:
                sock.close()
            transactions.reset()

    def _probe(self, transactions: Transactions) -> None:
        if self.probe is None:
            return
        transactions.probe = f"{self.table}-probe-{secrets.token_hex(4)}"
        try:
            self.probe(transactions.probe)
        except Exception as e:  # never the monitor's end: our own pid still tells ours
            log.warning("nftmonitor: probe commit failed (%s); own commits known by pid only", e)

    def _failed(self, error: str) -> None:
        if error != self.last_error:
            log.error("nftmonitor: %s; retrying", error)
        self.last_error = error

    async def _follow(
        self, sock: socket.socket, transactions: Transactions
    ) -> AsyncIterator[RulesetTouched]:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await loop.sock_recv(sock, RECV_SIZE)
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                # The socket stays usable; what overflowed is gone.
                self.lost += 1
                transactions.reset()
                log.warning("nftmonitor: notifications lost (ENOBUFS): checking the kernel")
                yield RulesetTouched(0, "", "notifications lost")
                continue
            if not data:
                raise ConnectionResetError(errno.ECONNRESET, "netlink socket closed")
            for notice in decode(data):
                if isinstance(notice, Unreadable) and notice != OVERRUN:
                    self.malformed.note(notice.reason)
                event = transactions.feed(notice)
                if event is not None:
                    self.touched += event.pid != 0
                    self.lost += event.pid == 0
                    yield event


def open_socket(rcvbuf: int = RCVBUF) -> socket.socket:
    """A non-blocking socket subscribed to nftables' notifications."""
    return nlsock.open_socket(NETLINK_NETFILTER, rcvbuf, memberships=(NFNLGRP_NFTABLES,))
