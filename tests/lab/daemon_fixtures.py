"""Running tailsfwd inside a network namespace, and watching what it does.

Shared by tests/lab/test_daemon.py and bench/daemon.py:

- `NotifySocket`: the socket systemd would listen on (NOTIFY_SOCKET);
- `DaemonProcess` / `run_daemon`: tailsfwd in a namespace, with its state
  directory and stderr in a work directory;
- `NftGenerations`: the kernel's notice of every committed nftables
  transaction in a namespace, to time the daemon's reactions; `CommitClock`
  timestamps them from a thread of their own;
- `MonitorThread`: tailsfw's nftables monitor inside a namespace;
- `lan_networks`, `tailsfw_tables`: the ruleset as the kernel holds it;
- `reset_host`: undo, after the tests, what the daemon did to the lab host;
  `lab_host_put_back`: the same for the Lab's host namespace.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import ipaddress
import json
import os
import queue
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tailsfw.events import RulesetTouched
from tailsfw.nft import Nft
from tailsfw.nftmonitor import NftMonitor
from tests.lab.topology import HOST_IF, HOST_V6, PEER_LAN_V6

if TYPE_CHECKING:
    from tests.lab.topology import Lab

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
VENV_PYTHON = str(REPO / ".venv" / "bin" / "python")
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNLGRP_NFTABLES = 7
# (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN: the end of every transaction.
NFT_NEWGEN = (10 << 8) | 15
# What tailsfwd changes in the lab's host: the settings, its own and eth0's.
LAB_HOST_SYSCTLS = (
    "net.ipv4.tcp_mtu_probing",
    *(f"net.ipv6.conf.{i}.disable_ipv6" for i in ("all", "default", "lo", HOST_IF)),
)


def wait_for(check: Callable[[], bool], timeout: float = 2.0, poll: float = 0.002) -> float:
    """Seconds until `check` held; AssertionError after `timeout`."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(poll)
    return time.monotonic() - start


def ns_run(namespace: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """A command in a namespace, as root; raises on failure with its stderr."""
    done = subprocess.run(
        ["ip", "netns", "exec", namespace, *argv],
        capture_output=True, text=True, timeout=60, check=False, **kwargs,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{namespace}: {' '.join(argv)}: {done.stderr.strip()}")
    return done


def netns_socket(namespace: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket that belongs to a named network namespace.

    setns() moves only the calling thread, so a short-lived thread enters
    the namespace and makes the socket; the socket stays in that namespace
    whichever thread uses it later.
    """
    return in_netns(namespace, lambda: socket.socket(family, kind, proto))


def enter_netns(namespace: str) -> None:
    """Moves the calling thread (only) into a named network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_DIR / namespace, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {namespace}: {os.strerror(err)}")
    finally:
        os.close(fd)


def in_netns(namespace: str, work: Callable[[], T]) -> T:
    """`work()` run by a short-lived thread of this process inside a namespace."""
    done: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            enter_netns(namespace)
            done.append(work())
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return done[0]


class NftGenerations:
    """Receives a timestamp for each nftables transaction committed in a namespace."""

    def __init__(self, namespace: str) -> None:
        self.sock = netns_socket(namespace, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> NftGenerations:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def drain(self) -> int:
        """Forget what came so far; returns how many transactions that was."""
        count = 0
        self.sock.setblocking(False)
        try:
            while True:
                count += self._count(self.sock.recv(1 << 16))
        except BlockingIOError:
            return count
        finally:
            self.sock.setblocking(True)

    def wait(self, timeout: float) -> float | None:
        """The monotonic time at which the next transaction was seen, or None."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                return None
            if self._count(data):
                return time.monotonic()

    @staticmethod
    def _count(data: bytes) -> int:
        count, offset = 0, 0
        while offset + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, offset)
            count += kind == NFT_NEWGEN
            offset += max((length + 3) & ~3, 16)
        return count


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET.

    A thread reads it all the time, as systemd does: a queue left full would
    make the daemon drop its STATUS messages.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[dict[str, str]] = []
        self._changed = threading.Condition()
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                return
            message = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._changed:
                self.messages.append(message)
                self._changed.notify_all()

    def close(self) -> None:
        self._closed = True
        self._reader.join()
        self.sock.close()
        self.path.unlink(missing_ok=True)

    def mark(self) -> int:
        """A position: `wait(..., since=mark)` looks only at later messages."""
        with self._changed:
            return len(self.messages)

    def wait(
        self, predicate: Callable[[dict[str, str]], bool], timeout: float, since: int = 0
    ) -> dict[str, str] | None:
        """The first message from position `since` on that satisfies predicate."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for message in self.messages[since:]:
                    if predicate(message):
                        return message
                since = len(self.messages)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)


@dataclass
class DaemonProcess:
    """tailsfwd, run with `ip netns exec` (which execs: the pid is the daemon's)."""

    namespace: str
    policy: Path
    workdir: Path
    args: Sequence[str] = ()
    # Wraps the daemon's command (e.g. Journald.wrap: a journald of the test's).
    wrap: Callable[[Sequence[str]], list[str]] | None = None
    process: subprocess.Popen[bytes] = field(init=False)
    notify: NotifySocket = field(init=False)
    started: float = field(init=False)

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    @property
    def resolv_conf(self) -> Path:
        return self.workdir / "resolv.conf"

    @property
    def clearnet_conf(self) -> Path:
        return self.workdir / "resolv-over-clearnet.conf"

    @property
    def no_bus(self) -> Path:
        return self.workdir / "no-bus"

    @property
    def stderr_path(self) -> Path:
        return self.workdir / "tailsfwd.stderr"

    def start(self) -> DaemonProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.notify = NotifySocket(self.workdir / "notify.sock")
        # Never this machine's resolv files: the daemon's are in the work directory.
        daemon = [
            VENV_PYTHON, "-m", "tailsfw.daemon",
            "--policy", str(self.policy), "--state-dir", str(self.state_dir),
            "--resolv-conf", str(self.resolv_conf),
            "--clearnet-resolv-conf", str(self.clearnet_conf),
            # Not this machine's NetworkManager either, unless a test gives one.
            *([] if "--nm-bus" in self.args else ["--nm-bus", f"unix:path={self.no_bus}"]),
            *([] if "--bus" in self.args else ["--bus", "none"]),
            *self.args,
        ]  # fmt: skip
        argv = ["ip", "netns", "exec", self.namespace,
                *(self.wrap(daemon) if self.wrap else daemon)]  # fmt: skip
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify.path)}
        env.pop("JOURNAL_STREAM", None)  # log to stderr, which we keep
        with self.stderr_path.open("ab") as stderr:
            self.started = time.monotonic()
            self.process = subprocess.Popen(argv, stderr=stderr, env=env, cwd=REPO)
        return self

    def wait_ready(self, timeout: float = 10.0, since: int = 0) -> dict[str, str]:
        """The READY=1 message; raises if the daemon exits or stays silent."""
        message = self.wait_message(lambda m: m.get("READY") == "1", timeout, since)
        if message is None:
            raise RuntimeError(f"tailsfwd not ready within {timeout} s:\n{self.log()}")
        return message

    def wait_message(
        self, predicate: Callable[[dict[str, str]], bool], timeout: float, since: int = 0
    ) -> dict[str, str] | None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.notify.wait(predicate, min(left, 0.1), since)
            if message is not None:
                return message
            if self.process.poll() is not None:
                raise RuntimeError(f"tailsfwd exited with {self.process.returncode}:\n{self.log()}")
        return None

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.state_dir / "status.json").read_text())
        return data

    def commits(self) -> int:
        return int(self.status()["counters"]["commits"])

    def wait_status(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if predicate(status):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"status never matched; last: {status}")
            time.sleep(0.01)

    def send(self, sig: int) -> None:
        self.process.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int:
        """Stops it (SIGKILL if it does not stop in time); its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def close(self) -> None:
        self.stop(signal.SIGKILL)
        self.notify.close()

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")


@contextlib.contextmanager
def run_daemon(
    namespace: str,
    policy: Path,
    workdir: Path,
    args: Sequence[str] = (),
    wrap: Callable[[Sequence[str]], list[str]] | None = None,
) -> Iterator[DaemonProcess]:
    """A started tailsfwd (not yet ready), killed on exit: its rules stay."""
    daemon = DaemonProcess(namespace, policy, workdir, args, wrap).start()
    try:
        yield daemon
    finally:
        daemon.close()


class Changer:
    """Another process that changes links and addresses: `ip -batch`, fed
    one line at a time, so that each change is timed from its own write."""

    def __init__(self, namespace: str) -> None:
        self.process = subprocess.Popen(
            ["ip", "-n", namespace, "-force", "-batch", "-"], stdin=subprocess.PIPE, text=True
        )

    def __call__(self, command: str) -> float:
        """Sends one command; returns the monotonic time just before."""
        assert self.process.stdin is not None
        start = time.monotonic()
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return start

    def close(self) -> None:
        """Waits until every command sent so far has been run."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(30)

    def __enter__(self) -> Changer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tailsfw_tables(namespace: str) -> set[str]:
    listing = json.loads(ns_run(namespace, ["nft", "-j", "list", "tables"]).stdout)
    return {
        t["table"]["family"]
        for t in listing["nftables"]
        if "table" in t and t["table"]["name"] == "tailsfw"
    }


def lan_networks(namespace: str) -> set[ipaddress.IPv4Network]:
    """The on-link LAN networks in force: the `lan` set ("connected" mode)."""
    listing = json.loads(
        ns_run(namespace, ["nft", "-j", "list", "set", "ip", "tailsfw", "lan"]).stdout
    )
    networks: set[ipaddress.IPv4Network] = set()
    for item in listing["nftables"]:
        for key in item.get("set", {}).get("elem", []):
            if isinstance(key, dict) and "prefix" in key:
                key = f"{key['prefix']['addr']}/{key['prefix']['len']}"
            elif isinstance(key, dict) and "range" in key:
                low, high = (ipaddress.IPv4Address(a) for a in key["range"])
                networks.update(ipaddress.summarize_address_range(low, high))
                continue
            networks.add(ipaddress.IPv4Network(key))
    return networks


def read_sysctls(namespace: str, names: Sequence[str]) -> dict[str, str]:
    done = ns_run(namespace, ["sysctl", "-n", *names])
    return dict(zip(names, done.stdout.split(), strict=True))


@contextlib.contextmanager
def reset_host(
    namespace: str, sysctls: Sequence[str], restore: Callable[[], None] | None = None
) -> Iterator[None]:
    """On exit, undo what tailsfwd did to a lab namespace (tests only).

    The daemon itself never does this: its rules and settings outlive it.
    Removes the tailsfw tables, writes back the sysctls as they were on
    entry, then calls `restore` (switching IPv6 off drops an interface's
    IPv6 addresses and routes, which only the lab knows how to put back).
    """
    before = read_sysctls(namespace, sysctls)
    try:
        yield
    finally:
        remove_tailsfw_tables(namespace)
        # `all` first: writing it also writes every interface.
        order = sorted(before, key=lambda n: (".all." not in n, n))
        ns_run(namespace, ["sysctl", "-q", *(f"{n}={before[n]}" for n in order)])
        if restore is not None:
            restore()


@dataclass(frozen=True)
class Seen:
    """An event of the monitor and the monotonic time it came out."""

    at: float
    event: RulesetTouched


class MonitorThread:
    """tailsfw's `NftMonitor`, run by a thread of this process inside a namespace.

    `commit()` commits a JSON document through libnftables from that same
    thread (as tailsfwd commits from its event loop): the monitor must take
    those commits as its own.
    """

    def __init__(
        self,
        namespace: str,
        react: Callable[[RulesetTouched, Nft], None] | None = None,
        **options: Any,
    ) -> None:
        """`react(event, nft)`, if given, runs on the monitor's thread as each
        event comes (as tailsfwd's loop would restore the ruleset)."""
        self.namespace = namespace
        self.react = react
        self.options = options
        self.seen: queue.Queue[Seen] = queue.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._nft: Nft | None = None
        self._errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MonitorThread:
        self._thread.start()
        first = self.next(5.0)  # "monitor started": subscribed from here on
        if first is None:
            self.close()
            raise RuntimeError(f"monitor did not start: {self._errors}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop is not None and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(5)

    def _run(self) -> None:
        try:
            enter_netns(self.namespace)
            asyncio.run(self._follow())
        except asyncio.CancelledError:
            pass
        except BaseException as e:
            self._errors.append(e)

    async def _follow(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._nft = Nft()  # made here: its socket is in the namespace
        async for event in NftMonitor(**self.options).events():
            at = time.monotonic()
            if self.react is not None:
                self.react(event, self._nft)
            self.seen.put(Seen(at, event))

    def next(self, timeout: float) -> Seen | None:
        try:
            return self.seen.get(timeout=timeout)
        except queue.Empty:
            return None

    def stall(self, seconds: float) -> None:
        """Keep the monitor's loop busy, as a long commit would."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(time.sleep, seconds)

    def commit(self, document: dict[str, Any]) -> None:
        """Commit from the monitor's own thread (and process)."""
        assert self._loop is not None
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def apply() -> None:
            try:
                assert self._nft is not None
                self._nft.apply(document)
                done.set_result(None)
            except BaseException as e:
                done.set_exception(e)

        self._loop.call_soon_threadsafe(apply)
        done.result(10)


class CommitClock:
    """The monotonic time at which each nftables commit in a namespace was
    announced, taken by a thread that does nothing else."""

    def __init__(self, namespace: str) -> None:
        self.generations = NftGenerations(namespace)
        self.times: queue.Queue[float] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            at = self.generations.wait(0.1)
            if at is not None:
                self.times.put(at)

    def next(self, timeout: float) -> float | None:
        try:
            return self.times.get(timeout=timeout)
        except queue.Empty:
            return None

    def drain(self) -> None:
        while not self.times.empty():
            self.times.get_nowait()

    def close(self) -> None:
        self._closed = True
        self._thread.join()
        self.generations.close()

    def __enter__(self) -> CommitClock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_tailsfw_tables(namespace: str) -> None:
    """Test set-up only: the daemon itself never removes a rule."""
    for family in sorted(tailsfw_tables(namespace)):
        ns_run(namespace, ["nft", "delete", "table", family, "tailsfw"])


def restore_lab_ipv6(lab: Lab) -> None:
    # Switching IPv6 off on eth0 dropped its address and default route.
    lab.host(["ip", "-6", "addr", "replace", f"{HOST_V6}/64", "dev", HOST_IF, "nodad"])
    lab.host(["ip", "-6", "route", "replace", "default", "via", PEER_LAN_V6])


@contextlib.contextmanager
def lab_host_put_back(lab: Lab) -> Iterator[None]:
    """On exit, the lab's host as the other lab tests expect it: no
    ruleset, its sysctls as on entry, IPv6 on."""
    with reset_host(lab.host_ns, LAB_HOST_SYSCTLS, restore=lambda: restore_lab_ipv6(lab)):
        yield
