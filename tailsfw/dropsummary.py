"""`tailsfwctl drops --summary`: tailsfwd's own counters beside the journal's entries.

Pure: from the entries read and the daemon's properties (observe.py).
Journald's space is shared, so a user who writes large entries can push
tailsfwd's out; the daemon's counters (by user and by reason, since it
started) cannot be pushed out.  Shown side by side, and with a warning when
the journal's oldest entry is newer than the daemon's start, a person sees
that drops happened even when their entries are gone.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from .droplog import reason
from .dropquery import USAGE, Entry, QueryError, failed, opened, shown

BEYOND = "(users beyond the limit)"  # overflow summaries name no user
SLACK = timedelta(seconds=1)  # the journal's first entry may follow the start a little


@dataclass
class Tally:
    """The refused packets the journal's entries account for."""

    by_user: dict[str, int] = field(default_factory=dict)
    by_reason: dict[str, int] = field(default_factory=dict)
    drops: int = 0  # drop entries
    summaries: int = 0
    lost: int = 0  # refused packets not decoded, from loss records

    def add(self, entry: Entry) -> None:
        f = entry.fields
        if entry.kind == "lost":
            self.lost += f["LOST"]
            return
        count = 1 if entry.kind == "drop" else f["SUPPRESSED"]
        self.drops += entry.kind == "drop"
        self.summaries += entry.kind == "summary"
        user = shown(f["USER"]) if "USER" in f else BEYOND
        self.by_user[user] = self.by_user.get(user, 0) + count
        self.by_reason[shown(f["REASON"])] = self.by_reason.get(shown(f["REASON"]), 0) + count


def tally(entries: Iterable[Entry]) -> Tally:
    counted = Tally()
    for e in entries:
        counted.add(e)
    return counted


@dataclass(frozen=True)
class Counted:
    """The daemon's side: its counters and since when it has counted."""

    source: str  # "D-Bus", a status file, or why there is no daemon
    running_since: datetime | None
    by_user: dict[str, int]
    by_reason: dict[str, int]


def counted(properties: Mapping[str, Any] | None, source: str) -> Counted | None:
    if properties is None:
        return None
    usec = int(properties["RunningSince"])
    since = datetime.fromtimestamp(usec / 1e6) if usec > 0 else None
    by_reason: dict[str, int] = {}
    for prefix, n in properties["DropsByReason"].items():
        by_reason[reason(prefix)] = by_reason.get(reason(prefix), 0) + int(n)
    by_user = {shown(str(user)): int(n) for user, n in properties["DropsByUser"].items()}
    return Counted(source, since, by_user, by_reason)


def reaches_back(daemon: Counted | None, oldest: datetime | None) -> bool | None:
    """Does the journal still hold entries from the daemon's start? (None: cannot tell)"""
    if daemon is None or daemon.running_since is None:
        return None
    # By timestamp: the journal's times are aware, a --since time local and naive.
    return oldest is not None and oldest.timestamp() <= (daemon.running_since + SLACK).timestamp()


def _when(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S") if t else "unknown"


def render(
    daemon: Counted | None, why: str, journal: Tally, since: datetime | None,
    oldest: datetime | None, notes: list[str],
) -> str:  # fmt: skip
    rows: list[tuple[str, str, str]] = [("user", "tailsfwd", "journal")]
    for part in ("by_user", "by_reason"):
        theirs: dict[str, int] = getattr(daemon, part) if daemon else {}
        ours: dict[str, int] = getattr(journal, part)
        if part == "by_reason":
            rows.append(("reason", "", ""))
        for name in sorted(theirs.keys() | ours.keys()):
            mine = str(theirs.get(name, 0)) if daemon else "-"
            rows.append((f"  {name}", mine, str(ours.get(name, 0))))
    total = sum(daemon.by_user.values()) if daemon else None
    rows.append(("total", "-" if total is None else str(total), str(sum(journal.by_user.values()))))
    width = max(len(r[0]) for r in rows)
    lines = []
    if daemon:
        lines.append(f"tailsfwd's counters: since it started, {_when(daemon.running_since)}"
                     f" (via {daemon.source})")  # fmt: skip
    else:
        lines.append(f"tailsfwd's counters: unavailable ({why})")
    lines.append(f"the journal: entries since {_when(since) if since else 'its start'}")
    lines += [f"  {a.ljust(width)}  {b:>10}  {c:>10}".rstrip() for a, b, c in rows]
    lines.append(f"  {journal.drops} drop entries, {journal.summaries} summaries"
                 f"; {journal.lost} refused packets not decoded (loss records)")  # fmt: skip
    lines += [f"  {note}" for note in notes]
    if reaches_back(daemon, oldest) is False:
        assert daemon is not None
        lines.append(
            f"warning: the journal no longer reaches back to tailsfwd's start"
            f" ({_when(daemon.running_since)}): its oldest entry is from {_when(oldest)};"
            " the drops before are only in tailsfwd's counters"
        )
    return "\n".join(lines) + "\n"


def to_json(
    daemon: Counted | None, why: str, journal: Tally, since: datetime | None,
    oldest: datetime | None, notes: list[str],
) -> dict[str, Any]:  # fmt: skip
    def iso(t: datetime | None) -> str | None:
        return t.astimezone().isoformat() if t else None

    theirs = None
    if daemon:
        theirs = {"source": daemon.source, "running_since": iso(daemon.running_since),
                  "by_user": daemon.by_user, "by_reason": daemon.by_reason}  # fmt: skip
    return {
        "daemon": theirs,
        "daemon_error": "" if daemon else why,
        "journal": {"since": iso(since), "oldest": iso(oldest), "by_user": journal.by_user,
                    "by_reason": journal.by_reason, "drops": journal.drops,
                    "summaries": journal.summaries, "lost": journal.lost, "notes": notes},
        "reaches_back": reaches_back(daemon, oldest),
    }  # fmt: skip


def command(args: argparse.Namespace) -> int:
    """`tailsfwctl drops --summary`: tailsfwd's counters beside the journal's."""
    # Only --summary asks the daemon: D-Bus and the status file are imported here.
    from . import observe, summary

    try:
        if args.follow or args.user is not None:
            raise QueryError("--summary counts every user once: without --follow and --user", USAGE)
        drops, since = opened(args)
    except QueryError as e:
        return failed(e)
    try:
        properties, source = observe.daemon(args.bus, args.state_file)
        daemon = counted(properties, source)
        start = since or (daemon.running_since if daemon else None)
        oldest = drops.oldest()
        drops.since(start)
        journal_tally = tally(drops.entries())
        shown_args = (daemon, source, journal_tally, start, oldest, drops.notes())
        if args.json:
            print(json.dumps(to_json(*shown_args), sort_keys=True))
        else:
            print(render(*shown_args), end="")
        return summary.OK if daemon else summary.NO_DAEMON
    finally:
        drops.close()
