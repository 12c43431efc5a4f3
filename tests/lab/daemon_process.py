"""tailsfwd run inside a network namespace, as systemd would run it.

Shared by the lab tests and bench/:

- `NotifySocket`: the socket systemd would listen on (NOTIFY_SOCKET);
- `DaemonProcess` / `run_daemon`: tailsfwd in a namespace, with its state
  directory, resolv files and stderr in a work directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.lab.command import REPO, VENV_PYTHON, netns_exec
from tests.lab.wait import wait_for


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
            VENV_PYTHON, "-m", "tailsfw.tailsfwd",
            "--policy", str(self.policy), "--state-dir", str(self.state_dir),
            "--resolv-conf", str(self.resolv_conf),
            "--clearnet-resolv-conf", str(self.clearnet_conf),
            # Not this machine's NetworkManager either, unless a test gives one.
            *([] if "--nm-bus" in self.args else ["--nm-bus", f"unix:path={self.no_bus}"]),
            *([] if "--bus" in self.args else ["--bus", "none"]),
            *self.args,
        ]  # fmt: skip
        argv = [*netns_exec(self.namespace), *(self.wrap(daemon) if self.wrap else daemon)]
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
        last: list[dict[str, Any]] = [{}]

        def matched() -> bool:
            last[0] = self.status()
            return predicate(last[0])

        wait_for(matched, timeout, 0.01, what="the status", why=lambda: f"last: {last[0]}")
        return last[0]

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


@contextlib.contextmanager
def unit_cgroup() -> Iterator[Callable[[int], None]]:
    """A cgroup named as systemd names tailsfwd's (…/tailsfwd.service, in
    systemd's hierarchy or the unified one), and a function that moves a
    process into it: only root can, which is what status trusts.  (Moved from
    here: `ip netns exec` gives the daemon a /sys without the cgroup mounts.)"""
    base = Path("/sys/fs/cgroup/systemd")
    base = base if base.is_dir() else Path("/sys/fs/cgroup")
    slice_ = base / f"tfwlab-{os.getpid()}.slice"
    unit = slice_ / "tailsfwd.service"
    unit.mkdir(parents=True)

    def into_unit(pid: int) -> None:
        (unit / "cgroup.procs").write_text(f"{pid}\n")

    try:
        yield into_unit
    finally:
        for _ in range(50):  # the daemon was killed: its cgroup empties at once, or nearly
            try:
                unit.rmdir()
                break
            except OSError:
                time.sleep(0.1)
        slice_.rmdir()
