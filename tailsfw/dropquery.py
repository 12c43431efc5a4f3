"""Reading the audit's entries back from the journal (`tailsfwctl drops`).

Any local user can write journal entries with tailsfwd's MESSAGE_IDs and
TAILSFW_ fields, so those alone prove nothing.  Journald itself adds the
fields that start with `_` (the sender's credentials, from the kernel), and
no client can set them: an entry is believed only when `_UID=0` and
`_SYSTEMD_UNIT=tailsfwd.service`, or, in a journal without systemd units
(journald without systemd as init: no entry has a unit), `_EXE` is the
interpreter tailsfwd runs on.  The others are counted as ignored.

Every field of a believed entry is parsed strictly (a bad one skips the
entry, counted and named, never a crash), the time is the journal's own
(`__REALTIME_TIMESTAMP`), and text is shown with control characters escaped.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from systemd import journal

from .droplog import DROP_MESSAGE_ID, LOSS_MESSAGE_ID, MESSAGE_IDS, SUMMARY_MESSAGE_ID

UNIT = "tailsfwd.service"
SYSTEM_JOURNALS = (Path("/run/log/journal"), Path("/var/log/journal"))
UNITS = {
    "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}  # fmt: skip
RELATIVE = re.compile(r"-\s*([0-9]+)\s*([a-z]+)|([0-9]+)\s*([a-z]+)\s+ago", re.ASCII)
SINCE_HELP = 'a time such as "2026-11-26 05:00", "today", "-10min" or "1 hour ago"'
USAGE = 2  # a bad argument, as argparse's own errors
HINT = " (the journal is readable by root and the systemd-journal group)"


class QueryError(ValueError):
    """A bad argument (code 2) or an unreadable journal (code 1); the message says which."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def parse_since(text: str, now: datetime) -> datetime:
    """--since: an absolute time (local), today/yesterday/now, or a time ago."""
    value = text.strip().lower()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    named = {"now": now, "today": midnight, "yesterday": midnight - timedelta(days=1)}
    try:
        if value in named:
            when = named[value]
        elif match := RELATIVE.fullmatch(value):
            amount, unit = (match[1], match[2]) if match[1] else (match[3], match[4])
            if unit not in UNITS:
                raise ValueError(unit)
            when = now - timedelta(seconds=int(amount[:20]) * UNITS[unit])
        else:
            when = datetime.fromisoformat(text.strip())
    except OverflowError:
        raise QueryError(f"--since {text!r}: too far back", USAGE) from None
    except ValueError:
        raise QueryError(f"--since {text!r}: not {SINCE_HELP}", USAGE) from None
    try:
        stamp = when.timestamp()
    except (ValueError, OverflowError, OSError):
        stamp = -1.0  # year 0 or 10000 in the local time zone
    if stamp < 0:
        raise QueryError(f"--since {text!r}: not from 1970 on, the journal's range", USAGE)
    return when


# -- showing text ---------------------------------------------------------------


def shown(text: str) -> str:
    """Text safe to print: control and other non-printing characters (escape
    sequences, carriage returns, newlines, bidi overrides) and backslashes escaped."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c != "\\" else _escape(c) for c in text)


def _escape(c: str) -> str:
    code = ord(c)
    if c == "\\":
        return "\\\\"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


# -- parsing entries strictly ---------------------------------------------------


class BadEntry(ValueError):
    """An entry of tailsfwd's with a field that is not what tailsfwd writes."""


def _number(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        if not re.fullmatch(r"[0-9]{1,20}", value, re.ASCII) or not low <= int(value) <= high:
            raise ValueError(f"not a number from {low} to {high}")
        return int(value)

    return parse


def _address(value: str) -> str:
    return str(ipaddress.ip_address(value))


def _protocol(value: str) -> str:
    if value in ("TCP", "UDP", "ICMP", "ICMPv6"):
        return value
    return str(_number(0, 255)(value))


def _seconds(value: str) -> float:
    if not re.fullmatch(r"[0-9]{1,12}(\.[0-9]{1,6})?", value, re.ASCII):
        raise ValueError("not a number of seconds")
    return float(value)


def _family(value: str) -> str:
    if value not in ("ipv4", "ipv6"):
        raise ValueError("not ipv4 or ipv6")
    return value


def _text(value: str) -> str:
    if len(value) > 256:
        raise ValueError("longer than 256 characters")
    return value


_ID = _number(0, 2**32 - 2)
_BYTE = _number(0, 255)
_PORT = _number(0, 65535)
_COUNT = _number(1, 2**63 - 1)
# Every TAILSFW_ field tailsfwd writes (droplog.py), and how to read it.
FIELDS: dict[str, Callable[[str], Any]] = {
    "REASON": _text, "FAMILY": _family, "SRC": _address, "DST": _address,
    "PROTO": _protocol, "LEN": _number(0, 65575), "SPORT": _PORT, "DPORT": _PORT,
    "ICMP_TYPE": _BYTE, "ICMP_CODE": _BYTE, "UID": _ID, "GID": _ID, "USER": _text,
    "OUTDEV": _text, "SUPPRESSED": _COUNT, "SECONDS": _seconds, "LOST": _COUNT,
}  # fmt: skip
KINDS = {  # kind: its MESSAGE_ID, the fields it must have
    "drop": (DROP_MESSAGE_ID, ("REASON", "FAMILY", "SRC", "DST", "PROTO")),
    "summary": (SUMMARY_MESSAGE_ID, ("REASON", "SUPPRESSED")),
    "lost": (LOSS_MESSAGE_ID, ("LOST",)),
}


def _one(raw: Mapping[str, Any], name: str) -> str:
    value = raw[name]
    if isinstance(value, list):
        raise BadEntry(f"{name} appears {len(value)} times")
    if not isinstance(value, str):
        raise BadEntry(f"{name} is not UTF-8 text")
    return value


@dataclass(frozen=True)
class Entry:
    """One audit entry: when (the journal's time), what kind, its TAILSFW_ fields."""

    time: datetime
    kind: str
    message: str
    fields: Mapping[str, Any]  # TAILSFW_ fields without the prefix, parsed

    def line(self) -> str:
        f = self.fields
        when = self.time.strftime("%Y-%m-%d %H:%M:%S")
        if self.kind != "drop":
            return f"{when} {shown(self.message)}"
        user = shown(f.get("USER", "?"))
        who = f"{user} ({f['UID']})" if "UID" in f else user
        src, dst = f["SRC"], f["DST"]
        if "DPORT" in f:
            src, dst = _endpoint(src, f.get("SPORT", "?")), _endpoint(dst, f["DPORT"])
        what = f["PROTO"]
        if "ICMP_TYPE" in f:
            what += f" type {f['ICMP_TYPE']} code {f.get('ICMP_CODE', '?')}"
        out = f" via {shown(f['OUTDEV'])}" if f.get("OUTDEV") else ""
        return f"{when} {who} {what} {src} -> {dst}{out}: {shown(f['REASON'])}"

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = {key.lower(): value for key, value in sorted(self.fields.items())}
        data |= {"time": self.time.astimezone().isoformat(), "kind": self.kind}
        data["message"] = self.message
        return data

    def concerns(self, user: str) -> bool:
        """Entries of this user (by name or uid); overflow summaries and losses, which
        may hold this user's drops too, are kept."""
        f = self.fields
        if self.kind == "lost" or ("USER" not in f and "UID" not in f):
            return True
        return user == f.get("USER") or ("UID" in f and user == str(f["UID"]))


def _endpoint(address: str, port: object) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def entry(raw: Mapping[str, Any]) -> Entry:
    """A journal entry of tailsfwd's -> Entry; BadEntry naming the field that is wrong."""
    if "TAILSFW_KIND" not in raw:
        raise BadEntry("no TAILSFW_KIND")
    kind = _one(raw, "TAILSFW_KIND")
    if kind not in KINDS:
        raise BadEntry(f"TAILSFW_KIND {shown(kind)!r} is not one of tailsfwd's")
    message_id, required = KINDS[kind]
    if getattr(raw.get("MESSAGE_ID"), "hex", None) != message_id:
        raise BadEntry(f"MESSAGE_ID is not that of a {kind} entry")
    fields: dict[str, Any] = {}
    for name, parse in FIELDS.items():
        if (key := f"TAILSFW_{name}") in raw:
            value = _one(raw, key)
            try:
                fields[name] = parse(value)
            except ValueError as e:
                raise BadEntry(f"{key} {shown(value[:40])!r}: {e}") from None
    if missing := [name for name in required if name not in fields]:
        raise BadEntry(f"no TAILSFW_{missing[0]}")
    when = raw.get("__REALTIME_TIMESTAMP")
    if not isinstance(when, datetime):
        raise BadEntry("no journal time")
    message = _one(raw, "MESSAGE") if "MESSAGE" in raw else ""
    return Entry(time=when, kind=kind, message=message, fields=fields)


# -- whose entries --------------------------------------------------------------


@dataclass(frozen=True)
class Writer:
    """tailsfwd, by the fields journald sets itself (a client cannot forge them)."""

    unit: str = UNIT
    # Where entries carry no unit (journald without systemd): tailsfwd's interpreter,
    # the one running this program (they are installed together).
    exe: str = field(default_factory=lambda: os.path.realpath(sys.executable))

    def wrote(self, raw: Mapping[str, Any]) -> bool:
        if raw.get("_UID") != 0:
            return False
        if "_SYSTEMD_UNIT" in raw:
            return bool(raw["_SYSTEMD_UNIT"] == self.unit)
        return bool(raw.get("_EXE") == self.exe)

    def match(self) -> str:
        """What a person types to see the same entries with journalctl."""
        return f"_UID=0 _SYSTEMD_UNIT={self.unit}"


# -- the journal ----------------------------------------------------------------


def journal_files(directories: tuple[Path, ...]) -> list[Path]:
    """The journal files in these directories and their subdirectories (one level,
    as sd-journal reads them); QueryError if one cannot be listed or read.

    sd-journal skips the files it may not open and reads the rest: a user outside
    the systemd-journal group would see nothing and think nothing happened."""
    found: list[Path] = []
    for top in directories:
        try:
            places = [top, *(p for p in top.iterdir() if p.is_dir() and not p.is_symlink())]
            for place in places:
                found += (p for p in place.iterdir() if p.name.endswith((".journal", ".journal~")))
        except FileNotFoundError:
            continue
        except OSError as e:
            raise QueryError(f"cannot read {e.filename}: {e.strerror}{HINT}") from None
    for path in found:
        if not os.access(path, os.R_OK):
            raise QueryError(f"cannot read {path}: Permission denied{HINT}")
    return found


class DropJournal:
    """tailsfwd's audit entries in the system journal, or in a directory of journal files.

    `ignored` counts entries with tailsfwd's MESSAGE_IDs not written by tailsfwd;
    `malformed` those of tailsfwd's that could not be read, `last_malformed` why."""

    def __init__(self, directory: Path | None = None, writer: Writer | None = None) -> None:
        self.writer = writer or Writer()
        self.ignored = self.malformed = 0
        self.last_malformed = ""
        where = str(directory) if directory else "the system journal"
        if directory is not None and not directory.is_dir():
            raise QueryError(f"cannot open {directory}: not a directory")
        if not journal_files((directory,) if directory else SYSTEM_JOURNALS) and not directory:
            raise QueryError(
                f"cannot read the system journal: no journal files in"
                f" {' or '.join(map(str, SYSTEM_JOURNALS))} (is systemd-journald running?)"
            )
        try:
            self.reader = journal.Reader(path=str(directory)) if directory else journal.Reader()
        except OSError as e:
            raise QueryError(f"cannot open {where}: {e.strerror or e}") from e
        for message_id in MESSAGE_IDS:
            self.reader.add_match(MESSAGE_ID=message_id)

    def since(self, when: datetime | None) -> None:
        if when is not None:
            self.reader.seek_realtime(when.timestamp())

    def entries(self) -> Iterator[Entry]:
        """tailsfwd's entries from the current position to the end (for now)."""
        while raw := self.reader.get_next():
            if not self.writer.wrote(raw):
                self.ignored += 1
                continue
            try:
                parsed = entry(raw)
            except BadEntry as e:
                self.malformed += 1
                self.last_malformed = str(e)
                continue
            yield parsed

    def follow(self) -> Iterator[Entry]:
        """The entries to the end, then each new one as it comes; never ends."""
        while True:
            yield from self.entries()
            self.reader.wait()

    def oldest(self) -> datetime | None:
        """The time of the journal's oldest entry of any kind (None: it is empty)."""
        self.reader.flush_matches()
        try:
            self.reader.seek_head()
            first = self.reader.get_next()
        finally:
            for message_id in MESSAGE_IDS:
                self.reader.add_match(MESSAGE_ID=message_id)
            self.reader.seek_head()
        when = first.get("__REALTIME_TIMESTAMP") if first else None
        return when if isinstance(when, datetime) else None

    def notes(self) -> list[str]:
        """What was left out, one line each (for stderr)."""
        lines = []
        if self.ignored:
            lines.append(
                f"ignored {self.ignored} entr{'y' if self.ignored == 1 else 'ies'} with"
                f" tailsfwd's MESSAGE_IDs not written by tailsfwd (only {self.writer.match()}"
                " are tailsfwd's)"
            )
        if self.malformed:
            lines.append(
                f"skipped {self.malformed} malformed entr{'y' if self.malformed == 1 else 'ies'}"
                f" of tailsfwd's; the last: {self.last_malformed}"
            )
        return lines

    def close(self) -> None:
        self.reader.close()


# -- the command ----------------------------------------------------------------


def opened(args: argparse.Namespace) -> tuple[DropJournal, datetime | None]:
    """The journal and the --since time the arguments ask for (QueryError if wrong)."""
    since = parse_since(args.since, datetime.now()) if args.since is not None else None
    return DropJournal(args.directory), since


def failed(e: QueryError) -> int:
    print(f"tailsfwctl: {e}", file=sys.stderr)
    return e.code


def command(args: argparse.Namespace) -> int:
    """`tailsfwctl drops`: entries on stdout, what was left out on stderr; every
    failure is one line on stderr, exit 1 (the journal) or 2 (an argument)."""
    try:
        drops, since = opened(args)
    except QueryError as e:
        return failed(e)
    try:
        drops.since(since)
        try:
            for entry in drops.follow() if args.follow else drops.entries():
                if args.user is None or entry.concerns(args.user):
                    text = json.dumps(entry.json()) if args.json else entry.line()
                    print(text, flush=args.follow)
        except KeyboardInterrupt:
            pass
        for note in drops.notes():
            print(f"tailsfwctl: {note}", file=sys.stderr)
        return 0
    finally:
        drops.close()
