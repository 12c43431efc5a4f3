"""The daemon's decisions, with a fake nft, a fake netlink and a fake /proc/sys.

What it commits (nothing, set elements, everything), what it does when nft
or the policy fails, and in which order it tells systemd.  The real kernel
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
import tomllib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from tailsfw import compiler, users
from tailsfw.daemon import Daemon, Options, stderr_is_journal
from tailsfw.netlink import Address, Link, Snapshot
from tailsfw.nft import NftError
from tailsfw.notify import Notifier
from tailsfw.policy import load

DEFAULT = Path(__file__).parents[2] / "etc" / "tailsfw" / "policy.toml"
Doc = dict[str, Any]


def snapshot(*cidrs: str, names: tuple[str, ...] = ("lo", "eth0")) -> Snapshot:
    links = frozenset(Link(i + 1, n, True) for i, n in enumerate(names))
    addresses = frozenset(Address(2, c.split("/")[0], ipaddress.ip_interface(c)) for c in cidrs)
    return Snapshot(links, addresses)


class Events(list[str]):
    """What happened, in order, across the fakes."""


class FakeNft:
    def __init__(self, events: Events, refuse: Callable[[Doc], bool] = lambda d: False) -> None:
        self.events = events
        self.refuse = refuse
        self.documents: list[Doc] = []
        self.tables: set[str] = set()

    def apply(self, document: Doc) -> None:
        if self.refuse(document):
            self.events.append("refused")
            raise NftError("refused by the fake")
        self.documents.append(document)
        self.events.append("apply")
        for cmd in document["nftables"][1:]:
            if "table" in cmd.get("add", {}):
                self.tables.add(cmd["add"]["table"]["family"])

    def list_ruleset(self) -> list[dict[str, Any]]:
        return [{"table": {"family": f, "name": "tailsfw"}} for f in sorted(self.tables)]


class FakeSource:
    def __init__(self, *snapshots: Snapshot) -> None:
        self.queue: asyncio.Queue[Snapshot] = asyncio.Queue()
        for s in snapshots:
            self.queue.put_nowait(s)
        self.reads = 1
        self.last_error = ""

    async def snapshots(self) -> AsyncIterator[Snapshot]:
        while True:
            yield await self.queue.get()


class FakeNotifier(Notifier):
    def __init__(self, events: Events) -> None:
        super().__init__(address="")
        self.events = events
        self.messages: list[dict[str, str]] = []

    def __call__(self, **fields: str) -> None:
        self.messages.append(fields)
        self.events.append("+".join(k for k in fields if k != "STATUS") or "STATUS")


def write_policy(path: Path, **lan: Any) -> Path:
    with DEFAULT.open("rb") as f:
        data = tomllib.load(f)
    data["lan"].update(lan)
    path.write_text(tomli_w.dumps(data))
    return path


@pytest.fixture
def proc_sys(tmp_path: Path) -> Path:
    root = tmp_path / "proc-sys"
    for name in (
        "net/ipv4/tcp_mtu_probing",
        *(f"net/ipv6/conf/{i}/disable_ipv6" for i in ("all", "default", "lo", "eth0")),
    ):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("0\n")
    return root


def make(tmp_path: Path, proc_sys: Path, *snapshots: Snapshot, **kw: Any) -> tuple[Daemon, Events]:
    events = Events()
    options = Options(
        policy=write_policy(tmp_path / "policy.toml", mode="connected"),
        state_dir=tmp_path / "state",
        proc_sys=proc_sys,
    )
    daemon = Daemon(
        options,
        nft=FakeNft(events, **kw),
        source=FakeSource(*snapshots),
        notify=FakeNotifier(events),
    )
    return daemon, events


def commands(doc: Doc) -> list[str]:
    return [next(iter(c)) for c in doc["nftables"][1:]]


def fake(daemon: Daemon) -> FakeNft:
    assert isinstance(daemon.nft, FakeNft)
    return daemon.nft


# -- what is committed --------------------------------------------------------


def test_commits_only_what_changed(tmp_path: Path, proc_sys: Path) -> None:
    daemon, _ = make(tmp_path, proc_sys)
    pol = load(daemon.options.policy)
    uids = users.lookup_uids(pol)
    daemon.observe(snapshot("192.168.1.2/24"))
    assert daemon.enforce(pol, uids) == "replaced"
    full = fake(daemon).documents[-1]
    assert commands(full)[:2] == ["add", "delete"]  # the atomic table swap

    assert daemon.enforce(pol, uids) == "unchanged"
    assert len(fake(daemon).documents) == 1  # nothing committed

    daemon.observe(snapshot("192.168.1.2/24", "10.3.0.2/16"))
    assert daemon.enforce(pol, uids) == "sets"
    update = fake(daemon).documents[-1]
    assert commands(update) == ["flush", "add"]
    assert update["nftables"][2]["add"]["element"]["name"] == "lan"
    assert daemon.counters.commits == 2 and daemon.counters.set_updates == 1


def test_a_refused_set_update_falls_back_to_replacing_the_tables(
    tmp_path: Path, proc_sys: Path
) -> None:
    daemon, events = make(tmp_path, proc_sys, refuse=lambda d: commands(d)[0] == "flush")
    pol = load(daemon.options.policy)
    daemon.observe(snapshot("192.168.1.2/24"))
    daemon.enforce(pol, {})
    daemon.observe(snapshot("10.3.0.2/16"))
    assert daemon.enforce(pol, {}) == "replaced"
    assert events == ["apply", "refused", "apply"]


def test_a_refused_commit_leaves_the_ruleset_in_force(tmp_path: Path, proc_sys: Path) -> None:
    daemon, _ = make(tmp_path, proc_sys)
    pol = load(daemon.options.policy)
    daemon.observe(snapshot("192.168.1.2/24"))
    daemon.enforce(pol, {})
    before = daemon.in_force
    fake(daemon).refuse = lambda d: True
    daemon.observe(snapshot("10.3.0.2/16"))
    with pytest.raises(NftError):
        daemon.enforce(pol, {})
    assert daemon.in_force is before
    # The next attempt still knows what is really in force: it diffs against it.
    fake(daemon).refuse = lambda d: False
    assert daemon.enforce(pol, {}) == "sets"


def test_new_interfaces_get_ipv6_switched_off(tmp_path: Path, proc_sys: Path) -> None:
    daemon, _ = make(tmp_path, proc_sys)
    daemon.observe(snapshot(names=("lo", "eth0")))
    assert (proc_sys / "net/ipv6/conf/eth0/disable_ipv6").read_text() == "1\n"
    assert (proc_sys / "net/ipv6/conf/lo/disable_ipv6").read_text() == "0\n"
    new = proc_sys / "net/ipv6/conf/wlan0/disable_ipv6"
    new.parent.mkdir()
    new.write_text("0\n")
    changed = daemon.observe(snapshot(names=("lo", "eth0", "wlan0")))
    assert new.read_text() == "1\n"
    assert not changed  # no address changed: nothing to recompile


# -- fail closed at start -----------------------------------------------------


def test_lockdown_when_nothing_is_in_force(tmp_path: Path, proc_sys: Path) -> None:
    daemon, _ = make(tmp_path, proc_sys)
    assert daemon.fail_closed(ValueError("broken")) == 1
    assert fake(daemon).documents == [compiler.lockdown().document()]
    assert daemon.state == "lockdown"
    status = json.loads((tmp_path / "state" / "status.json").read_text())
    assert status["state"] == "lockdown"


def test_a_tailsfw_ruleset_in_force_stays(tmp_path: Path, proc_sys: Path) -> None:
    daemon, _ = make(tmp_path, proc_sys)
    fake(daemon).tables = {"ip", "ip6"}
    assert daemon.fail_closed(ValueError("broken")) == 1
    assert fake(daemon).documents == []
    assert daemon.state == "failed"


def test_half_a_ruleset_is_not_enough(tmp_path: Path, proc_sys: Path) -> None:
    daemon, _ = make(tmp_path, proc_sys)
    fake(daemon).tables = {"ip"}
    daemon.fail_closed(ValueError("broken"))
    assert fake(daemon).documents == [compiler.lockdown().document()]


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
        assert match["match"]["right"] == "lo" and verdict == {"accept": None}


# -- the loop, with signals ---------------------------------------------------


def run_daemon(daemon: Daemon, *steps: tuple[float, Callable[[], None]]) -> int:
    async def main() -> int:
        loop = asyncio.get_running_loop()
        for delay, step in steps:
            loop.call_later(delay, step)
        return await asyncio.wait_for(daemon.run(), 5)

    return asyncio.run(main())


def kill(sig: int) -> Callable[[], None]:
    return lambda: os.kill(os.getpid(), sig)


def test_broken_policy_at_start_locks_down_and_never_says_ready(
    tmp_path: Path, proc_sys: Path
) -> None:
    daemon, events = make(tmp_path, proc_sys, snapshot("192.168.1.2/24"))
    daemon.options.policy.write_text("[log\n")
    assert run_daemon(daemon) == 1
    assert events == ["apply", "STATUS"]
    assert fake(daemon).documents == [compiler.lockdown().document()]
    assert "not valid TOML" in daemon.last_error


def test_ready_after_the_ruleset_and_reloads(tmp_path: Path, proc_sys: Path) -> None:
    daemon, events = make(tmp_path, proc_sys, snapshot("192.168.1.2/24"))
    policy = daemon.options.policy
    good = policy.read_text()

    def break_policy() -> None:
        policy.write_text(good + "\n[tor]\nport = 1\n")

    def change_policy() -> None:
        write_policy(policy, mode="rfc1918")

    code = run_daemon(
        daemon,
        (0.05, break_policy),
        (0.06, kill(signal.SIGHUP)),
        (0.10, change_policy),
        (0.11, kill(signal.SIGHUP)),
        (0.20, kill(signal.SIGTERM)),
    )
    assert code == 0
    assert events == [
        "apply", "READY",                 # start: the ruleset, then READY
        "RELOADING+MONOTONIC_USEC", "READY",  # broken policy: nothing applied
        "RELOADING+MONOTONIC_USEC", "apply", "READY",  # changed policy: applied
    ]  # fmt: skip
    assert daemon.counters.reloads_refused == 1 and daemon.counters.reloads == 2
    assert daemon.policy is not None and daemon.policy.lan.mode == "rfc1918"
    # The READY after the refused reload says so; SIGTERM applied nothing.
    assert isinstance(daemon.notify, FakeNotifier)
    assert "reload refused" in daemon.notify.messages[2]["STATUS"]
    assert events[-1] == "READY"


def test_address_changes_are_coalesced(tmp_path: Path, proc_sys: Path) -> None:
    daemon, _ = make(tmp_path, proc_sys, snapshot("192.168.1.2/24"))
    assert isinstance(daemon.source, FakeSource)
    queue = daemon.source.queue

    def storm() -> None:
        for i in range(200):
            queue.put_nowait(snapshot("192.168.1.2/24", f"10.{i % 2}.0.2/16"))

    code = run_daemon(daemon, (0.05, storm), (0.3, kill(signal.SIGTERM)))
    assert code == 0
    # 200 changes delivered at once: a single commit, of the final state.
    assert daemon.counters.commits == 2, daemon.counters
    assert daemon.snapshot.connected == {
        ipaddress.IPv4Network("192.168.1.0/24"),
        ipaddress.IPv4Network("10.1.0.0/16"),
    }


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
    tmp_path: Path,
    proc_sys: Path,
    monkeypatch: pytest.MonkeyPatch,
    pid_matches: bool,
    expected: bool,
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000")  # a ping every 10 ms
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() if pid_matches else 1))
    daemon, events = make(tmp_path, proc_sys, snapshot("192.168.1.2/24"))
    assert run_daemon(daemon, (0.2, kill(signal.SIGTERM))) == 0
    pings = events.count("WATCHDOG")
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
