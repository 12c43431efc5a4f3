"""Which refused packets become journal entries, and what the entries say.

Pure: no clock, no I/O.  `Limiter` decides from the times it is given; the
`*_entry` functions turn a drop, a summary or a loss into journal fields.

The rule is fair across users: each user (uid) gets a window of its own,
from its first drop.  Within it, per (destination, reason) the first `burst`
drops are logged one by one, and the user logs at most `share` entries in
all; the rest are counted, and when the user's window ends one summary per
destination says how many ("N more like this suppressed in S s", the count
in TAILSFW_SUPPRESSED) and one more summary counts the user's drops beyond
its share.  So a user who floods many destinations spends only its own
share: it never hides another user's drops.  At most `users` windows are
open at once; drops of more users go to one overflow bucket, counted and
summarised the same way.  So the journal gets a bounded number of entries
whatever the traffic (at most users x share drop entries a window), memory
stays bounded (a destination is remembered only once it logged), and every
drop is either an entry or part of a summary's count.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:  # tailsfwctl's status reads the counters without the decoder
    from .nflog import Drop

# Fixed, so entries can be found by `journalctl MESSAGE_ID=...` (generated once).
DROP_MESSAGE_ID = "c63dd72e5ac74463bc2680ea520cfa2f"
SUMMARY_MESSAGE_ID = "d7fbec5c815d43399f6d271d61affd29"
LOSS_MESSAGE_ID = "09c32c28c1ab46f28a5bb5b565b9e632"
MESSAGE_IDS = (DROP_MESSAGE_ID, SUMMARY_MESSAGE_ID, LOSS_MESSAGE_ID)
PRIORITY = "5"  # notice
IDENTIFIER = "tailsfwd"

U = TypeVar("U", bound=Hashable)
K = TypeVar("K", bound=Hashable)
Fields = dict[str, str]
DropUser = int | None  # uid; None: a packet without a socket
DropKey = tuple[str, str]  # destination, prefix

# What a summary counts: drops like one key, a user's drops beyond its share,
# or the drops of users beyond the limit.
KEY, USER, OVERFLOW = "key", "user", "overflow"


@dataclass(frozen=True)
class Limits:
    burst: int = 5  # entries per user and key (destination, reason), and window
    window: float = 10.0  # seconds
    share: int = 20  # entries per user and window, all its keys together
    users: int = 16  # users with a window open at once

    @property
    def total(self) -> int:
        """Drop entries per window at most, all users together."""
        return self.users * self.share


DEFAULT_LIMITS = Limits()
UNLIMITED = Limits(burst=2**62, share=2**62, users=2**16)


@dataclass(slots=True)
class _Count:
    logged: int = 0
    suppressed: int = 0
    last: float = 0.0

    def suppress(self, count: int, now: float) -> None:
        self.suppressed += count
        self.last = now


@dataclass(slots=True)
class _Window(Generic[K]):
    """One user's window: its keys (only those that logged) and its overflow."""

    start: float
    logged: int = 0
    keys: dict[K, _Count] = field(default_factory=dict)
    beyond: _Count = field(default_factory=_Count)


@dataclass(frozen=True)
class Summary(Generic[U, K]):
    """`suppressed` drops between start and end: of `user` like `key` (scope KEY), of
    `user` beyond its share (USER), or of users beyond the limit (OVERFLOW)."""

    scope: str
    user: U | None
    key: K | None
    suppressed: int
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


DropSummary = Summary[DropUser, DropKey]


class Limiter(Generic[U, K]):
    """The rate limit, decided from the times passed in (monotonic seconds)."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        # Insertion order is start order: the oldest window is always first.
        self._users: OrderedDict[U, _Window[K]] = OrderedDict()
        self._overflow: tuple[float, _Count] | None = None
        self._closed: list[Summary[U, K]] = []

    def __len__(self) -> int:
        """Keys remembered (at most users x share)."""
        return sum(len(w.keys) for w in self._users.values())

    def offer(self, user: U, key: K, now: float, count: int = 1) -> bool:
        """`count` drops of `user` like `key` at `now`: True to log them as one entry,
        False if they were counted for a summary instead."""
        limits = self.limits
        self._close_ended(now)
        window = self._users.get(user)
        if window is None:
            if len(self._users) >= limits.users:
                if self._overflow is None:
                    self._overflow = (now, _Count())
                self._overflow[1].suppress(count, now)
                return False
            window = self._users[user] = _Window(now)
        counted = window.keys.get(key)
        if counted is None:
            if window.logged >= limits.share:
                window.beyond.suppress(count, now)
                return False
            counted = window.keys[key] = _Count()
        if counted.logged < limits.burst and window.logged < limits.share:
            counted.logged += 1
            window.logged += 1
            return True
        counted.suppress(count, now)
        return False

    def _close_ended(self, now: float) -> None:
        while self._users:
            user, window = next(iter(self._users.items()))
            if now - window.start < self.limits.window:
                break
            del self._users[user]
            self._close(user, window)
        if self._overflow is not None and now - self._overflow[0] >= self.limits.window:
            self._close_overflow()

    def _close(self, user: U, window: _Window[K]) -> None:
        for key, counted in window.keys.items():
            if counted.suppressed:
                self._closed.append(
                    Summary(KEY, user, key, counted.suppressed, window.start, counted.last)
                )
        if window.beyond.suppressed:
            beyond = window.beyond
            self._closed.append(Summary(USER, user, None, beyond.suppressed, window.start,
                                        beyond.last))  # fmt: skip

    def _close_overflow(self) -> None:
        assert self._overflow is not None
        start, counted = self._overflow
        self._closed.append(Summary(OVERFLOW, None, None, counted.suppressed, start, counted.last))
        self._overflow = None

    def due(self, now: float) -> list[Summary[U, K]]:
        """The summaries of the windows that have ended by `now`."""
        self._close_ended(now)
        done, self._closed = self._closed, []
        return done

    def flush(self) -> list[Summary[U, K]]:
        """Every summary still open, ended now (on stop: no count is left unsaid)."""
        for user, window in self._users.items():
            self._close(user, window)
        self._users.clear()
        if self._overflow is not None:
            self._close_overflow()
        done, self._closed = self._closed, []
        return done

    def next_due(self) -> float | None:
        """When `due` next has something to say (None: nothing open)."""
        if self._closed:
            return float("-inf")
        oldest = next(iter(self._users.values()), None)
        starts = [oldest.start] if oldest else []
        if self._overflow is not None:
            starts.append(self._overflow[0])
        return min(starts) + self.limits.window if starts else None


@dataclass
class Budget:
    """A bounded share of a core for reading: once `share` of a `period` is spent,
    reading pauses until the time spent is back within `share` of the time passed."""

    share: float = 0.5
    period: float = 0.1
    _start: float = field(default=float("-inf"), repr=False)
    _spent: float = field(default=0.0, repr=False)

    def spend(self, cpu: float, now: float) -> float | None:
        """Record `cpu` seconds spent by `now`; when to read again, or None for at once."""
        if now - self._start >= self.period:
            self._start, self._spent = now - cpu, 0.0
        self._spent += cpu
        if self._spent < self.share * self.period:
            return None
        return self._start + self._spent / self.share


def reason(prefix: str) -> str:
    """The log prefix as a reason: "Dropped outbound packet: " -> "Dropped outbound packet"."""
    return prefix.strip().rstrip(":").strip() or "refused"


def drop_message(drop: Drop, indev: str, outdev: str) -> str:
    """The kernel LOG target's line, as Tails' own tests search it."""
    parts = [
        f"{drop.prefix}IN={indev} OUT={outdev}",
        f"SRC={drop.src} DST={drop.dst} LEN={drop.length} PROTO={drop.protocol_name}",
    ]
    if drop.sport is not None:
        parts.append(f"SPT={drop.sport} DPT={drop.dport}")
    if drop.icmp_type is not None:
        parts.append(f"TYPE={drop.icmp_type} CODE={drop.icmp_code}")
    if drop.uid is not None:
        parts.append(f"UID={drop.uid} GID={drop.gid}")
    return " ".join(parts)


def drop_entry(drop: Drop, user: str, indev: str, outdev: str) -> Fields:
    fields = _common(DROP_MESSAGE_ID, "drop", drop_message(drop, indev, outdev))
    fields |= {
        "TAILSFW_REASON": reason(drop.prefix),
        "TAILSFW_FAMILY": f"ipv{drop.family}",
        "TAILSFW_SRC": drop.src,
        "TAILSFW_DST": drop.dst,
        "TAILSFW_PROTO": drop.protocol_name,
        "TAILSFW_LEN": str(drop.length),
        "TAILSFW_OUTDEV": outdev,
        "TAILSFW_USER": user,
    }
    optional = {
        "TAILSFW_SPORT": drop.sport,
        "TAILSFW_DPORT": drop.dport,
        "TAILSFW_ICMP_TYPE": drop.icmp_type,
        "TAILSFW_ICMP_CODE": drop.icmp_code,
        "TAILSFW_UID": drop.uid,
        "TAILSFW_GID": drop.gid,
    }
    fields |= {k: str(v) for k, v in optional.items() if v is not None}
    return fields


def summary_entry(summary: DropSummary, user_name: Callable[[int | None], str]) -> Fields:
    n, seconds = summary.suppressed, f"{summary.seconds:.1f}"
    fields: Fields = {"TAILSFW_REASON": "overflow"}
    if summary.scope == OVERFLOW:
        message = f"{n} more refused packets suppressed in {seconds} s (too many users at once"
    else:
        user = user_name(summary.user)
        fields["TAILSFW_USER"] = user
        if summary.user is not None:
            fields["TAILSFW_UID"] = str(summary.user)
        if summary.key is None:  # USER: beyond its share
            message = (
                f"{n} more refused packets of {user} suppressed in {seconds} s"
                " (too many destinations or reasons"
            )
        else:
            dst, prefix = summary.key
            message = f"{n} more like this suppressed in {seconds} s: {user} to {dst}, "
            fields |= {"TAILSFW_REASON": reason(prefix), "TAILSFW_DST": dst}
    message += reason(summary.key[1]) if summary.key else " to log one by one)"
    fields |= {"TAILSFW_SUPPRESSED": str(n), "TAILSFW_SECONDS": seconds}
    return _common(SUMMARY_MESSAGE_ID, "summary", message) | fields


def loss_entry(lost: int, seconds: float | None = None) -> Fields:
    """`lost` drops not decoded: at once, or (`seconds`) summed over a window."""
    more = "" if seconds is None else f" more in {seconds:.1f} s"
    message = (
        f"{lost}{more} refused packets were not decoded: the kernel's NFLOG queue was full"
        " (they were refused all the same, and counted by the ruleset)"
    )
    fields = _common(LOSS_MESSAGE_ID, "lost", message)
    fields["TAILSFW_LOST"] = str(lost)
    return fields


def _common(message_id: str, kind: str, message: str) -> Fields:
    return {
        "MESSAGE": message,
        "MESSAGE_ID": message_id,
        "PRIORITY": PRIORITY,
        "SYSLOG_IDENTIFIER": IDENTIFIER,
        "TAILSFW_KIND": kind,
    }
