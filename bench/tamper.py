"""Tamper detection: how soon a foreign change is noticed, and what it costs.

In a network namespace of its own (removed at the end), with the shipped
policy compiled for made-up uids:

- tamper_event_ms_p50/p99: another process (`nft`) tampers, in turn, in
  each of the issue's five ways (delete the ip table, flush the ruleset,
  insert an accept rule, flush the output chain, delete the ip6 table);
  from the kernel's notice of that commit (taken by a thread that does
  nothing else) to the monitor's event; after each, the ruleset is put
  back by the monitor's own thread (and must not be reported);
- tamper_restore_in_loop_ms_p50/p99: the same tamperings, with the whole
  ruleset committed again on the monitor's thread as each event comes: from
  the tampering commit to that commit (the floor of tailsfwd's
  `tamper_restore_ms`, without its own plumbing);
- decode_replacement_us / pyroute2_decode_replacement_us: decoding the
  notifications of one full replacement of our tables (what each of our
  own commits costs the monitor), by tailsfw's decoder and by pyroute2's
  nftables message classes (median of 50);
- verify_list_ms / verify_matches_ms: listing the ruleset through
  libnftables and comparing it with the compiled one (the status check);
- tamper_restore_ms_p50/p99: the real tailsfwd (its NftMonitor wired), the
  same tamperings ROUNDS times each: from the tampering commit to the
  daemon's restoring commit, both timed by a thread that does nothing else;
  the kernel holds the daemon's ruleset after each.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pyroute2.netlink.nfnetlink import nftsocket  # type: ignore[import-untyped]

from bench.apply import median_ms
from bench.daemon import POLICY, namespace, percentile, write_policy
from tailsfw import compiler, nftmonitor, policy, verify
from tailsfw.events import RulesetTouched
from tailsfw.facts import Facts
from tailsfw.nft import Nft
from tests.lab.daemon_process import run_daemon
from tests.lab.monitors import CommitClock, MonitorThread
from tests.lab.names import temp_prefix
from tests.lab.netns import in_netns

ROUNDS = 12
TAMPERINGS = (
    "delete table ip tailsfw",
    "flush ruleset",
    "insert rule ip tailsfw output accept",
    "flush chain ip tailsfw output",
    "delete table ip6 tailsfw",
)
REPEATS = 50
PYROUTE2_CLASSES = {
    0: nftsocket.nft_table_msg, 2: nftsocket.nft_table_msg,
    3: nftsocket.nft_chain_msg, 5: nftsocket.nft_chain_msg,
    6: nftsocket.nft_rule_msg, 8: nftsocket.nft_rule_msg,
    9: nftsocket.nft_set_msg, 11: nftsocket.nft_set_msg,
    12: nftsocket.nft_set_elem_list_msg, 14: nftsocket.nft_set_elem_list_msg,
    15: nftsocket.nft_gen_msg,
}  # fmt: skip


def ruleset() -> compiler.Ruleset:
    pol = policy.load(POLICY)
    uids = {user.account: 3000 + i for i, user in enumerate(pol.users)}
    return compiler.compile_policy(pol, Facts(uids=uids))


def tamper_times(ns: str, rules: compiler.Ruleset, restore_at_once: bool) -> list[float]:
    """Per tampering, in ms, from its commit to: the event; or, when
    `restore_at_once`, the commit of the ruleset re-applied on the event."""

    def restore(event: RulesetTouched, nft: Nft) -> None:
        if event.pid != 0:
            nft.apply(rules.document())

    times = []
    react = restore if restore_at_once else None
    with MonitorThread(ns, react=react) as monitor, CommitClock(ns) as clock:
        monitor.commit(rules.document())
        clock.next(2)
        for _ in range(ROUNDS):
            for command in TAMPERINGS:
                subprocess.run(["ip", "netns", "exec", ns, "nft", *command.split()], check=True)
                committed, seen = clock.next(2), monitor.next(2)
                if committed is None or seen is None or seen.event.pid == 0:
                    raise RuntimeError(f"{command}: no event ({seen})")
                if not restore_at_once:
                    times.append((seen.at - committed) * 1000)
                    monitor.commit(rules.document())  # as tailsfwd would; never reported
                restored = clock.next(2)
                if restored is None:
                    raise RuntimeError(f"{command}: not restored")
                if restore_at_once:
                    times.append((restored - committed) * 1000)
        if monitor.next(0.2) is not None:
            raise RuntimeError("our own commit was reported")
    if not in_netns(ns, lambda: verify.matches(Nft().list_ruleset(), rules)):
        raise RuntimeError("the ruleset was not restored")
    return times


def daemon_restore_times(ns: str) -> list[float]:
    """Per tampering, in ms, from its commit to tailsfwd's restoring commit."""
    times = []
    with tempfile.TemporaryDirectory(prefix=temp_prefix("bench-tamper")) as tmp:
        policy = write_policy(Path(tmp) / "policy.toml")
        with run_daemon(ns, policy, Path(tmp) / "run") as daemon, CommitClock(ns) as clock:
            daemon.wait_ready()
            for _ in range(ROUNDS):
                for command in TAMPERINGS:
                    clock.drain()
                    subprocess.run(["ip", "netns", "exec", ns, "nft", *command.split()], check=True)
                    tampered, restored = clock.next(2), clock.next(2)
                    if tampered is None or restored is None:
                        raise RuntimeError(f"{command}: not put back:\n{daemon.log()}")
                    times.append((restored - tampered) * 1000)
            status = daemon.wait_status(lambda s: s["counters"]["tamperings"] == len(times))
            if status["state"] != "enforcing" or status["kernel_differences"]:
                raise RuntimeError(f"after the tamperings: {status['state']}")
    return times


def replacement_datagrams(ns: str, rules: compiler.Ruleset) -> list[bytes]:
    """The notifications of one full replacement, as the monitor receives them."""

    def capture() -> list[bytes]:
        sock = nftmonitor.open_socket()
        try:
            Nft().apply(rules.document())
            datagrams = []
            while True:
                try:
                    datagrams.append(sock.recv(nftmonitor.RECV_SIZE))
                except BlockingIOError:
                    return datagrams
        finally:
            sock.close()

    return in_netns(ns, capture)


def decode_tailsfw(datagrams: list[bytes]) -> None:
    transactions = nftmonitor.Transactions("tailsfw", lambda pid: True)
    for data in datagrams:
        for notice in nftmonitor.decode(data):
            transactions.feed(notice)


def decode_pyroute2(datagrams: list[bytes]) -> None:
    for data in datagrams:
        offset = 0
        while offset < len(data):
            length = int.from_bytes(data[offset : offset + 4], sys.byteorder)
            kind = int.from_bytes(data[offset + 4 : offset + 6], sys.byteorder) & 0xFF
            message = PYROUTE2_CLASSES[kind](data[offset : offset + length])
            message.decode()
            offset += (length + 3) & ~3


def verify_costs(ns: str, rules: compiler.Ruleset) -> tuple[float, float]:
    def measure() -> tuple[float, float]:
        nft = Nft()
        nft.apply(rules.document())
        listing = nft.list_ruleset()
        if not verify.matches(listing, rules):
            raise RuntimeError(f"kernel differs: {verify.differences(listing, rules)}")
        return median_ms(nft.list_ruleset, REPEATS), median_ms(
            lambda: verify.matches(listing, rules), REPEATS
        )

    return in_netns(ns, measure)


def measure() -> dict[str, Any]:
    rules = ruleset()
    with namespace() as ns:
        delays = tamper_times(ns, rules, restore_at_once=False)
        restores = tamper_times(ns, rules, restore_at_once=True)
        dgrams = replacement_datagrams(ns, rules)
        list_ms, matches_ms = verify_costs(ns, rules)
        daemon_restores = daemon_restore_times(ns)
    return {
        "tamper_restore_ms_p50": round(statistics.median(daemon_restores), 2),
        "tamper_restore_ms_p99": round(percentile(daemon_restores, 99), 2),
        "tamper_restore_samples": len(daemon_restores),
        "tamper_event_ms_p50": round(statistics.median(delays), 2),
        "tamper_event_ms_p99": round(percentile(delays, 99), 2),
        "tamper_event_samples": len(delays),
        "tamper_restore_in_loop_ms_p50": round(statistics.median(restores), 2),
        "tamper_restore_in_loop_ms_p99": round(percentile(restores, 99), 2),
        "decode_replacement_us": round(1000 * median_ms(lambda: decode_tailsfw(dgrams), REPEATS)),
        "pyroute2_decode_replacement_us": round(
            1000 * median_ms(lambda: decode_pyroute2(dgrams), REPEATS)
        ),
        "replacement_notification_bytes": sum(len(d) for d in dgrams),
        "verify_list_ms": round(list_ms, 2),
        "verify_matches_ms": round(matches_ms, 2),
    }


if __name__ == "__main__":
    for key, value in sorted(measure().items()):
        print(f"{key:<40} {value}")
