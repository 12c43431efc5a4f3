"""The daemon's decisions, against a stateful fake kernel (tests/unit/fakekernel.py).

What the kernel holds after each step (the compiled ruleset, set elements,
the lockdown, or what was there before), what the daemon does when the kernel
or the policy says no, and in which order it tells systemd.  The real kernel
side is tests/lab/test_daemon.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tailsfw import compiler
from tailsfw.daemon import KERNEL_CHECK, MAX_DELAY, RETRY_DELAY, stderr_is_journal
from tailsfw.desired import desired
from tailsfw.events import AccountsChanged, DnsServers, Event, FileChanged, RulesetTouched
from tailsfw.notify import Notifier
from tailsfw.resolv import ResolvFiles
from tests.unit.daemon_fakes import Rig, links, rig, run, signal_self, write_policy

Net = ipaddress.IPv4Network


def lan(r: Rig) -> list[Any]:
    return r.kernel.elements("ip", "lan")


def compiled(r: Rig) -> compiler.Ruleset:
    """What the daemon's policy and facts compile to now."""
    assert r.daemon.policy is not None
    return desired(r.daemon.policy, r.daemon.facts).ruleset


def start(r: Rig) -> None:
    """The daemon's start, on the events already in the netlink feed."""

    async def main() -> None:
        while not r.netlink.queue.empty():
            r.daemon._events.put_nowait(r.netlink.queue.get_nowait())
        await r.daemon.start()

    asyncio.run(main())


def step(r: Rig, *events: Event) -> None:
    """Hands events to the started daemon, and lets the coalesced commit happen."""

    async def main() -> None:
        for event in events:
            r.daemon.handle(event)
        await asyncio.sleep(10 * MAX_DELAY)

    asyncio.run(main())


# -- what the kernel holds ----------------------------------------------------


def test_start_puts_the_compiled_ruleset_in_force(tmp_path: Path) -> None:
    r = rig(tmp_path, links("192.168.1.2/24"))
    start(r)
    assert r.kernel.holds(compiled(r).document())
    assert lan(r) == [{"prefix": {"addr": "192.168.1.0", "len": 24}}]
    assert r.daemon.status().last_apply_cause == "start"


def test_commits_only_what_changed(tmp_path: Path) -> None:
    r = rig(tmp_path, links("192.168.1.2/24"))
    start(r)
    step(r, links("192.168.1.2/24"))  # nothing changed: nothing committed
    assert len(r.kernel.documents) == 1
    step(r, links("192.168.1.2/24", "10.3.0.2/16"))
    update = r.kernel.documents[-1]
    assert [next(iter(c)) for c in update["nftables"][1:]] == ["flush", "add"]
    assert r.kernel.holds(compiled(r).document())
    assert len(lan(r)) == 2
    counters = r.daemon.status().counters
    assert (counters.commits, counters.set_updates, counters.replacements) == (2, 1, 1)


def test_a_refused_set_update_falls_back_to_replacing_the_tables(tmp_path: Path) -> None:
    r = rig(tmp_path, links("192.168.1.2/24"))
    start(r)
    r.kernel.refuse = lambda d: "no" if "flush" in d["nftables"][1] else None
    step(r, links("10.3.0.2/16"))
    assert [e for e in r.log if e in ("apply", "refused")] == ["apply", "refused", "apply"]
    assert r.kernel.holds(compiled(r).document())
    assert lan(r) == [{"prefix": {"addr": "10.3.0.0", "len": 16}}]


def test_a_refused_commit_leaves_the_ruleset_in_force(tmp_path: Path) -> None:
    r = rig(tmp_path, links("192.168.1.2/24"))
    start(r)
    before = r.kernel.dump()
    r.kernel.refuse = lambda d: "refused by the fake"
    step(r, links("10.3.0.2/16"))
    assert r.kernel.dump() == before
    status = r.daemon.status()
    assert status.counters.refused == 1 and "refused by the fake" in status.last_error


def test_tampering_is_undone_at_once(tmp_path: Path) -> None:
    r = rig(tmp_path, links("192.168.1.2/24"))
    start(r)
    r.kernel.tamper({"delete": {"table": {"family": "ip", "name": "tailsfw"}}})
    assert r.kernel.families() == {"ip6"}
    step(r, RulesetTouched(4242, "nft", "deleted table ip tailsfw"))
    assert r.kernel.holds(compiled(r).document())
    r.kernel.tamper(
        {"insert": {"rule": {"family": "ip", "table": "tailsfw", "chain": "output",
                             "expr": [{"accept": None}]}}},
    )  # fmt: skip
    step(r, RulesetTouched(4243, "nft", "added rule"))
    assert r.kernel.holds(compiled(r).document())
    assert r.daemon.status().counters.tamperings == 2


def test_the_status_says_what_the_kernel_holds(tmp_path: Path) -> None:
    r = rig(tmp_path, links("192.168.1.2/24"))
    start(r)
    assert r.daemon.status().state == "enforcing"
    assert r.daemon.status().kernel_differences == []
    r.kernel.tamper({"flush": {"chain": {"family": "ip", "table": "tailsfw", "name": "output"}}})
    time.sleep(KERNEL_CHECK)
    status = r.daemon.status()
    assert status.state == "tampered" and status.kernel_differences
    # Lost notifications: the kernel is checked, and put back since it differs...
    step(r, RulesetTouched(0, "", "notifications lost"))
    assert r.kernel.holds(compiled(r).document())
    commits = r.daemon.status().counters.commits
    # ... but not when it holds our ruleset.
    step(r, RulesetTouched(0, "", "notifications lost"))
    assert r.daemon.status().counters.commits == commits
    assert r.daemon.status().counters.unverified_notices == 2


def test_new_interfaces_get_ipv6_switched_off(tmp_path: Path) -> None:
    r = rig(tmp_path, links())
    proc_sys = r.daemon.options.proc_sys
    start(r)
    assert (proc_sys / "net/ipv6/conf/eth0/disable_ipv6").read_text() == "1\n"
    assert (proc_sys / "net/ipv6/conf/lo/disable_ipv6").read_text() == "0\n"
    new = proc_sys / "net/ipv6/conf/wlan0/disable_ipv6"
    new.parent.mkdir()
    new.write_text("0\n")
    step(r, links(names=("lo", "eth0", "wlan0")))
    assert new.read_text() == "1\n"
    assert len(r.kernel.documents) == 1  # no address changed: nothing committed


def test_dns_servers_are_facts_and_kept_while_networkmanager_is_gone(tmp_path: Path) -> None:
    r = rig(tmp_path, links("192.168.1.2/24"))
    start(r)
    servers = (ipaddress.IPv4Address("192.168.1.1"),)
    step(r, DnsServers(servers, refused=("'::1': not an IPv4 address",)))
    status = r.daemon.status()
    assert status.clearnet_dns == ["192.168.1.1"] and status.networkmanager == "available"
    assert status.dns_refused == ["'::1': not an IPv4 address"]
    step(r, DnsServers((), available=False))
    status = r.daemon.status()
    assert status.clearnet_dns == ["192.168.1.1"] and status.networkmanager == "absent"


def test_the_resolv_files_follow_networkmanager_and_are_restored(tmp_path: Path) -> None:
    resolv, clearnet = tmp_path / "resolv.conf", tmp_path / "resolv-over-clearnet.conf"
    resolv.write_text("nameserver 192.168.1.1\n")
    clearnet.write_text("nameserver 192.168.9.9\n")  # a previous run's: kept until NM speaks
    r = rig(tmp_path, links("192.168.1.2/24"), files=ResolvFiles(resolv, clearnet))
    start(r)
    assert resolv.read_text() == "nameserver 127.0.0.1\n"
    assert clearnet.read_text() == "nameserver 192.168.9.9\n"
    inode = clearnet.stat().st_ino
    servers = tuple(map(ipaddress.IPv4Address, ("192.168.1.1", "10.0.0.53")))
    step(r, DnsServers(servers))
    assert clearnet.read_text() == "nameserver 192.168.1.1\nnameserver 10.0.0.53\n"
    assert clearnet.stat().st_ino == inode  # in place: bind mounts see it
    step(r, DnsServers((), available=False))  # NetworkManager gone: the last list stays
    assert clearnet.read_text() == "nameserver 192.168.1.1\nnameserver 10.0.0.53\n"
    resolv.write_text("nameserver 8.8.8.8\n")
    step(r, FileChanged(resolv))
    assert resolv.read_text() == "nameserver 127.0.0.1\n"
    assert r.daemon.status().counters.files_rewritten == 3


def test_nm_mode_follows_the_servers_by_set_updates(tmp_path: Path) -> None:
    r = rig(tmp_path, links("192.168.1.2/24"))
    write_policy(r.policy_path, mode="connected")
    text = r.policy_path.read_text().replace('clearnet = "any"', 'clearnet = "nm"')
    assert 'clearnet = "nm"' in text
    r.policy_path.write_text(text)
    start(r)
    assert r.kernel.elements("ip", "clearnet_dns") == []  # none known: DNS refused
    step(r, DnsServers((ipaddress.IPv4Address("192.168.1.1"),)))
    assert r.kernel.elements("ip", "clearnet_dns") == ["192.168.1.1"]
    assert [next(iter(c)) for c in r.kernel.documents[-1]["nftables"][1:]] == ["flush", "add"]
    assert r.kernel.holds(compiled(r).document())


def test_accounts_changes_reach_the_ruleset(tmp_path: Path) -> None:
    r = rig(tmp_path, links("192.168.1.2/24"))
    start(r)
    assert "4321" not in json.dumps(r.kernel.dump())
    step(r, AccountsChanged({"clearnet": 4321}))
    assert r.kernel.holds(compiled(r).document())
    assert "4321" in json.dumps(r.kernel.dump())


# -- fail closed at start -----------------------------------------------------


def test_broken_policy_at_start_locks_down_and_never_says_ready(tmp_path: Path) -> None:
    r = rig(tmp_path, links("192.168.1.2/24"))
    r.policy_path.write_text("[log\n")
    assert run(r.daemon) == 1
    assert r.log == ["apply", "STATUS"]
    assert r.kernel.holds(compiler.lockdown().document())
    status = json.loads((tmp_path / "state" / "status.json").read_text())
    assert status["state"] == "lockdown" and "not valid TOML" in status["last_error"]


def test_a_tailsfw_ruleset_in_force_stays(tmp_path: Path) -> None:
    r = rig(tmp_path, links("192.168.1.2/24"))
    start(r)
    before = r.kernel.dump()
    r.policy_path.write_text("[log\n")
    assert run(r.daemon) == 1
    assert r.kernel.dump() == before
    assert r.daemon.status().state == "failed"


def test_half_a_ruleset_is_not_enough(tmp_path: Path) -> None:
    r = rig(tmp_path, links("192.168.1.2/24"))
    start(r)
    r.kernel.tamper({"delete": {"table": {"family": "ip6", "name": "tailsfw"}}})
    r.policy_path.write_text("[log\n")
    assert run(r.daemon) == 1
    assert r.kernel.holds(compiler.lockdown().document())


def test_no_netlink_state_at_start_fails_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tailsfw.daemon.FIRST_SNAPSHOT_TIMEOUT", 0.05)
    r = rig(tmp_path)  # netlink never speaks
    assert run(r.daemon) == 1
    assert r.kernel.holds(compiler.lockdown().document())
    assert "no link and address state" in r.daemon.status().last_error


def test_lockdown_is_loopback_only() -> None:
    rs = compiler.lockdown()
    chains = [o["chain"] for o in rs.objects if "chain" in o]
    assert {(c["family"], c["hook"], c["policy"]) for c in chains} == {
        (f, h, "drop") for f in ("ip", "ip6") for h in ("input", "forward", "output")
    }
    rules = [o["rule"] for o in rs.objects if "rule" in o]
    assert len(rules) == 4
    for rule in rules:
        (match, verdict) = rule["expr"]
        assert match["match"]["op"] == "=="
        assert match["match"]["right"] == "lo" and verdict == {"accept": None}


# -- the loop, with signals ---------------------------------------------------


def test_ready_after_the_ruleset_and_reloads(tmp_path: Path) -> None:
    r = rig(tmp_path, links("192.168.1.2/24"))
    good = r.policy_path.read_text()

    def break_policy() -> None:
        r.policy_path.write_text(good + "\n[tor]\nport = 1\n")

    def change_policy() -> None:
        write_policy(r.policy_path, mode="rfc1918")

    code = run(
        r.daemon,
        (0.05, break_policy),
        (0.06, signal_self(signal.SIGHUP)),
        (0.10, change_policy),
        (0.11, signal_self(signal.SIGHUP)),
        (0.20, signal_self(signal.SIGTERM)),
    )
    assert code == 0
    assert r.log == [
        "apply", "READY",                 # start: the ruleset, then READY
        "RELOADING+MONOTONIC_USEC", "READY",  # broken policy: nothing applied
        "RELOADING+MONOTONIC_USEC", "apply", "READY",  # changed policy: applied
    ]  # fmt: skip
    counters = r.daemon.status().counters
    assert counters.reloads_refused == 1 and counters.reloads == 2
    assert r.daemon.policy is not None and r.daemon.policy.lan.mode == "rfc1918"
    assert "lan" not in r.kernel.table("ip").sets  # rfc1918 mode has no set
    assert r.kernel.holds(compiled(r).document())
    # The READY after the refused reload says so.
    assert "reload refused" in r.notify.messages[2]["STATUS"]


def test_address_changes_are_coalesced(tmp_path: Path) -> None:
    r = rig(tmp_path, links("192.168.1.2/24"))

    def storm() -> None:
        for i in range(200):
            r.netlink.queue.put_nowait(links("192.168.1.2/24", f"10.{i % 2}.0.2/16"))

    code = run(r.daemon, (0.05, storm), (0.3, signal_self(signal.SIGTERM)))
    assert code == 0
    # 200 changes delivered at once: a single commit, of the final state.
    assert r.daemon.status().counters.commits == 2
    assert r.daemon.facts.connected == {Net("192.168.1.0/24"), Net("10.1.0.0/16")}
    assert sorted(e["prefix"]["addr"] for e in lan(r)) == ["10.1.0.0", "192.168.1.0"]


def test_a_source_that_ends_stops_the_daemon_but_not_the_rules(tmp_path: Path) -> None:
    r = rig(tmp_path, links("192.168.1.2/24"))

    class Ends:
        name = "ends"

        async def events(self):  # type: ignore[no-untyped-def]
            await asyncio.sleep(0.05)
            return
            yield

    r.daemon.parts.sources = [Ends()]
    assert run(r.daemon) == 1
    assert r.kernel.holds(compiled(r).document())


def test_notify_never_blocks_on_a_full_queue(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))  # and never read
        notify = Notifier(str(path))
        start = time.monotonic()
        for i in range(5000):
            notify(STATUS=f"message {i}")
        assert time.monotonic() - start < 1.0
        assert listener.recv(100) == b"STATUS=message 0"


@pytest.mark.parametrize(("pid_matches", "expected"), [(True, True), (False, False)])
def test_watchdog_pings_from_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pid_matches: bool, expected: bool
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000")  # a ping every 10 ms
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() if pid_matches else 1))
    r = rig(tmp_path, links("192.168.1.2/24"))
    assert run(r.daemon, (0.2, signal_self(signal.SIGTERM))) == 0
    pings = r.log.count("WATCHDOG")
    assert (pings >= 10) == expected, pings


def test_journal_only_when_stderr_is_the_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert stderr_is_journal()
    # Inherited from a parent whose stderr was the journal, but ours is not.
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
    assert not stderr_is_journal()
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not stderr_is_journal()


def test_files_that_cannot_be_made_right_are_retried_and_reported(tmp_path: Path) -> None:
    """Undoing what stopped the write (here a directory in the way; a lease,
    chattr -i) brings no event for the file: a timer must try again."""
    resolv, clearnet = tmp_path / "resolv.conf", tmp_path / "resolv-over-clearnet.conf"
    resolv.mkdir()
    r = rig(tmp_path, links("192.168.1.2/24"), files=ResolvFiles(resolv, clearnet))
    seen: list[list[str]] = []

    def look() -> None:
        seen.append(r.daemon.status().warnings)

    code = run(
        r.daemon,
        (0.2, look),
        (0.3, resolv.rmdir),
        (0.3 + 1.5 * RETRY_DELAY, look),
        (0.4 + 1.5 * RETRY_DELAY, signal_self(signal.SIGTERM)),
    )
    assert code == 0
    assert any("resolv files not right" in w and "resolv.conf" in w for w in seen[0]), seen
    assert resolv.read_text() == "nameserver 127.0.0.1\n"
    assert not any("resolv files" in w for w in seen[1]), seen


def test_the_published_status_follows_networkmanager_with_the_same_servers(
    tmp_path: Path,
) -> None:
    r = rig(tmp_path, links("192.168.1.2/24"))
    start(r)
    published = r.daemon.options.state_dir / "status.json"
    servers = (ipaddress.IPv4Address("192.168.1.1"),)

    def after(event: DnsServers) -> tuple[str, list[str]]:
        step(r, event)
        status = json.loads(published.read_text())
        return status["networkmanager"], status["dns_refused"]

    assert after(DnsServers(servers)) == ("available", [])
    assert after(DnsServers(servers, available=False)) == ("absent", [])
    assert after(DnsServers(servers)) == ("available", [])  # back, same servers
    refused = ("eth0: '::1': IPv6 (only IPv4 servers are used)",)
    assert after(DnsServers(servers, refused)) == ("available", list(refused))


def test_our_own_writes_are_never_reported_as_anothers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The watch sees our own writes too: only a file that differed is news."""
    resolv, clearnet = tmp_path / "resolv.conf", tmp_path / "resolv-over-clearnet.conf"
    r = rig(tmp_path, links("192.168.1.2/24"), files=ResolvFiles(resolv, clearnet))
    start(r)
    with caplog.at_level("INFO"):
        step(r, FileChanged(resolv))  # the event of our own write at start
        assert not [m for m in caplog.messages if "resolv.conf" in m]
        resolv.write_text("nameserver 8.8.8.8\n")
        step(r, FileChanged(resolv))
    assert caplog.messages[-1] == f"{resolv} was changed by another process: rewrote it"
