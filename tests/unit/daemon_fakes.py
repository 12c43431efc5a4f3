"""The daemon wired to fakes: a stateful fake kernel, sources fed by the test,
a fake /proc/sys, a notifier that records.  Shared by the daemon's unit tests."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import tomllib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from tailsfw.daemon import Daemon, Options, Parts
from tailsfw.events import Event, LinksChanged
from tailsfw.links import Address, Link, Snapshot
from tailsfw.notify import Notifier
from tailsfw.policy import Policy
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
    uids: dict[str, int] = field(default_factory=dict)

    @property
    def policy_path(self) -> Path:
        return self.daemon.options.policy


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


def rig(tmp_path: Path, *events: Event, **parts: Any) -> Rig:
    """A daemon with the shipped policy in "connected" mode, wired to fakes."""
    log: list[str] = []
    kernel = LoggingKernel(log)
    netlink = FeedSource("netlink", *events)
    notify = Recorder(log)
    uids: dict[str, int] = {}

    def lookup(policy: Policy) -> Mapping[str, int]:
        return dict(uids)

    options = Options(
        policy=write_policy(tmp_path / "policy.toml", mode="connected"),
        state_dir=tmp_path / "state",
        proc_sys=make_proc_sys(tmp_path / "proc-sys"),
        serve_bus=False,
    )
    daemon = Daemon(
        options,
        Parts(
            nft=kernel,
            netlink=netlink,
            sysctl=Sysctl(options.proc_sys),
            notify=notify,
            lookup_uids=lookup,
            **parts,
        ),
    )
    return Rig(daemon, kernel, netlink, notify, log, uids)


def run(daemon: Daemon, *steps: tuple[float, Callable[[], None]]) -> int:
    """Runs the daemon's loop with steps at the given times; its exit code."""

    async def main() -> int:
        loop = asyncio.get_running_loop()
        for delay, step in steps:
            loop.call_later(delay, step)
        return await asyncio.wait_for(daemon.run(), 5)

    return asyncio.run(main())


def signal_self(sig: int) -> Callable[[], None]:
    return lambda: os.kill(os.getpid(), sig)
