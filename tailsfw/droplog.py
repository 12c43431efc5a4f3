"""Which refused packets become journal entries, and what the entries say.

Pure: no clock, no I/O.  `Limiter` decides from the times it is given; the
`*_entry` functions turn a drop, a summary or a loss into journal fields.

The rule: per (user, destination, reason), the first `burst` drops of a
window are logged one by one; the rest are counted, and when the window
ends one summary entry says how many ("N more like this suppressed in S s",
the count in TAILSFW_SUPPRESSED).  All keys together log at most `total`
entries a window, and at most `keys` keys are remembered at once: drops
beyond either go to one overflow bucket, which is counted and summarised
the same way.  So the journal gets a bounded number of entries whatever
the traffic, memory stays bounded, and every drop is either an entry or
part of a summary's count.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .nflog import Drop

# Fixed, so entries can be found by `journalctl MESSAGE_ID=...` (generated once).
DROP_MESSAGE_ID = "c63dd72e5ac74463bc2680ea520cfa2f"
SUMMARY_MESSAGE_ID = "d7fbec5c815d43399f6d271d61affd29"
LOSS_MESSAGE_ID = "09c32c28c1ab46f28a5bb5b565b9e632"
MESSAGE_IDS = (DROP_MESSAGE_ID, SUMMARY_MESSAGE_ID, LOSS_MESSAGE_ID)
PRIORITY = "5"  # notice
IDENTIFIER = "tailsfwd"

K = TypeVar("K", bound=Hashable)
Fields = dict[str, str]
DropKey = tuple[int | None, str, str]  # uid, destination, prefix


@dataclass(frozen=True)
class Limits:
    burst: int = 5  # entries per key and window
    window: float = 10.0  # seconds
    total: int = 100  # entries per window, all keys together
    keys: int = 256  # keys remembered at once


DEFAULT_LIMITS = Limits()
UNLIMITED = Limits(burst=2**62, total=2**62, keys=2**16)


@dataclass(slots=True)
class _Window:
    start: float
    logged: int = 0
    suppressed: int = 0
    last: float = 0.0


@dataclass(frozen=True)
class Summary(Generic[K]):
    """`suppressed` drops of `key` (None: the overflow bucket) between start and end."""

    key: K | None
    suppressed: int
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


class Limiter(Generic[K]):
    """The rate limit, decided from the times passed in (monotonic seconds)."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        # Insertion order is start order: the oldest window is always first.
        self._windows: OrderedDict[K, _Window] = OrderedDict()
        self._overflow: _Window | None = None
        self._closed: list[Summary[K]] = []
        self._total_start = float("-inf")
        self._total_logged = 0

    def __len__(self) -> int:
        return len(self._windows)

    def offer(self, key: K, now: float, count: int = 1) -> bool:
        """`count` drops of `key` at `now`: True to log them as one entry, False if
        they were counted for a summary instead."""
        limits = self.limits
        if now - self._total_start >= limits.window:
            self._total_start, self._total_logged = now, 0
        window = self._windows.get(key)
        if window is not None and now - window.start >= limits.window:
            del self._windows[key]
            self._close(key, window)
            window = None
        if window is None:
            if self._total_logged >= limits.total or len(self._windows) >= limits.keys:
                self._overflow = self._overflow or _Window(now)
                self._suppress(self._overflow, now, count)
                return False
            window = self._windows[key] = _Window(now)
        if window.logged < limits.burst and self._total_logged < limits.total:
            window.logged += 1
            self._total_logged += 1
            return True
        self._suppress(window, now, count)
        return False

    @staticmethod
    def _suppress(window: _Window, now: float, count: int) -> None:
        window.suppressed += count
        window.last = now

    def _close(self, key: K | None, window: _Window) -> None:
        if window.suppressed:
            self._closed.append(Summary(key, window.suppressed, window.start, window.last))

    def due(self, now: float) -> list[Summary[K]]:
        """The summaries of the windows that have ended by `now`."""
        while self._windows:
            key, window = next(iter(self._windows.items()))
            if now - window.start < self.limits.window:
                break
            del self._windows[key]
            self._close(key, window)
        if self._overflow is not None and now - self._overflow.start >= self.limits.window:
            self._close(None, self._overflow)
            self._overflow = None
        done, self._closed = self._closed, []
        return done

    def flush(self) -> list[Summary[K]]:
        """Every summary still open, ended now (on stop: no count is left unsaid)."""
        for key, window in self._windows.items():
            self._close(key, window)
        self._windows.clear()
        if self._overflow is not None:
            self._close(None, self._overflow)
            self._overflow = None
        done, self._closed = self._closed, []
        return done

    def next_due(self) -> float | None:
        """When `due` next has something to say (None: nothing open)."""
        times = [w.start + self.limits.window for w in (self._first(), self._overflow) if w]
        if self._closed:
            times.append(float("-inf"))
        return min(times, default=None)

    def _first(self) -> _Window | None:
        return next(iter(self._windows.values()), None)


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


def summary_entry(summary: Summary[DropKey], user_name: Callable[[int | None], str]) -> Fields:
    n, seconds = summary.suppressed, f"{summary.seconds:.1f}"
    if summary.key is None:
        message = (
            f"{n} more refused packets suppressed in {seconds} s"
            " (too many users, destinations or entries to log one by one)"
        )
        fields = _common(SUMMARY_MESSAGE_ID, "summary", message)
        fields["TAILSFW_REASON"] = "overflow"
    else:
        uid, dst, prefix = summary.key
        user = user_name(uid)
        message = f"{n} more like this suppressed in {seconds} s: {user} to {dst}, {reason(prefix)}"
        fields = _common(SUMMARY_MESSAGE_ID, "summary", message)
        fields |= {"TAILSFW_REASON": reason(prefix), "TAILSFW_DST": dst, "TAILSFW_USER": user}
        if uid is not None:
            fields["TAILSFW_UID"] = str(uid)
    fields |= {"TAILSFW_SUPPRESSED": str(n), "TAILSFW_SECONDS": seconds}
    return fields


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


@dataclass
class DropCounters:
    """What the audit has seen since it started; goes into the status."""

    drops: int = 0  # refused packets decoded
    logged: int = 0  # ... written one by one
    suppressed: int = 0  # ... counted in summaries instead
    summaries: int = 0
    lost: int = 0  # refused packets the kernel could not hand over (queue full)
    overruns: int = 0  # times the kernel's queue overflowed (ENOBUFS)
    malformed: int = 0  # messages skipped as malformed
    unwritten: int = 0  # entries dropped because the journal writer was behind
    by_user: dict[str, int] = field(default_factory=dict)
    by_reason: dict[str, int] = field(default_factory=dict)
    bound: bool = False  # the NFLOG group is being read
    last_error: str = ""
