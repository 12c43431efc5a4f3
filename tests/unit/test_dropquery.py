"""`tailsfwctl drops`: times, lines, JSON and errors (journal reading itself is
tested in the lab, against a real journald)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from tailsfw import cli
from tailsfw.droplog import Summary, drop_entry, loss_entry, summary_entry
from tailsfw.dropquery import QueryError, entry, parse_since
from tailsfw.nflog import Drop

NOW = datetime(2026, 11, 26, 5, 30, 0)
TCP = Drop(4, 6, "192.168.77.2", "198.51.100.10", 60, "Dropped outbound packet: ", 0.0,
           sport=40000, dport=42, uid=1000, gid=1000, outdev=2)  # fmt: skip


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


@pytest.mark.parametrize("text", ["", "soon", "-10 fortnights", "2026-13-01"])
def test_since_errors_name_the_value(text: str) -> None:
    with pytest.raises(QueryError, match=f"--since {text!r}: not a time"):
        parse_since(text, NOW)


def raw(fields: dict[str, str]) -> dict[str, object]:
    return {**fields, "__REALTIME_TIMESTAMP": NOW}


def test_drop_line_and_json() -> None:
    e = entry(raw(drop_entry(TCP, "amnesia", "", "eth0")))
    assert e.line() == (
        "2026-11-26 05:30:00 amnesia (1000) TCP 192.168.77.2:40000 -> 198.51.100.10:42"
        " via eth0: Dropped outbound packet"
    )
    data = e.json()
    assert data["kind"] == "drop" and data["dport"] == 42 and data["uid"] == 1000
    assert data["dst"] == "198.51.100.10" and data["message"].startswith("Dropped outbound")
    assert data["time"].startswith("2026-11-26T05:30:00")
    assert e.concerns("amnesia") and e.concerns("1000") and not e.concerns("root")


def test_summary_and_loss_lines() -> None:
    key = (1000, "198.51.100.10", "Dropped outbound packet: ")
    summary = entry(raw(summary_entry(Summary(key, 12, 0.0, 9.0), lambda uid: "amnesia")))
    assert summary.line() == (
        "2026-11-26 05:30:00 12 more like this suppressed in 9.0 s: amnesia to 198.51.100.10,"
        " Dropped outbound packet"
    )
    assert summary.json()["suppressed"] == 12 and summary.json()["kind"] == "summary"
    loss = entry(raw(loss_entry(5)))
    assert loss.json()["lost"] == 5 and loss.concerns("anyone")
    overflow = entry(raw(summary_entry(Summary(None, 3, 0.0, 1.0), lambda uid: "?")))
    assert overflow.concerns("anyone")


def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["drops", "--directory", str(tmp_path / "nowhere")]) == 1
    assert capsys.readouterr().err == (
        f"tailsfwctl: cannot open {tmp_path / 'nowhere'}: No such file or directory\n"
    )
    assert cli.main(["drops", "--since", "soon", "--directory", str(tmp_path)]) == 1
    assert "--since 'soon': not a time" in capsys.readouterr().err


def test_cli_empty_journal_prints_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert cli.main(["drops", "--json", "--since=-1h", "--directory", str(tmp_path)]) == 0
    assert capsys.readouterr().out == ""
