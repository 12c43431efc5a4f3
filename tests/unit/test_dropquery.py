"""`tailsfwctl drops`: times, trusted writers, strict fields, lines, JSON, errors
(journal reading itself is tested in the lab, against a real journald)."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tailsfw import cli, dropquery
from tailsfw.droplog import KEY, OVERFLOW, USER, Summary, drop_entry, loss_entry, summary_entry
from tailsfw.dropquery import BadEntry, QueryError, Writer, entry, parse_since, shown
from tailsfw.dropsummary import Counted, reaches_back, render, tally
from tailsfw.nflog import Drop

NOW = datetime(2026, 11, 26, 5, 30, 0)
TCP = Drop(4, 6, "192.168.77.2", "198.51.100.10", 60, "Dropped outbound packet: ", 0.0,
           sport=40000, dport=42, uid=1000, gid=1001, outdev=2)  # fmt: skip
TCP6 = Drop(6, 6, "2001:db8:77::2", "2001:db8::2", 80, "Dropped outbound packet: ", 0.0,
            sport=40000, dport=1234, uid=1000, gid=1001, outdev=2)  # fmt: skip
PING = Drop(4, 1, "192.168.77.2", "198.51.100.11", 84, "Dropped outbound packet: ", 0.0,
            icmp_type=8, icmp_code=0, uid=0, gid=0, outdev=2)  # fmt: skip
EXE = "/usr/bin/python3.11"
WRITER = Writer(exe=EXE)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("now", NOW),
        ("today", datetime(2026, 11, 26)),
        ("yesterday", datetime(2026, 11, 25)),
        ("-10min", datetime(2026, 11, 26, 5, 20)),
        ("-2h", datetime(2026, 11, 26, 3, 30)),
        ("1 hour ago", datetime(2026, 11, 26, 4, 30)),
        ("30 s ago", datetime(2026, 11, 26, 5, 29, 30)),
        ("2026-11-25 23:59", datetime(2026, 11, 25, 23, 59)),
        ("2026-11-25T23:59:30", datetime(2026, 11, 25, 23, 59, 30)),
    ],
)
def test_since(text: str, expected: datetime) -> None:
    assert parse_since(text, NOW) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "not a time"),
        ("soon", "not a time"),
        ("-10 fortnights", "not a time"),
        ("2026-13-01", "not a time"),
        ("-99999999999999999999min", "too far back"),
        ("99999999999 days ago", "too far back"),
        ("0001-01-01", "from 1970 on"),  # year 0 in some time zones: no generic ValueError
        ("1969-12-31", "from 1970 on"),
        ("-1²min", "not a time"),
    ],
)
def test_since_errors_name_the_value(text: str, why: str) -> None:
    with pytest.raises(QueryError, match=f"--since {text!r}: ") as raised:
        parse_since(text, NOW)
    assert raised.value.code == 2
    assert why in str(raised.value)


def raw(fields: dict[str, Any], **trusted: Any) -> dict[str, Any]:
    """A journal entry as python-systemd's Reader gives it (MESSAGE_ID as a UUID,
    _UID as an int), written by tailsfwd outside systemd unless told otherwise."""
    converted = {k: uuid.UUID(v) if k == "MESSAGE_ID" else v for k, v in fields.items()}
    return {**converted, "__REALTIME_TIMESTAMP": NOW, "_UID": 0, "_EXE": EXE, **trusted}


def test_drop_line_and_json() -> None:
    e = entry(raw(drop_entry(TCP, "amnesia", "", "eth0")))
    assert e.line() == (
        "2026-11-26 05:30:00 amnesia (1000) TCP 192.168.77.2:40000 -> 198.51.100.10:42"
        " via eth0: Dropped outbound packet"
    )
    data = e.json()
    assert data["kind"] == "drop" and data["dport"] == 42
    assert (data["uid"], data["gid"]) == (1000, 1001)
    assert data["dst"] == "198.51.100.10" and data["message"].startswith("Dropped outbound")
    assert data["time"].startswith("2026-11-26T05:30:00")
    assert e.concerns("amnesia") and e.concerns("1000") and not e.concerns("root")


def test_ipv6_and_icmp_lines() -> None:
    assert entry(raw(drop_entry(TCP6, "amnesia", "", "eth0"))).line() == (
        "2026-11-26 05:30:00 amnesia (1000) TCP [2001:db8:77::2]:40000 -> [2001:db8::2]:1234"
        " via eth0: Dropped outbound packet"
    )
    assert entry(raw(drop_entry(PING, "root", "", "eth0"))).line() == (
        "2026-11-26 05:30:00 root (0) ICMP type 8 code 0 192.168.77.2 -> 198.51.100.11"
        " via eth0: Dropped outbound packet"
    )


def test_summary_and_loss_lines() -> None:
    key = ("198.51.100.10", "Dropped outbound packet: ")
    summary = entry(raw(summary_entry(Summary(KEY, 1000, key, 12, 0.0, 9.0), lambda u: "amnesia")))
    assert summary.line() == (
        "2026-11-26 05:30:00 12 more like this suppressed in 9.0 s: amnesia to 198.51.100.10,"
        " Dropped outbound packet"
    )
    assert summary.json()["suppressed"] == 12 and summary.json()["kind"] == "summary"
    loss = entry(raw(loss_entry(5)))
    assert loss.json()["lost"] == 5 and loss.concerns("anyone")
    overflow = entry(raw(summary_entry(Summary(OVERFLOW, None, None, 3, 0.0, 1.0), str)))
    assert overflow.concerns("anyone")
    beyond = entry(raw(summary_entry(Summary(USER, 1000, None, 3, 0.0, 1.0), lambda u: "amnesia")))
    assert beyond.concerns("amnesia") and not beyond.concerns("root")


@pytest.mark.parametrize(
    ("trusted", "believed"),
    [
        ({}, True),  # journald without systemd: root, tailsfwd's interpreter
        ({"_UID": 1000}, False),  # any user with the journal API or logger --journald
        ({"_EXE": "/usr/bin/logger"}, False),  # root, but another program
        ({"_SYSTEMD_UNIT": "tailsfwd.service"}, True),
        ({"_SYSTEMD_UNIT": "tailsfwd.service", "_UID": 1000}, False),
        ({"_SYSTEMD_UNIT": "session-2.scope"}, False),  # a root shell's python
        ({"_UID": "0"}, False),  # not as the Reader converts it: not believed
    ],
)
def test_only_tailsfwds_own_entries_are_believed(trusted: dict[str, Any], believed: bool) -> None:
    assert WRITER.wrote(raw(drop_entry(TCP, "amnesia", "", "eth0"), **trusted)) is believed


def test_a_missing_uid_is_not_root() -> None:
    fields = raw(drop_entry(TCP, "amnesia", "", "eth0"))
    del fields["_UID"]
    assert not WRITER.wrote(fields)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"TAILSFW_UID": "²"}, "TAILSFW_UID '²': not a number"),
        ({"TAILSFW_UID": "4294967295"}, "TAILSFW_UID"),
        ({"TAILSFW_DPORT": "-1"}, "TAILSFW_DPORT"),
        ({"TAILSFW_DPORT": " 42"}, "TAILSFW_DPORT"),
        ({"TAILSFW_DST": "example.org"}, "TAILSFW_DST"),
        ({"TAILSFW_PROTO": "TCP\x1b[2J"}, "TAILSFW_PROTO 'TCP\\\\x1b[2J'"),
        ({"TAILSFW_KIND": "drops"}, "TAILSFW_KIND"),
        ({"TAILSFW_KIND": "lost"}, "MESSAGE_ID is not that of a lost entry"),
        ({"TAILSFW_SRC": ["192.168.77.2", "10.0.0.1"]}, "TAILSFW_SRC appears 2 times"),
        ({"TAILSFW_USER": b"\xff"}, "TAILSFW_USER is not UTF-8"),
        ({"TAILSFW_REASON": "x" * 300}, "longer than 256"),
        ({"TAILSFW_FAMILY": None}, "no TAILSFW_FAMILY"),
    ],
)
def test_fields_are_parsed_strictly(change: dict[str, Any], why: str) -> None:
    fields = raw(drop_entry(TCP, "amnesia", "", "eth0")) | change
    fields = {k: v for k, v in fields.items() if v is not None}
    with pytest.raises(BadEntry, match=re.escape(why)):
        entry(fields)


def test_the_time_is_the_journals() -> None:
    fields = raw(drop_entry(TCP, "amnesia", "", "eth0")) | {"TAILSFW_TIME": "1999-01-01"}
    data = entry(fields).json()
    assert data["time"].startswith("2026-11-26T05:30:00") and "TAILSFW_TIME" not in str(data)


def test_control_characters_are_shown_escaped() -> None:
    assert shown("plain text, ümlaut") == "plain text, ümlaut"
    assert shown("a\x1b[1A\x1b[2Kb\rc\nd\x7f\u202ee\\") == (
        "a\\x1b[1A\\x1b[2Kb\\x0dc\\x0ad\\x7f\\u202ee\\\\"
    )
    fake = summary_entry(Summary(OVERFLOW, None, None, 3, 0.0, 1.0), str)
    fake["MESSAGE"] = "\x1b[2A\x1b[Jall clear\n2026-11-26 05:30:00 nothing refused"
    assert "\n" not in (line := entry(raw(fake)).line()) and "\x1b" not in line
    assert line.endswith("\\x1b[2A\\x1b[Jall clear\\x0a2026-11-26 05:30:00 nothing refused")
    evil = entry(raw(drop_entry(TCP, "ev\x1bil", "", "et\rh0")))
    assert "\x1b" not in evil.line() and "\r" not in evil.line()


def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["drops", "--directory", str(tmp_path / "nowhere")]) == 1
    assert capsys.readouterr().err == (
        f"tailsfwctl: cannot open {tmp_path / 'nowhere'}: not a directory\n"
    )
    for since in ("soon", "", "-99999999999999999999min", "99999999999 days ago", "0001-01-01"):
        assert cli.main(["drops", f"--since={since}", "--directory", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"tailsfwctl: --since {since!r}: ") and err.count("\n") == 1
    assert cli.main(["drops", "--summary", "--follow", "--directory", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_no_system_journal_is_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dropquery, "SYSTEM_JOURNALS", (tmp_path / "run", tmp_path / "var"))
    assert cli.main(["drops"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tailsfwctl: cannot read the system journal: no journal files in")
    assert err.count("\n") == 1


def test_cli_empty_journal_prints_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert cli.main(["drops", "--json", "--since=-1h", "--directory", str(tmp_path)]) == 0
    assert capsys.readouterr().out == ""


def test_summary_sets_the_counters_beside_the_journal() -> None:
    key = ("198.51.100.10", "Dropped outbound packet: ")
    entries = [
        entry(raw(drop_entry(TCP, "amnesia", "", "eth0"))),
        entry(raw(summary_entry(Summary(KEY, 1000, key, 12, 0.0, 9.0), lambda u: "amnesia"))),
        entry(raw(summary_entry(Summary(OVERFLOW, None, None, 3, 0.0, 1.0), str))),
        entry(raw(loss_entry(5))),
    ]
    counted = tally(entries)
    assert counted.by_user == {"amnesia": 13, "(users beyond the limit)": 3}
    assert counted.by_reason == {"Dropped outbound packet": 13, "overflow": 3}
    assert (counted.drops, counted.summaries, counted.lost) == (1, 2, 5)
    started = datetime(2026, 11, 26, 5, 0, 0)
    daemon = Counted("D-Bus", started, {"amnesia": 40, "root": 2},
                     {"Dropped outbound packet": 42})  # fmt: skip
    text = render(daemon, "D-Bus", counted, started, datetime(2026, 11, 26, 5, 10), [])
    assert re.search(r"^ +amnesia +40 +13$", text, re.M), text
    assert re.search(r"^ +root +2 +0$", text, re.M), text
    assert re.search(r"^ +\(users beyond the limit\) +0 +3$", text, re.M), text
    assert "warning: the journal no longer reaches back to tailsfwd's start" in text
    assert reaches_back(daemon, started) is True
    assert reaches_back(daemon, datetime(2026, 11, 26, 5, 0, 5)) is False
    assert reaches_back(None, started) is None
    unavailable = render(None, "tailsfwd is not on the bus", counted, None, None, [])
    assert "tailsfwd's counters: unavailable (tailsfwd is not on the bus)" in unavailable
