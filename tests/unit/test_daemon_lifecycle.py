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

from tailsfw import compiler, policy
from tailsfw.dropaudit import DropAudit
from tailsfw.events import AccountsChanged, DnsServers, FileChanged, RulesetTouched
from tailsfw.facts import Facts
from tailsfw.nflog import NflogSocket
from tailsfw.notify import Notifier
from tailsfw.resolv import ResolvFiles
from tailsfw.tailsfwd import Options, services, stderr_is_journal
from tests.unit.daemon_fakes import Rig, drive, links, rig, run, signal_self, write_policy

Net = ipaddress.IPv4Network

CHECK = 0.1  # the kernel asked this often for the status (enforce.KERNEL_CHECK)


def lan(r: Rig) -> list[Any]:
    return r.kernel.elements("ip", "lan")


def preload(r: Rig) -> None:
    """A previous run's ruleset in force in the fake kernel."""
    r.kernel.apply(compiler.compile_policy(policy.load(r.policy_path), Facts()).document())


# -- what the kernel holds ----------------------------------------------------


def test_start_puts_the_compiled_ruleset_in_force(tmp_path: Path) -> None:
    r = rig(tmp_path, links("192.168.1.2/24"))
    assert drive(r) == 0
    assert r.kernel.holds(r.compiled().document())
    assert lan(r) == [{"prefix": {"addr": "192.168.1.0", "len": 24}}]
    assert r.control.status().last_apply_cause == "start"


def test_commits_only_what_changed(tmp_path: Path) -> None:
    r = rig(tmp_path, links("192.168.1.2/24"))

    async def scenario() -> None:
        await r.feed(links("192.168.1.2/24"))  # nothing changed: nothing committed
        assert len(r.kernel.documents) == 1
        await r.feed(links("192.168.1.2/24", "10.3.0.2/16"))

    drive(r, scenario)
    update = r.kernel.documents[-1]
    assert [next(iter(c)) for c in update["nftables"][1:]] == ["flush", "add"]
    assert r.kernel.holds(r.compiled().document())
    assert len(lan(r)) == 2
    counters = r.control.status().counters
    assert (counters.commits, counters.set_updates, counters.replacements) == (2, 1, 1)


def test_a_refused_set_update_falls_back_to_replacing_the_tables(tmp_path: Path) -> None:
    r = rig(tmp_path, links("192.168.1.2/24"))

    async def scenario() -> None:
        r.kernel.refuse = lambda d: "no" if "flush" in d["nftables"][1] else None
        await r.feed(links("10.3.0.2/16"))

    drive(r, scenario)
    assert [e for e in r.log if e in ("apply", "refused")] == ["apply", "refused", "apply"]
    assert r.kernel.holds(r.compiled().document())
    assert lan(r) == [{"prefix": {"addr": "10.3.0.0", "len": 16}}]


def test_a_refused_commit_leaves_the_ruleset_in_force_and_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("tailsfw.daemon.RETRY_DELAY", 0.05)
    r = rig(tmp_path, links("192.168.1.2/24"))

    async def scenario() -> None:
        before = r.kernel.dump()
        r.kernel.refuse = lambda d: "refused by the fake"
        await r.feed(links("10.3.0.2/16"), settle=0.2)  # a few retries, all refused
        assert r.kernel.dump() == before
        status = r.control.status()
        assert status.counters.refused >= 2 and "refused by the fake" in status.last_error
        assert "refused by the fake" in status.failing["ruleset"]
        assert "failing: ruleset" in status.line()
        said = [r for r in caplog.records if "trying again" in r.getMessage()]
        assert len(said) == 1, said  # retried, but said once
        r.kernel.refuse = lambda d: None  # the kernel takes it again: the retry succeeds
        await asyncio.sleep(0.2)

    drive(r, scenario)
    assert r.kernel.holds(r.compiled().document())
    assert lan(r) == [{"prefix": {"addr": "10.3.0.0", "len": 16}}]
    status = r.control.status()
    assert status.failing == {} and status.last_error == ""


def test_a_file_that_cannot_be_written_is_retried_until_it_can(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tailsfw.daemon.RETRY_DELAY", 0.05)
    etc = tmp_path / "etc"
    resolv, clearnet = etc / "resolv.conf", etc / "resolv-over-clearnet.conf"
    r = rig(tmp_path, links("192.168.1.2/24"), files=ResolvFiles(resolv, clearnet))

    async def scenario() -> None:
        await asyncio.sleep(0.1)
        status = r.control.status()
        assert "No such file or directory" in status.failing["files"], status.failing
        assert status.state == "enforcing"  # the ruleset is in force all the same
        etc.mkdir()
        await asyncio.sleep(0.2)

    drive(r, scenario)
    assert resolv.read_text() == "nameserver 127.0.0.1\n"
    status = r.control.status()
    assert status.failing == {} and status.counters.files_refused >= 1


def test_tampering_is_undone_at_once(tmp_path: Path) -> None:
    r = rig(tmp_path, links("192.168.1.2/24"))

    async def scenario() -> None:
        r.kernel.tamper({"delete": {"table": {"family": "ip", "name": "tailsfw"}}})
        assert r.kernel.families() == {"ip6"}
        await r.feed(RulesetTouched(4242, "nft", "deleted table ip tailsfw"))
        assert r.kernel.holds(r.compiled().document())
        r.kernel.tamper(
            {"insert": {"rule": {"family": "ip", "table": "tailsfw", "chain": "output",
                                 "expr": [{"accept": None}]}}},
        )  # fmt: skip
        await r.feed(RulesetTouched(4243, "nft", "added rule"))
        assert r.kernel.holds(r.compiled().document())

    drive(r, scenario)
    assert r.control.status().counters.tamperings == 2


def test_the_status_says_what_the_kernel_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tailsfw.enforce.KERNEL_CHECK", CHECK)
    r = rig(tmp_path, links("192.168.1.2/24"))

    async def scenario() -> None:
        assert r.control.status().state == "enforcing"
        assert r.control.status().kernel_differences == []
        r.kernel.tamper(
            {"flush": {"chain": {"family": "ip", "table": "tailsfw", "name": "output"}}}
        )
        await asyncio.sleep(CHECK)
        r.control.status()  # stale: the kernel is asked, away from the loop
        await asyncio.sleep(0.05)
        status = r.control.status()
        assert status.state == "tampered" and status.kernel_differences
        # Lost notifications: the kernel is checked, and put back since it differs...
        await r.feed(RulesetTouched(0, "", "notifications lost"))
        assert r.kernel.holds(r.compiled().document())
        commits = r.control.status().counters.commits
        # ... but not when it holds our ruleset.
        await r.feed(RulesetTouched(0, "", "notifications lost"))
        assert r.control.status().counters.commits == commits
        assert r.control.status().counters.unverified_notices == 2

    drive(r, scenario)


def test_a_listing_overtaken_by_a_commit_is_asked_again(tmp_path: Path) -> None:
    """A lost-notifications check whose listing predates a commit says nothing
    of what is in force: it is asked again, not acted on."""
    r: Rig
    listings: list[float] = []

    async def slow_listing() -> list[dict[str, Any]]:
        listings.append(time.monotonic())
        await asyncio.sleep(0.05)
        return r.kernel.list_ruleset()

    r = rig(tmp_path, links("192.168.1.2/24"), list_ruleset=slow_listing)

    async def scenario() -> None:
        r.kernel.tamper({"delete": {"table": {"family": "ip6", "name": "tailsfw"}}})
        await r.feed(RulesetTouched(0, "", "notifications lost"), settle=0.01)
        await r.feed(links("192.168.1.2/24", "10.3.0.2/16"), settle=0.02)  # a set update
        assert len(lan(r)) == 2  # committed while the listing runs: the loop is free
        await asyncio.sleep(0.2)

    drive(r, scenario)
    assert len(listings) >= 2
    assert r.kernel.holds(r.compiled().document())
    assert r.control.status().counters.tamperings == 1


def test_a_listing_that_never_answers_is_given_up_and_the_tables_put_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tailsfw.enforce.LIST_TIMEOUT", 0.05)

    async def stuck() -> list[dict[str, Any]]:
        await asyncio.Future()
        return []

    r = rig(tmp_path, links("192.168.1.2/24"), list_ruleset=stuck)

    async def scenario() -> None:
        r.kernel.tamper({"delete": {"table": {"family": "ip", "name": "tailsfw"}}})
        await r.feed(RulesetTouched(0, "", "notifications lost"), settle=0.2)
        assert r.control.status().counters.tamperings == 1

    drive(r, scenario)
    assert r.kernel.holds(r.compiled().document())  # unknown is not trusted: put back


def test_new_interfaces_get_ipv6_switched_off(tmp_path: Path) -> None:
    r = rig(tmp_path, links())
    new = r.proc_sys / "net/ipv6/conf/wlan0/disable_ipv6"

    async def scenario() -> None:
        assert (r.proc_sys / "net/ipv6/conf/eth0/disable_ipv6").read_text() == "1\n"
        assert (r.proc_sys / "net/ipv6/conf/lo/disable_ipv6").read_text() == "0\n"
        new.parent.mkdir()
        new.write_text("0\n")
        await r.feed(links(names=("lo", "eth0", "wlan0")))
        assert new.read_text() == "1\n"

    drive(r, scenario)
    assert len(r.kernel.documents) == 1  # no address changed: nothing committed


def test_dns_servers_are_facts_and_kept_while_networkmanager_is_gone(tmp_path: Path) -> None:
    r = rig(tmp_path, links("192.168.1.2/24"))

    async def scenario() -> None:
        servers = (ipaddress.IPv4Address("192.168.1.1"),)
        await r.feed(DnsServers(servers, refused=("'::1': not an IPv4 address",)))
        status = r.control.status()
        assert status.clearnet_dns == ["192.168.1.1"] and status.networkmanager == "available"
        assert status.dns_refused == ["'::1': not an IPv4 address"]
        await r.feed(DnsServers((), available=False))
        status = r.control.status()
        assert status.clearnet_dns == ["192.168.1.1"] and status.networkmanager == "absent"

    drive(r, scenario)
    assert len(r.kernel.documents) == 1  # "any" mode: the ruleset does not read them


def test_the_resolv_files_follow_networkmanager_and_are_restored(tmp_path: Path) -> None:
    resolv, clearnet = tmp_path / "resolv.conf", tmp_path / "resolv-over-clearnet.conf"
    resolv.write_text("nameserver 192.168.1.1\n")
    clearnet.write_text("nameserver 192.168.9.9\n")  # a previous run's: kept until NM speaks
    r = rig(tmp_path, links("192.168.1.2/24"), files=ResolvFiles(resolv, clearnet))

    async def scenario() -> None:
        assert resolv.read_text() == "nameserver 127.0.0.1\n"
        assert clearnet.read_text() == "nameserver 192.168.9.9\n"
        inode = clearnet.stat().st_ino
        servers = tuple(map(ipaddress.IPv4Address, ("192.168.1.1", "10.0.0.53")))
        await r.feed(DnsServers(servers))
        assert clearnet.read_text() == "nameserver 192.168.1.1\nnameserver 10.0.0.53\n"
        assert clearnet.stat().st_ino == inode  # in place: bind mounts see it
        await r.feed(DnsServers((), available=False))  # NetworkManager gone: the list stays
        assert clearnet.read_text() == "nameserver 192.168.1.1\nnameserver 10.0.0.53\n"
        resolv.write_text("nameserver 8.8.8.8\n")
        await r.feed(FileChanged(resolv))
        assert resolv.read_text() == "nameserver 127.0.0.1\n"

    drive(r, scenario)
    assert r.control.status().counters.files_rewritten == 3


def test_nm_mode_follows_the_servers_by_set_updates(tmp_path: Path) -> None:
    r = rig(tmp_path, links("192.168.1.2/24"))
    text = r.policy_path.read_text().replace('clearnet = "any"', 'clearnet = "nm"')
    assert 'clearnet = "nm"' in text
    r.policy_path.write_text(text)

    async def scenario() -> None:
        assert r.kernel.elements("ip", "clearnet_dns") == []  # none known: DNS refused
        await r.feed(DnsServers((ipaddress.IPv4Address("192.168.1.1"),)))

    drive(r, scenario)
    assert r.kernel.elements("ip", "clearnet_dns") == ["192.168.1.1"]
    assert [next(iter(c)) for c in r.kernel.documents[-1]["nftables"][1:]] == ["flush", "add"]
    assert r.kernel.holds(r.compiled().document())


def test_the_account_database_reaches_the_ruleset_for_the_accounts_named(
    tmp_path: Path,
) -> None:
    r = rig(tmp_path, links("192.168.1.2/24"))

    async def scenario() -> None:
        assert "4321" not in json.dumps(r.kernel.dump())
        await r.feed(AccountsChanged({"root": 0, "clearnet": 4321}))
        assert "4321" in json.dumps(r.kernel.dump())
        counters = r.control.status().counters
        # An account the policy does not name: nothing to compile or commit.
        await r.feed(AccountsChanged({"root": 0, "clearnet": 4321, "someone": 1005}))
        assert r.control.status().counters == counters

    drive(r, scenario)
    assert r.kernel.holds(r.compiled().document())


def test_the_start_waits_for_the_account_database(tmp_path: Path) -> None:
    accounts = FeedSourceLate()
    r = rig(tmp_path, links("192.168.1.2/24"), accounts=accounts)
    assert drive(r) == 0
    assert len(r.kernel.documents) == 1  # one commit, with the uids
    assert "4321" in json.dumps(r.kernel.dump())


class FeedSourceLate:
    """An account database that answers after netlink."""

    name = "accounts"

    async def events(self):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.05)
        yield AccountsChanged({"clearnet": 4321})
        await asyncio.Future()


def test_the_drops_audit_follows_the_policys_group(tmp_path: Path) -> None:
    bound: list[int] = []

    def open_socket(group: int) -> NflogSocket:
        bound.append(group)
        raise OSError(f"group {group} is the fake's")

    def audit(group: int) -> DropAudit:
        return DropAudit(group, send=lambda **fields: None, open_socket=open_socket)

    r = rig(tmp_path, links("192.168.1.2/24"), audit=audit)

    async def scenario() -> None:
        await asyncio.sleep(0.01)
        r.policy_path.write_text(r.policy_path.read_text().replace("group = 0", "group = 7"))
        assert r.control.reload()
        await asyncio.sleep(0.01)
        assert "group 7" in r.control.status().drops.last_error

    drive(r, scenario)
    assert bound == [0, 7]


# -- Control, without a running loop -------------------------------------------


def test_control_reloads_and_reports_without_a_loop(tmp_path: Path) -> None:
    r = rig(tmp_path)
    c = r.control
    assert not c.reload() and c.reload_pending  # not started: taken after the start
    c.fold(links("192.168.1.2/24"))
    c.enforce(policy.load(r.policy_path), "test")
    c.started = True
    assert r.kernel.holds(r.compiled().document())
    write_policy(r.policy_path, mode="rfc1918")
    assert c.reload()
    assert c.status().lan_mode == "rfc1918" and r.kernel.holds(r.compiled().document())
    seen: list[str] = []
    c.subscribe(lambda status: seen.append(status.last_error))
    r.policy_path.write_text("[log\n")
    assert not c.reload()
    assert "not valid TOML" in seen[-1] and c.status().lan_mode == "rfc1918"
    assert r.notify.messages[-1]["READY"] == "1"
    written = json.loads((tmp_path / "state" / "status.json").read_text())
    assert "reload refused" in written["last_error"]


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
    preload(r)
    before = r.kernel.dump()
    r.policy_path.write_text("[log\n")
    assert run(r.daemon) == 1
    assert r.kernel.dump() == before
    assert r.control.status().state == "failed"


def test_half_a_ruleset_is_not_enough(tmp_path: Path) -> None:
    r = rig(tmp_path, links("192.168.1.2/24"))
    preload(r)
    r.kernel.tamper({"delete": {"table": {"family": "ip6", "name": "tailsfw"}}})
    r.policy_path.write_text("[log\n")
    assert run(r.daemon) == 1
    assert r.kernel.holds(compiler.lockdown().document())


def test_no_netlink_state_at_start_fails_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tailsfw.daemon.FIRST_STATE_TIMEOUT", 0.05)
    r = rig(tmp_path)  # netlink never speaks
    assert run(r.daemon) == 1
    assert r.kernel.holds(compiler.lockdown().document())
    assert "no link and address state" in r.control.status().last_error


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
    counters = r.control.status().counters
    assert counters.reloads_refused == 1 and counters.reloads == 2
    assert r.control.policy is not None and r.control.policy.lan.mode == "rfc1918"
    assert "lan" not in r.kernel.table("ip").sets  # rfc1918 mode has no set
    assert r.kernel.holds(r.compiled().document())
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
    assert r.control.status().counters.commits == 2
    assert r.control.facts.connected == {Net("192.168.1.0/24"), Net("10.1.0.0/16")}
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
    assert r.kernel.holds(r.compiled().document())


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

    async def main() -> int:
        asyncio.get_running_loop().call_later(0.2, signal_self(signal.SIGTERM))
        return await r.daemon.run(services(Options(serve_bus=False), r.notify))

    assert asyncio.run(main()) == 0
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


def test_the_published_status_follows_networkmanager_with_the_same_servers(
    tmp_path: Path,
) -> None:
    """Back with the same servers, or a value refused beside the same
    servers: the facts do not change, the published status must."""
    r = rig(tmp_path, links("192.168.1.2/24"))
    published = r.daemon.settings.status_file
    servers = (ipaddress.IPv4Address("192.168.1.1"),)
    refused = ("eth0: '::1': IPv6 (only IPv4 servers are used)",)
    seen: list[tuple[str, list[str]]] = []

    async def scenario() -> None:
        for event in (
            DnsServers(servers),
            DnsServers(servers, available=False),
            DnsServers(servers),  # back, same servers
            DnsServers(servers, refused),
        ):
            await r.feed(event, settle=0.25)  # beyond report.PUBLISH_INTERVAL
            status = json.loads(published.read_text())
            seen.append((status["networkmanager"], status["dns_refused"]))

    drive(r, scenario)
    assert seen == [
        ("available", []),
        ("absent", []),
        ("available", []),
        ("available", list(refused)),
    ]


def test_our_own_writes_are_never_reported_as_anothers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The watch sees our own writes too: only a file that differed is news."""
    resolv, clearnet = tmp_path / "resolv.conf", tmp_path / "resolv-over-clearnet.conf"
    r = rig(tmp_path, links("192.168.1.2/24"), files=ResolvFiles(resolv, clearnet))
    messages: list[list[str]] = []

    async def scenario() -> None:
        caplog.clear()
        await r.feed(FileChanged(resolv), settle=0.05)  # the event of our own write at start
        messages.append([m for m in caplog.messages if "resolv.conf" in m])
        resolv.write_text("nameserver 8.8.8.8\n")
        await r.feed(FileChanged(resolv), settle=0.05)
        messages.append([m for m in caplog.messages if "resolv.conf" in m])

    with caplog.at_level("INFO"):
        drive(r, scenario)
    assert messages == [[], [f"{resolv} was changed by another process: rewrote it"]]
