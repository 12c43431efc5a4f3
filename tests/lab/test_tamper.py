"""Tampering with the tailsfw tables, on the real kernel (issue 8).

- The nftables monitor, run in the lab host namespace by a thread of this
  process, sees each tampering by another program with that program's pid
  and name and what it did, and ignores this process's own commits; the
  delay from the tampering commit to the event is measured.
- `tailsfwctl verify` passes on the ruleset `tailsfwctl apply` loaded (both
  LAN modes; "connected" has set elements) and names a rule added, removed
  and changed by another `nft`.
"""

from __future__ import annotations

import json
import statistics
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tailsfw import compiler, netlink, policy, users, verify
from tailsfw.events import RulesetTouched
from tailsfw.facts import Facts
from tailsfw.nft import Nft
from tests.lab import policies
from tests.lab.command import command_env, netns_exec, ns_run, tailsfwctl_in
from tests.lab.daemon_process import run_daemon
from tests.lab.kernel import lan_networks, tailsfw_tables
from tests.lab.monitors import CommitClock, MonitorThread
from tests.lab.netns import in_netns
from tests.lab.topology import INTERNET_V4, Lab

EVENT_LIMIT = 0.050  # s, p99 from the tampering commit to the event
RESTORE_LIMIT = 0.100  # s, a bound for the test; bench/tamper.py measures the p99
REPEATS = 4


def remove_tables(lab: Lab) -> None:
    for family in sorted(tailsfw_tables(lab.host_ns)):
        lab.host(["nft", "delete", "table", family, "tailsfw"])


@pytest.fixture(scope="module", autouse=True)
def tables_removed(lab: Lab) -> Iterator[None]:
    """The other lab tests expect a host without tailsfw tables."""
    try:
        yield
    finally:
        remove_tables(lab)


def write_policy(lab: Lab, path: Path, mode: str = "rfc1918") -> Path:
    def edit(data: dict[str, Any]) -> None:
        data["lan"]["mode"] = mode

    return policies.lab_policy(lab, path, edit)


def compiled(lab: Lab, path: Path) -> compiler.Ruleset:
    """The policy compiled with the lab host's facts, as tailsfwd would."""
    pol = policy.load(path)
    connected = in_netns(lab.host_ns, netlink.read_snapshot).connected
    return compiler.compile_policy(pol, Facts(uids=users.lookup_uids(pol), connected=connected))


@pytest.fixture(scope="module")
def ruleset(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> compiler.Ruleset:
    return compiled(lab, write_policy(lab, tmp_path_factory.mktemp("tamper") / "policy.toml"))


@pytest.fixture
def monitor(lab: Lab, ruleset: compiler.Ruleset) -> Iterator[MonitorThread]:
    with MonitorThread(lab.host_ns) as started:
        started.commit(ruleset.document())
        yield started


@pytest.fixture
def clock(lab: Lab) -> Iterator[CommitClock]:
    with CommitClock(lab.host_ns) as started:
        yield started


def nft(lab: Lab, *argv: str) -> int:
    """`nft` run by another process in the lab host; its pid."""
    process = subprocess.Popen([*netns_exec(lab.host_ns), "nft", *argv], env=command_env())
    assert process.wait(30) == 0, argv
    return process.pid  # `ip netns exec` execs nft: the same process


def output_rules(ruleset: compiler.Ruleset) -> int:
    return sum(
        1 for o in ruleset.objects
        if "rule" in o and o["rule"]["family"] == "ip" and o["rule"]["chain"] == "output"
    )  # fmt: skip


def tamperings(ruleset: compiler.Ruleset) -> list[tuple[str, str]]:
    """The issue's tamperings: an nft command line, what the event must say."""
    return [
        ("delete table ip tailsfw", "deleted table ip tailsfw"),
        ("flush ruleset", "deleted table ip tailsfw; deleted table ip6 tailsfw"),
        ("insert rule ip tailsfw output accept", "added rule to ip tailsfw output"),
        (
            "flush chain ip tailsfw output",
            f"flushed chain ip tailsfw output ({output_rules(ruleset)} rules)",
        ),
        ("delete table ip6 tailsfw", "deleted table ip6 tailsfw"),
        # Not in the issue, as wide open: no base chain of a dormant table runs.
        ("add table ip tailsfw { flags dormant ; }", "added table ip tailsfw (dormant)"),
    ]


# -- the monitor -------------------------------------------------------------


def test_each_tampering_is_seen_with_its_process_and_timed(
    lab: Lab, monitor: MonitorThread, clock: CommitClock, ruleset: compiler.Ruleset
) -> None:
    delays = []
    for _ in range(REPEATS):
        for command, what in tamperings(ruleset):
            pid = nft(lab, *command.split())
            committed = clock.next(2)
            seen = monitor.next(2)
            assert seen is not None and committed is not None, command
            assert seen.event == RulesetTouched(pid, "nft", what)
            delays.append(seen.at - committed)
            # Put it back, as tailsfwd would: our own commit, no event.
            monitor.commit(ruleset.document())
            assert clock.next(2) is not None
    assert monitor.next(0.2) is None
    delays.sort()
    p50, p99 = statistics.median(delays), delays[int(0.99 * (len(delays) - 1))]
    print(f"tamper event: p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms over {len(delays)}")
    assert p99 < EVENT_LIMIT


def test_own_commits_are_ignored_and_the_next_foreign_one_seen(
    lab: Lab, monitor: MonitorThread, ruleset: compiler.Ruleset
) -> None:
    for _ in range(5):
        monitor.commit(ruleset.document())
    pid = nft(lab, "insert", "rule", "ip", "tailsfw", "output", "accept")
    seen = monitor.next(2)
    assert seen is not None
    assert seen.event == RulesetTouched(pid, "nft", "added rule to ip tailsfw output")


def test_other_tables_are_not_tampering(lab: Lab, monitor: MonitorThread) -> None:
    nft(lab, "add", "table", "ip", "tfwtamper_other")
    nft(lab, "add", "chain", "ip", "tfwtamper_other", "c")
    nft(lab, "delete", "table", "ip", "tfwtamper_other")
    assert monitor.next(0.3) is None


def test_lost_notifications_ask_for_a_check(
    lab: Lab, ruleset: compiler.Ruleset, tmp_path: Path
) -> None:
    document = tmp_path / "ruleset.json"
    document.write_text(ruleset.to_json())
    # A receive buffer far too small for a whole replacement's notifications,
    # and a loop too busy to read them as they come.
    with MonitorThread(lab.host_ns, rcvbuf=1024) as small:
        small.stall(0.5)
        nft(lab, "-j", "-f", str(document))
        seen = [small.next(2)]
        while (more := small.next(0.2)) is not None:
            seen.append(more)
    events = [s.event for s in seen if s is not None]
    assert RulesetTouched(0, "", "notifications lost") in events, events


# -- tailsfwd ----------------------------------------------------------------


@pytest.mark.usefixtures("daemon_host")
def test_the_daemon_puts_back_each_tampering(
    lab: Lab, tmp_path: Path, ruleset: compiler.Ruleset
) -> None:
    path = write_policy(lab, tmp_path / "policy.toml")
    times = []
    with run_daemon(lab.host_ns, path, tmp_path / "d") as daemon, CommitClock(lab.host_ns) as clock:
        daemon.wait_ready()
        for command, what in tamperings(ruleset):
            clock.drain()
            pid = nft(lab, *command.split())
            tampered, restored = clock.next(2), clock.next(2)
            assert tampered is not None and restored is not None, f"{command}: not put back"
            times.append(restored - tampered)
            # Sent after the restore: nothing gets out.
            probe = lab.probe("amnesia", "tcp", 4, INTERNET_V4[0], 443)
            assert (probe.result, probe.arrived) == ("refused", 0), (command, probe)
            assert f"(pid {pid}, nft): {what}; putting it back" in daemon.log()
        # At least one each: a check after lost notifications (pid 0) that
        # finds one of them undone yet counts too (seen once under load).
        status = daemon.wait_status(lambda s: s["counters"]["tamperings"] >= len(times))
        assert status["state"] == "enforcing"
    done = tailsfwctl(lab, "verify", "--policy", str(path))
    assert (done.returncode, done.stdout) == (0, ""), done
    print(f"restore: max {max(times) * 1000:.1f} ms over {len(times)}")
    assert max(times) < RESTORE_LIMIT


# -- verify ------------------------------------------------------------------


def tailsfwctl(lab: Lab, *argv: str) -> subprocess.CompletedProcess[str]:
    """This tree's tailsfwctl, in the lab host (never raises on exit codes)."""
    return tailsfwctl_in(lab.host_ns, *argv)


def handle_of(lab: Lab, chain: str, index: int) -> int:
    listing = json.loads(ns_run(lab.host_ns, ["nft", "-j", "-a", "list", "chain", "ip",
                                              "tailsfw", chain]).stdout)  # fmt: skip
    rules = [o["rule"] for o in listing["nftables"] if "rule" in o]
    return int(rules[index]["handle"])


@pytest.mark.parametrize("mode", ["rfc1918", "connected"])
def test_verify_passes_on_the_applied_ruleset(lab: Lab, tmp_path: Path, mode: str) -> None:
    path = write_policy(lab, tmp_path / "policy.toml", mode)
    remove_tables(lab)
    done = tailsfwctl(lab, "verify", "--policy", str(path))
    assert done.returncode == 1, done
    assert done.stdout.splitlines() == [
        "table ip tailsfw: missing from the kernel",
        "table ip6 tailsfw: missing from the kernel",
    ]
    # Loaded as tailsfwd loads it (`tailsfwctl apply` knows no on-link networks).
    ruleset = compiled(lab, path)
    in_netns(lab.host_ns, lambda: Nft().apply(ruleset.document()))
    if mode == "connected":
        assert lan_networks(lab.host_ns)  # set elements, listed back
    done = tailsfwctl(lab, "verify", "--policy", str(path))
    assert (done.returncode, done.stdout) == (0, ""), done
    assert "the kernel holds the policy: 0 differences" in done.stderr
    # The same, in this process, as the daemon's status would do it.
    listing = json.loads(ns_run(lab.host_ns, ["nft", "-j", "list", "ruleset"]).stdout)
    assert verify.matches(listing["nftables"], ruleset)


def test_verify_names_a_rule_added_removed_and_changed(lab: Lab, tmp_path: Path) -> None:
    path = write_policy(lab, tmp_path / "policy.toml")
    assert tailsfwctl(lab, "apply", "--policy", str(path)).returncode == 0
    nft(lab, "add", "rule", "ip", "tailsfw", "output", "tcp", "dport", "443", "accept")
    nft(lab, "delete", "rule", "ip", "tailsfw", "input", "handle", str(handle_of(lab, "input", 1)))
    nft(lab, "replace", "rule", "ip", "tailsfw", "lan", "handle", str(handle_of(lab, "lan", 0)),
        "tcp", "dport", "54", "jump", "lan_refused")  # fmt: skip
    done = tailsfwctl(lab, "verify", "--policy", str(path))
    assert done.returncode == 1, done
    assert sorted(done.stdout.splitlines()) == [
        "chain ip tailsfw input: rule `meta iif lo accept` (rule 2 of the policy) is missing "
        "from the kernel",
        "chain ip tailsfw lan: rule 1 is `tcp dport 54 jump lan_refused`, the policy wants "
        "`tcp dport 53 jump lan_refused`",
        f"chain ip tailsfw output: rule {output_rules(compiled(lab, path)) + 1} "
        "`tcp dport 443 accept` is not in the policy",
    ]
    assert "3 differences" in done.stderr


def test_verify_names_a_dormant_table(lab: Lab, tmp_path: Path) -> None:
    path = write_policy(lab, tmp_path / "policy.toml")
    in_netns(lab.host_ns, lambda: Nft().apply(compiled(lab, path).document()))
    nft(lab, "add", "table", "ip", "tailsfw", "{ flags dormant ; }")
    done = tailsfwctl(lab, "verify", "--policy", str(path))
    assert done.returncode == 1, done
    assert done.stdout.splitlines() == [
        "table ip tailsfw: has flags, the policy sets none (a dormant table filters nothing)"
    ]
