"""Refused packets become journal entries (issue 9), with a real journald.

The default policy is loaded into the lab host; the audit (the same
`DropAudit` tailsfwd runs) reads the host's NFLOG group and writes to a
journald of the test's own; entries are read back with `journalctl -o json`
and `tailsfwctl drops --json`.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tailsfw import policy as policy_module
from tailsfw.droplog import (
    DROP_MESSAGE_ID,
    LOSS_MESSAGE_ID,
    MESSAGE_IDS,
    SUMMARY_MESSAGE_ID,
    Limits,
)
from tests.lab import policies
from tests.lab.command import PYTHON, REPO, VENV_PYTHON, netns_exec
from tests.lab.daemon_process import run_daemon, unit_cgroup
from tests.lab.journald import AuditProcess, Journald, run_audit, run_journald
from tests.lab.kernel import lab_host_put_back, reset_host
from tests.lab.topology import INTERNET_V4, INTERNET_V6, Lab

FLOOD_SECONDS = 10.0
# One user, one socket, as fast as it can; prints how many sends it made.
FLOOD = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], 42))
end = time.monotonic() + float(sys.argv[2])
sends = 0
while time.monotonic() < end:
    for _ in range(1000):
        try:
            s.send(b"flood")
        except OSError:
            pass
    sends += 1000
print(sends)
"""

Entry = dict[str, Any]


@pytest.fixture(scope="module")
def enforced(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The shipped policy in force in the lab host; removed afterwards."""
    path = policies.lab_policy(lab, tmp_path_factory.mktemp("policy") / "policy.toml")
    with reset_host(lab.host_ns, ["net.ipv4.ip_forward"]):  # no sysctl is changed
        done = policies.apply(lab, path)
        assert done.returncode == 0, done.stderr
        yield path


@pytest.fixture(scope="module")
def journald(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Journald]:
    with run_journald(tmp_path_factory.mktemp("journald")) as started:
        yield started


@pytest.fixture
def audit(lab: Lab, enforced: Path, journald: Journald) -> Iterator[AuditProcess]:
    group = policy_module.load(enforced).log.group
    with run_audit(lab.host_ns, journald, group) as started:
        yield started


def wait_entries(
    journald: Journald, pid: int, done: Callable[[list[Entry]], bool], timeout: float = 5
) -> list[Entry]:
    """The entries of the audit in process `pid`, once `done` says they are all there."""
    deadline = time.monotonic() + timeout
    while True:
        entries = journald.entries(f"_PID={pid}")
        if done(entries) or time.monotonic() > deadline:
            return entries
        time.sleep(0.05)


def drops(journald: Journald, *args: str) -> subprocess.CompletedProcess[str]:
    """`tailsfwctl drops --directory FILES ARGS`."""
    return subprocess.run(
        [VENV_PYTHON, "-m", "tailsfw.cli", "drops", "--directory", str(journald.files), *args],
        capture_output=True, text=True, check=False, timeout=30, cwd=REPO,
    )  # fmt: skip


def drops_json(journald: Journald, *args: str) -> list[Entry]:
    done = drops(journald, "--json", *args)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def drop_lines(journald: Journald, *args: str) -> list[str]:
    done = drops(journald, *args)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    return done.stdout.splitlines()


def local_time(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def matching(entries: list[Entry], **fields: str) -> list[Entry]:
    return [e for e in entries if all(e.get(k) == v for k, v in fields.items())]


# Tails' own test (features/step_definitions/firewall_leaks.rb) searches the
# kernel's LOG line: the same regular expression, in substance.
def tails_pattern(dst: str, proto: str, port: int | None, uid: int, gid: int) -> re.Pattern[str]:
    port_part = f"SPT=\\d+ DPT={port} " if port is not None else "TYPE=\\d+ CODE=\\d+ "
    return re.compile(
        f"^Dropped outbound packet: .*DST={re.escape(dst)} .*PROTO={proto} {port_part}"
        f"UID={uid} GID={gid}$"
    )


CASES = [  # (role, proto, destination, port): what Tails' own test suite checks
    ("amnesia", "tcp", INTERNET_V4[0], 42),
    ("amnesia", "udp", INTERNET_V4[0], 42),
    ("root", "icmp", INTERNET_V4[1], None),
]


def test_tails_cases_each_give_an_entry(lab: Lab, journald: Journald, audit: AuditProcess) -> None:
    check_tails_cases(lab, journald, audit.process.pid)


def test_tailsfwd_logs_the_tails_cases(
    lab: Lab, journald: Journald, enforced: Path, tmp_path: Path
) -> None:
    """The same, with the audit inside tailsfwd, logging to the test's journald."""
    with (
        lab_host_put_back(lab),
        unit_cgroup() as into_unit,
        run_daemon(lab.host_ns, enforced, tmp_path / "d", wrap=journald.wrap) as daemon,
    ):
        daemon.wait_ready()
        daemon.wait_status(lambda s: s["drops"]["bound"])
        # As systemd runs it, so that its status file is believed (--summary below).
        into_unit(json.loads((daemon.state_dir / "status.json").read_text())["pid"])
        check_tails_cases(lab, journald, daemon.process.pid)
        user = lab.account("amnesia").name
        daemon.wait_status(lambda s: s["drops"]["by_user"].get(user, 0) >= 2)
        check_summary(journald, daemon.state_dir / "status.json", user, tmp_path / "later")
    # The host as the module's other tests have it: IPv6 on, the policy applied.
    assert policies.apply(lab, enforced).returncode == 0


def check_summary(journald: Journald, state_file: Path, user: str, later: Path) -> None:
    """`drops --summary`: tailsfwd's counters (its status file: no bus here) beside the
    journal's; and a journal begun after tailsfwd's start is said not to reach back."""
    args = ("--summary", "--bus", "unix:path=/nonexistent", "--state-file", str(state_file))
    done = drops(journald, *args)
    assert done.returncode == 0, (done.stdout, done.stderr)
    row = re.search(f"^ +{re.escape(user)} +(\\d+) +(\\d+)$", done.stdout, re.M)
    assert row and int(row[1]) >= 2 and int(row[2]) >= 2, done.stdout
    assert "tailsfwd's counters: since it started" in done.stdout, done.stdout
    assert "no longer reaches back" not in done.stdout, done.stdout
    data = json.loads(drops(journald, "--json", *args).stdout)
    assert data["reaches_back"] is True and data["daemon"]["by_user"][user] >= 2, data
    with run_journald(later) as newer:  # its first entry is newer than tailsfwd's start
        done = drops(newer, *args)
    assert done.returncode == 0, done.stderr
    assert "warning: the journal no longer reaches back to tailsfwd's start" in done.stdout
    assert re.search(f"^ +{re.escape(user)} +[1-9]\\d* +0$", done.stdout, re.M), done.stdout


def check_tails_cases(lab: Lab, journald: Journald, pid: int) -> None:
    since = time.time()
    for role, proto, dst, port in CASES:
        assert lab.probe(role, proto, 4, dst, port).result == "refused"

    def expected(role: str, proto: str, dst: str, port: int | None) -> dict[str, str]:
        account = lab.account(role)
        fields = {"MESSAGE_ID": DROP_MESSAGE_ID, "TAILSFW_DST": dst,
                  "TAILSFW_PROTO": proto.upper(), "TAILSFW_UID": str(account.uid),
                  "TAILSFW_GID": str(account.gid), "TAILSFW_USER": account.name,
                  "TAILSFW_REASON": "Dropped outbound packet", "TAILSFW_OUTDEV": "eth0",
                  "PRIORITY": "5"}  # fmt: skip
        if port is not None:
            fields["TAILSFW_DPORT"] = str(port)
        return fields

    wanted = [expected(*case) for case in CASES]
    entries = wait_entries(journald, pid, lambda es: all(matching(es, **w) for w in wanted))
    for (role, proto, dst, port), fields in zip(CASES, wanted, strict=True):
        found = matching(entries, **fields)
        assert found, f"no entry for {role} {proto} {dst}:{port} in {entries}"
        account = lab.account(role)
        pattern = tails_pattern(dst, proto.upper(), port, account.uid, account.gid)
        assert pattern.match(found[0]["MESSAGE"]), found[0]["MESSAGE"]

    # The same entries through tailsfwctl, for scripts.
    listed = drops_json(journald, "--since", local_time(since - 1))
    for role, proto, dst, port in CASES:
        want: dict[str, Any] = {"kind": "drop", "dst": dst, "proto": proto.upper(),
                "uid": lab.account(role).uid, "gid": lab.account(role).gid}  # fmt: skip
        if port is not None:
            want["dport"] = port
        assert matching(listed, **want), f"{want} not in {listed}"
    amnesia = drops_json(journald, "--user", lab.account("amnesia").name)
    assert amnesia and {e.get("user") for e in amnesia if e["kind"] == "drop"} == {
        lab.account("amnesia").name
    }
    # The lines a person reads: TCP with ports, ICMP with type and code.
    lines = drop_lines(journald, "--since", local_time(since - 1))
    user, uid = lab.account("amnesia").name, lab.account("amnesia").uid
    tcp = re.compile(
        f"^\\S+ \\S+ {re.escape(user)} \\({uid}\\) TCP [0-9.]+:\\d+ ->"
        f" {re.escape(INTERNET_V4[0])}:42 via eth0: Dropped outbound packet$"
    )
    ping = re.compile(
        f"^\\S+ \\S+ root \\(0\\) ICMP type 8 code 0 [0-9.]+ ->"
        f" {re.escape(INTERNET_V4[1])} via eth0: Dropped outbound packet$"
    )
    assert any(tcp.match(line) for line in lines), lines
    assert any(ping.match(line) for line in lines), lines


def test_ipv6_drops_are_decoded(lab: Lab, journald: Journald, audit: AuditProcess) -> None:
    dst = INTERNET_V6[0]
    assert lab.probe("amnesia", "tcp", 6, dst, 42).result == "refused"
    assert lab.probe("root", "icmp", 6, dst).result == "refused"
    amnesia, root = lab.account("amnesia"), lab.account("root")
    tcp = {"TAILSFW_FAMILY": "ipv6", "TAILSFW_DST": dst, "TAILSFW_PROTO": "TCP",
           "TAILSFW_DPORT": "42", "TAILSFW_UID": str(amnesia.uid)}  # fmt: skip
    icmp = {"TAILSFW_FAMILY": "ipv6", "TAILSFW_DST": dst, "TAILSFW_PROTO": "ICMPv6",
            "TAILSFW_ICMP_TYPE": "128", "TAILSFW_UID": str(root.uid)}  # fmt: skip
    entries = wait_entries(journald, audit.process.pid, lambda es: bool(matching(es, **tcp)) and
                           bool(matching(es, **icmp)))  # fmt: skip
    assert matching(entries, **tcp), entries
    assert matching(entries, **icmp), entries
    assert "PROTO=ICMPv6 TYPE=128 CODE=0 UID=0 GID=0" in matching(entries, **icmp)[0]["MESSAGE"]
    # As a person reads them: addresses in brackets before a port, ICMPv6 type and code.
    lines = drop_lines(journald)
    port = re.compile(
        f"^\\S+ \\S+ {re.escape(amnesia.name)} \\({amnesia.uid}\\) TCP"
        f" \\[[0-9a-f:]+\\]:\\d+ -> \\[{re.escape(dst)}\\]:42 via eth0: "
    )
    echo = re.compile(f"^\\S+ \\S+ root \\(0\\) ICMPv6 type 128 code 0 [0-9a-f:]+ ->"
                      f" {re.escape(dst)} via eth0: ")  # fmt: skip
    assert any(port.match(line) for line in lines), lines
    assert any(echo.match(line) for line in lines), lines


def test_a_flood_gives_bounded_entries_that_add_up(
    lab: Lab, journald: Journald, audit: AuditProcess
) -> None:
    """One user sends as fast as it can for 10 s: a bounded number of entries,
    and entries + suppressed counts + what the audit reports lost = the
    kernel's own count of refused packets."""
    time.sleep(0.2)  # anything under way before is in both counts
    kernel_before, audit_before = policies.refused_packets(lab), audit.counters()
    cpu_before = audit.cpu_seconds()
    flood = subprocess.Popen(
        [*netns_exec(lab.host_ns), *lab.setpriv("other"), PYTHON, "-c", FLOOD,
         INTERNET_V4[0], str(FLOOD_SECONDS)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(1.0)
        rss_early = audit.rss_mb()
        sends = int(flood.communicate(timeout=FLOOD_SECONDS + 30)[0])
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait()
    rss_late = audit.rss_mb()
    cpu_share = (audit.cpu_seconds() - cpu_before) / FLOOD_SECONDS
    # A marker drop after the flood: a loss at its very end shows as a gap in
    # the kernel's sequence numbers only when a later message is read (and
    # the marker itself is lost while the queue is still full: send again).
    marker = lab.account("amnesia").name
    seen_before = audit.counters()["by_user"].get(marker, 0)
    flood_ended = time.monotonic()
    while audit.counters()["by_user"].get(marker, 0) == seen_before:
        assert time.monotonic() < flood_ended + 20, f"no marker came: {audit.counters()}"
        assert lab.probe("amnesia", "udp", 4, INTERNET_V4[1], 42).result == "refused"
        time.sleep(0.2)
    caught_up = time.monotonic() - flood_ended
    kernel = policies.refused_packets(lab) - kernel_before
    after = audit.stop()  # writes every open summary
    counted = {k: after[k] - audit_before[k] for k in ("drops", "lost", "malformed", "unwritten")}
    entries = journald.entries(f"_PID={audit.process.pid}")
    logged = [e for e in entries if e["MESSAGE_ID"] == DROP_MESSAGE_ID]
    summaries = [e for e in entries if e["MESSAGE_ID"] == SUMMARY_MESSAGE_ID]
    suppressed = sum(int(e["TAILSFW_SUPPRESSED"]) for e in summaries)
    print(f"\nflood: {sends} sends in {FLOOD_SECONDS:.0f} s, kernel refused {kernel};"
          f" audit decoded {counted['drops']}, lost {counted['lost']};"
          f" {len(entries)} entries ({len(logged)} drops, {len(summaries)} summaries,"
          f" {suppressed} suppressed); audit CPU {cpu_share:.0%} of a core,"
          f" RSS {rss_early:.1f} -> {rss_late:.1f} MB; caught up {caught_up:.2f} s after;"
          f" overruns {after['overruns'] - audit_before['overruns']}")  # fmt: skip
    assert kernel >= sends * 0.9  # the flood was refused and counted
    assert counted["malformed"] == counted["unwritten"] == 0
    assert counted["drops"] + counted["lost"] == kernel
    # Over the audit's whole life: every drop it decoded is an entry or counted in one.
    assert len(logged) + suppressed == after["drops"]
    limits = Limits()
    windows = FLOOD_SECONDS // limits.window + 2
    assert len(entries) <= windows * (limits.burst + 2) + 10, entries[:20]
    assert rss_late - rss_early < 2.0
    assert cpu_share < 0.8


# Forged by a local user: tailsfwd's MESSAGE_IDs and fields, with values that used
# to crash the reader (a superscript two passes isdigit()), override the time, or
# draw on the terminal.
FORGED = ("198.51.100.201", "198.51.100.202", "198.51.100.203", "198.51.100.204")
FORGE_API = f"""
from systemd import journal
common = dict(PRIORITY="5", SYSLOG_IDENTIFIER="tailsfwd")
journal.send("Dropped outbound packet: forged", MESSAGE_ID="{DROP_MESSAGE_ID}",
    TAILSFW_KIND="drop", TAILSFW_REASON="Dropped outbound packet", TAILSFW_FAMILY="ipv4",
    TAILSFW_SRC="192.168.77.2", TAILSFW_DST="{FORGED[0]}", TAILSFW_PROTO="TCP",
    TAILSFW_DPORT="42", TAILSFW_UID="\\u00b2", TAILSFW_USER="amnesia",
    TAILSFW_TIME="1999-01-01T00:00:00", **common)
journal.send("\\x1b[2A\\x1b[Jnothing was refused {FORGED[1]}", MESSAGE_ID="{SUMMARY_MESSAGE_ID}",
    TAILSFW_KIND="summary", TAILSFW_SUPPRESSED="5", TAILSFW_REASON="overflow", **common)
journal.send("1 refused packets were not decoded {FORGED[1]}", MESSAGE_ID="{LOSS_MESSAGE_ID}",
    TAILSFW_KIND="lost", TAILSFW_LOST="1", **common)
"""


def forge_with_logger(dst: str) -> str:
    return "\n".join([
        f"MESSAGE=Dropped outbound packet: {dst}", f"MESSAGE_ID={DROP_MESSAGE_ID}",
        "SYSLOG_IDENTIFIER=tailsfwd", "TAILSFW_KIND=drop", "TAILSFW_REASON=Dropped outbound packet",
        "TAILSFW_FAMILY=ipv4", "TAILSFW_SRC=192.168.77.2", f"TAILSFW_DST={dst}",
        "TAILSFW_PROTO=UDP", "TAILSFW_USER=root", "TAILSFW_UID=0", "",
    ])  # fmt: skip


def test_forged_entries_are_ignored_and_counted(
    lab: Lab, journald: Journald, audit: AuditProcess
) -> None:
    """Issue 18: any user could write entries that `tailsfwctl drops` showed as
    genuine, and one field stopped the reader.  Only tailsfwd's own are shown."""
    since = local_time(time.time() - 1)
    assert lab.probe("amnesia", "udp", 4, INTERNET_V4[1], 42).result == "refused"  # genuine
    other = lab.setpriv("other")
    writes = [  # (argv, stdin): a user with the journal API and with logger; root's logger
        ([*other, PYTHON, "-c", FORGE_API], None),
        ([*other, "logger", "--journald"], forge_with_logger(FORGED[2])),
        (["logger", "--journald"], forge_with_logger(FORGED[3])),
    ]
    for argv, stdin in writes:
        done = subprocess.run(journald.wrap(argv), input=stdin, capture_output=True, text=True,
                              check=False, timeout=30)  # fmt: skip
        assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 5
    forged = lambda e: e.get("_UID") != "0" or e.get("_COMM") == "logger"  # noqa: E731
    while sum(map(forged, journald.entries(*(f"MESSAGE_ID={m}" for m in MESSAGE_IDS)))) < 5:
        assert time.monotonic() < deadline, "the forged entries did not land"
        time.sleep(0.05)
    wait_entries(journald, audit.process.pid,
                 lambda es: bool(matching(es, TAILSFW_DST=INTERNET_V4[1])))  # fmt: skip
    for args in ([], ["--json"], ["--user", "amnesia"], ["--json", "--user", "amnesia"]):
        done = drops(journald, "--since", since, *args)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        assert not [f for f in FORGED if f in done.stdout], done.stdout
        assert "\x1b" not in done.stdout and "1999" not in done.stdout
        if "--user" not in args:  # the lab's amnesia has another name
            assert INTERNET_V4[1] in done.stdout, done.stdout
        assert "ignored 5 entries with tailsfwd's MESSAGE_IDs not written by tailsfwd" in (
            done.stderr
        ), done.stderr


def test_a_user_who_cannot_read_the_journal_is_told_so(lab: Lab, journald: Journald) -> None:
    """Issue 18: without the systemd-journal group `tailsfwctl drops` printed
    nothing and exited 0.  The test's journald is the system journal here."""
    argv = [VENV_PYTHON, "-m", "tailsfw.cli", "drops"]

    def run(prefix: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(journald.wrap([*prefix, *argv], files=True), capture_output=True,
                              text=True, check=False, timeout=30, cwd=REPO)  # fmt: skip

    user = run(lab.setpriv("other"))
    assert user.returncode == 1 and user.stdout == "", (user.stdout, user.stderr)
    assert user.stderr.startswith("tailsfwctl: cannot read ") and user.stderr.count("\n") == 1
    assert "Permission denied" in user.stderr and "systemd-journal group" in user.stderr
    root = run([])
    assert root.returncode == 0 and "Dropped outbound packet" in root.stdout, root.stderr


FLOOD_ADDRESSES = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for host in range(50, 200):
    try:
        s.sendto(b"x", (f"198.51.100.{host}", 42))
    except OSError:
        pass
"""


def test_one_users_flood_of_addresses_hides_no_other_users_drops(
    lab: Lab, journald: Journald, audit: AuditProcess
) -> None:
    """Issue 18: one packet to each of 150 addresses filled the limiter's global
    budget, and root's and amnesia's next drops were only counted in a summary."""
    flood = subprocess.run(
        [*netns_exec(lab.host_ns), *lab.setpriv("other"), PYTHON, "-c", FLOOD_ADDRESSES],
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert flood.returncode == 0, flood.stderr
    assert lab.probe("amnesia", "udp", 4, INTERNET_V4[0], 42).result == "refused"
    assert lab.probe("root", "icmp", 4, INTERNET_V4[1]).result == "refused"
    other, amnesia = lab.account("other"), lab.account("amnesia")
    own = {"MESSAGE_ID": DROP_MESSAGE_ID, "TAILSFW_UID": str(amnesia.uid),
           "TAILSFW_DST": INTERNET_V4[0]}  # fmt: skip
    root = {"MESSAGE_ID": DROP_MESSAGE_ID, "TAILSFW_UID": "0", "TAILSFW_DST": INTERNET_V4[1]}
    both = lambda es: bool(matching(es, **own) and matching(es, **root))  # noqa: E731
    entries = wait_entries(journald, audit.process.pid, both)
    assert matching(entries, **own) and matching(entries, **root), entries
    audit.stop()  # every open summary is written
    entries = journald.entries(f"_PID={audit.process.pid}")
    flooded = matching(entries, MESSAGE_ID=DROP_MESSAGE_ID, TAILSFW_UID=str(other.uid))
    beyond = matching(entries, MESSAGE_ID=SUMMARY_MESSAGE_ID, TAILSFW_UID=str(other.uid),
                      TAILSFW_REASON="overflow")  # fmt: skip
    assert len(flooded) == Limits().share, len(flooded)
    assert [e["TAILSFW_SUPPRESSED"] for e in beyond] == [str(150 - Limits().share)], beyond
