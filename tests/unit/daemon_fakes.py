"""The daemon wired to fakes: a stateful fake kernel, sources fed by the test,
a fake /proc/sys, a notifier that records.  Shared by the daemon's unit tests."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from tailsfw import compiler
from tailsfw.coalesce import MAX_DELAY
from tailsfw.control import Control
from tailsfw.daemon import Daemon
from tailsfw.enforce import Lister
from tailsfw.events import Event, LinksChanged
from tailsfw.links import Address, Link, Snapshot
from tailsfw.notify import Notifier
from tailsfw.parts import Parts, Settings
from tailsfw.sysctl import Sysctl
from tests.unit.fakekernel import FakeKernel

DEFAULT = Path(__file__).parents[2] / "etc" / "tailsfw" / "policy.toml"
PROC_SYS_FILES = (
    "net/ipv4/tcp_mtu_probing",
    *(f"net/ipv6/conf/{i}/disable_ipv6" for i in ("all", "default", "lo", "eth0")),
)


def snapshot(*cidrs: str, names: tuple[str, ...] = ("lo", "eth0")) -> Snapshot:
    links = frozenset(Link(i + 1, n, True) for i, n in enumerate(names))
    addresses = frozenset(Address(2, c.split("/")[0], ipaddress.ip_interface(c)) for c in cidrs)
    return Snapshot(links, addresses)


def links(*cidrs: str, names: tuple[str, ...] = ("lo", "eth0")) -> LinksChanged:
    return LinksChanged(snapshot(*cidrs, names=names))


class FeedSource:
    """A source whose events the test puts in its queue."""

    def __init__(self, name: str, *events: Event) -> None:
        self.name = name
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        for e in events:
            self.queue.put_nowait(e)
        self.reads = 1

    async def events(self) -> AsyncIterator[Event]:
        while True:
            yield await self.queue.get()


class Recorder(Notifier):
    """sd_notify messages, and a log of what happened across the fakes."""

    def __init__(self, log: list[str]) -> None:
        super().__init__(address="")
        self.log = log
        self.messages: list[dict[str, str]] = []

    def __call__(self, **fields: str) -> None:
        self.messages.append(fields)
        self.log.append("+".join(k for k in fields if k != "STATUS") or "STATUS")


class LoggingKernel(FakeKernel):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def apply(self, document: dict[str, Any]) -> None:
        try:
            super().apply(document)
        except Exception:
            self.log.append("refused")
            raise
        self.log.append("apply")


@dataclass
class Rig:
    daemon: Daemon
    kernel: LoggingKernel
    netlink: FeedSource
    notify: Recorder
    log: list[str] = field(default_factory=list)

    @property
    def control(self) -> Control:
        return self.daemon.control

    @property
    def policy_path(self) -> Path:
        return self.daemon.settings.policy

    @property
    def proc_sys(self) -> Path:
        return self.daemon.parts.sysctl.root

    def compiled(self) -> compiler.Ruleset:
        """The daemon's policy compiled afresh with its facts of now."""
        assert self.control.policy is not None
        return compiler.compile_policy(self.control.policy, self.control.facts)

    async def feed(self, *events: Event, settle: float = 10 * MAX_DELAY) -> None:
        """Hands events to the running daemon (as netlink's), and lets the
        coalesced commit and any kernel check happen."""
        for event in events:
            self.netlink.queue.put_nowait(event)
        await asyncio.sleep(settle)


def write_policy(path: Path, **lan: Any) -> Path:
    with DEFAULT.open("rb") as f:
        data = tomllib.load(f)
    data["lan"].update(lan)
    path.write_text(tomli_w.dumps(data))
    return path


def make_proc_sys(root: Path) -> Path:
    for name in PROC_SYS_FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("0\n")
    return root


def lister(kernel: FakeKernel, delay: float = 0.0) -> Lister:
    """The fake kernel listed away from the loop, as an `nft` child would."""

    async def list_ruleset() -> list[dict[str, Any]]:
        await asyncio.sleep(delay)
        return kernel.list_ruleset()

    return list_ruleset


def rig(tmp_path: Path, *events: Event, **parts: Any) -> Rig:
    """A daemon with the shipped policy in "connected" mode, wired to fakes."""
    log: list[str] = []
    kernel = LoggingKernel(log)
    netlink = FeedSource("netlink", *events)
    notify = Recorder(log)
    settings = Settings(
        policy=write_policy(tmp_path / "policy.toml", mode="connected"),
        state_dir=tmp_path / "state",
    )
    parts.setdefault("list_ruleset", lister(kernel))
    daemon = Daemon(
        settings,
        Parts(
            nft=kernel,
            netlink=netlink,
            sysctl=Sysctl(make_proc_sys(tmp_path / "proc-sys")),
            notify=notify,
            **parts,
        ),
    )
    return Rig(daemon, kernel, netlink, notify, log)


def run(daemon: Daemon, *steps: tuple[float, Callable[[], None]]) -> int:
    """Runs the daemon's loop with steps at the given times; its exit code."""

    async def main() -> int:
        loop = asyncio.get_running_loop()
        for delay, step in steps:
            loop.call_later(delay, step)
        return await asyncio.wait_for(daemon.run(), 5)

    return asyncio.run(main())


def drive(r: Rig, scenario: Callable[[], Awaitable[None]] | None = None) -> int:
    """Runs the daemon until it is started, then `scenario`, then stops it;
    its exit code (and at once if the start failed)."""

    async def main() -> int:
        task = asyncio.create_task(r.daemon.run())
        while not r.control.started and not task.done():
            await asyncio.sleep(0.001)
        if scenario is not None and not task.done():
            await scenario()
        r.daemon.stop()
        return await asyncio.wait_for(task, 5)

    return asyncio.run(main())


def signal_self(sig: int) -> Callable[[], None]:
    return lambda: os.kill(os.getpid(), sig)
