"""Reading the audit's entries back from the journal (`tailsfwctl drops`).

Entries are found by their MESSAGE_IDs (drops, summaries, losses: see
droplog.py), shown one readable line each or as one JSON object a line.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from systemd import journal

from .droplog import MESSAGE_IDS

NUMBERS = frozenset({"UID", "GID", "SPORT", "DPORT", "LEN", "ICMP_TYPE", "ICMP_CODE",
                     "SUPPRESSED", "LOST"})  # fmt: skip
UNITS = {
    "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}  # fmt: skip
RELATIVE = re.compile(r"^(?:-\s*(\d+)\s*([a-z]+)|(\d+)\s*([a-z]+)\s+ago)$")
SINCE_HELP = 'a time such as "2026-11-26 05:00", "today", "-10min" or "1 hour ago"'


class QueryError(ValueError):
    """A bad argument or an unreadable journal; the message says which."""


def parse_since(text: str, now: datetime) -> datetime:
    """--since: an absolute time (local), today/yesterday/now, or a time ago."""
    value = text.strip().lower()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    named = {"now": now, "today": midnight, "yesterday": midnight - timedelta(days=1)}
    if value in named:
        return named[value]
    if match := RELATIVE.match(value):
        amount, unit = (match[1], match[2]) if match[1] else (match[3], match[4])
        if unit in UNITS:
            return now - timedelta(seconds=int(amount) * UNITS[unit])
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError:
        raise QueryError(f"--since {text!r}: not {SINCE_HELP}") from None


@dataclass(frozen=True)
class Entry:
    """One audit entry: when, what kind (drop, summary, lost), its TAILSFW_ fields."""

    time: datetime
    kind: str
    message: str
    fields: Mapping[str, str]  # TAILSFW_ fields without the prefix

    def line(self) -> str:
        f = self.fields
        when = self.time.strftime("%Y-%m-%d %H:%M:%S")
        who = f"{f.get('USER', '?')} ({f['UID']})" if "UID" in f else f.get("USER", "")
        if self.kind == "drop":
            src, dst = f.get("SRC", "?"), f.get("DST", "?")
            if "DPORT" in f:
                src, dst = _endpoint(src, f.get("SPORT", "?")), _endpoint(dst, f["DPORT"])
            what = f.get("PROTO", "?")
            if "ICMP_TYPE" in f:
                what += f" type {f['ICMP_TYPE']} code {f.get('ICMP_CODE', '?')}"
            out = f" via {f['OUTDEV']}" if f.get("OUTDEV") else ""
            return f"{when} {who} {what} {src} -> {dst}{out}: {f.get('REASON', '')}"
        return f"{when} {self.message}"

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"time": self.time.astimezone().isoformat(), "kind": self.kind}
        for key, value in sorted(self.fields.items()):
            data[key.lower()] = int(value) if key in NUMBERS and value.isdigit() else value
        data["message"] = self.message
        return data

    def concerns(self, user: str) -> bool:
        """Entries of this user (by name or uid); overflow summaries and losses, which
        may hold this user's drops too, are kept."""
        if self.kind == "lost" or ("USER" not in self.fields and "UID" not in self.fields):
            return True
        return user in (self.fields.get("USER"), self.fields.get("UID"))


def _endpoint(address: str, port: str) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def entry(raw: Mapping[str, Any]) -> Entry:
    fields = {k[len("TAILSFW_") :]: str(v) for k, v in raw.items() if k.startswith("TAILSFW_")}
    return Entry(
        time=raw["__REALTIME_TIMESTAMP"],
        kind=fields.pop("KIND", "drop"),
        message=str(raw.get("MESSAGE", "")),
        fields=fields,
    )


class DropJournal:
    """The audit's entries in the system journal, or in a directory of journal files."""

    def __init__(self, directory: Path | None = None) -> None:
        try:
            self.reader = journal.Reader(path=str(directory)) if directory else journal.Reader()
        except OSError as e:
            where = directory or "the system journal"
            raise QueryError(f"cannot open {where}: {e.strerror or e}") from e
        for message_id in MESSAGE_IDS:
            self.reader.add_match(MESSAGE_ID=message_id)

    def since(self, when: datetime | None) -> None:
        if when is not None:
            self.reader.seek_realtime(when.timestamp())

    def entries(self) -> Iterator[Entry]:
        """The entries from the current position to the end (for now)."""
        while raw := self.reader.get_next():
            yield entry(raw)

    def follow(self) -> Iterator[Entry]:
        """The entries to the end, then each new one as it comes; never ends."""
        while True:
            yield from self.entries()
            self.reader.wait()

    def close(self) -> None:
        self.reader.close()
