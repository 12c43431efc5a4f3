"""A real systemd-journald for lab tests, and the dropped-packet audit beside it.

journald runs in a private mount namespace (tmpfs on /run, volatile storage)
and a network namespace of its own.  Its socket directory and its journal
files are bind-mounted from a work directory, so that

- a process that must log to it runs with that socket directory mounted on
  /run/systemd/journal, in a private mount namespace of its own
  (`Journald.wrap`): `journal.send` always writes to that fixed path;
- tests read the files back from the work directory (`journalctl -D`,
  `tailsfwctl drops --directory`).

Nothing of it is visible in this machine's /run, and it all goes when the
process ends.  `AuditProcess` runs tests/lab/audit_runner.py (the audit,
reading a lab namespace's NFLOG group) that way.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.lab.command import REPO, VENV_PYTHON, command_env, netns_exec

JOURNALD = "/lib/systemd/systemd-journald"
CONFIG = """[Journal]
Storage=volatile
RateLimitIntervalSec=0
ReadKMsg=no
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
"""
# systemd's own default (sysctl.d/50-default.conf); the kernel's is 10.
MAX_DGRAM_QLEN = 512


@dataclass
class Journald:
    workdir: Path
    process: subprocess.Popen[bytes] = field(init=False)

    @property
    def sockets(self) -> Path:
        return self.workdir / "sockets"

    @property
    def files(self) -> Path:
        return self.workdir / "files"

    def start(self, timeout: float = 10.0) -> Journald:
        self.sockets.mkdir(parents=True)
        self.files.mkdir(parents=True)
        # /var/log/journal may exist on this machine: hide it, volatile only.
        script = f"""set -e
sysctl -qw net.unix.max_dgram_qlen={MAX_DGRAM_QLEN}
mount -t tmpfs tmpfs /run
mkdir -p /run/systemd/journal /run/log/journal /run/systemd/journald.conf.d
mount --bind {self.sockets} /run/systemd/journal
mount --bind {self.files} /run/log/journal
if [ -d /var/log/journal ]; then mount -t tmpfs tmpfs /var/log/journal; fi
cat > /run/systemd/journald.conf.d/tailsfw-lab.conf
exec {JOURNALD}
"""
        self.process = subprocess.Popen(
            ["unshare", "--mount", "--net", "--propagation", "private", "sh", "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=(self.workdir / "journald.stderr").open("wb"),
            env=command_env(),
        )
        assert self.process.stdin is not None
        self.process.stdin.write(CONFIG.encode())
        self.process.stdin.close()
        deadline = time.monotonic() + timeout
        while not (self.sockets / "socket").exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                stderr = (self.workdir / "journald.stderr").read_text(errors="replace")
                raise RuntimeError(f"journald did not start: {stderr}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def wrap(
        self, argv: Sequence[str], files: bool = False, netns_dir: Path | None = None
    ) -> list[str]:
        """argv with this journald's socket directory on /run/systemd/journal (and,
        with `files`, its journal files on /run/log/journal: the system journal).

        netns_dir: where /run/netns, which the tmpfs on /run hides, stays
        visible, with the namespaces made later (propagation slave: the
        machine's new mounts come in, none of ours goes out)."""
        keep = f"mount --rbind /run/netns {netns_dir}; " if netns_dir else ""
        script = (
            f"set -e; {keep}mount -t tmpfs tmpfs /run; mkdir -p /run/systemd/journal;"
            f" mount --bind {self.sockets} /run/systemd/journal;"
            + (f" mkdir -p /run/log/journal; mount --bind {self.files} /run/log/journal;"
               " if [ -d /var/log/journal ]; then mount -t tmpfs tmpfs /var/log/journal; fi;"
               if files else "")
            + ' exec "$@"'
        )  # fmt: skip
        propagation = "slave" if netns_dir else "private"
        return ["unshare", "--mount", "--propagation", propagation, "sh", "-c", script, "sh", *argv]

    def entries(self, *matches: str) -> list[dict[str, Any]]:
        """`journalctl -D FILES -o json [MATCHES]`, decoded."""
        done = subprocess.run(
            ["journalctl", "-D", str(self.files), "-o", "json", "--no-pager", *matches],
            capture_output=True, text=True, check=True, timeout=30,
        )  # fmt: skip
        return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


@contextlib.contextmanager
def run_journald(workdir: Path) -> Iterator[Journald]:
    journald = Journald(workdir).start()
    try:
        yield journald
    finally:
        journald.stop()


@dataclass
class AuditProcess:
    """tests/lab/audit_runner.py in a lab namespace, logging to a Journald."""

    namespace: str
    journald: Journald
    group: int
    args: Sequence[str] = ()
    cpu: int | None = None  # pin the runner to this CPU
    process: subprocess.Popen[str] = field(init=False)

    @property
    def counters_path(self) -> Path:
        return self.journald.workdir / f"audit-{self.group}.json"

    def start(self) -> AuditProcess:
        argv = [VENV_PYTHON, "-m", "tests.lab.audit_runner", "--group", str(self.group),
                "--counters", str(self.counters_path), *self.args]  # fmt: skip
        if self.cpu is not None:
            argv = ["taskset", "-c", str(self.cpu), *argv]
        self.process = subprocess.Popen(
            [*netns_exec(self.namespace), *self.journald.wrap(argv)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
            env=command_env(),
        )  # fmt: skip
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()  # the runner's first line
        if line != "ready":
            self.stop()
            raise RuntimeError(f"audit runner did not start: {line} {self.stderr()}")
        return self

    def counters(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.counters_path.read_text())
        return data

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> dict[str, Any]:
        """SIGTERM (the runner writes its summaries and final counters), then its counters."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.returncode != 0:
            raise RuntimeError(f"audit runner exited {self.process.returncode}: {self.stderr()}")
        return self.counters()

    def stderr(self) -> str:
        if self.process.poll() is None or self.process.stderr is None:
            return ""
        return self.process.stderr.read()


@contextlib.contextmanager
def run_audit(
    namespace: str, journald: Journald, group: int, args: Sequence[str] = (), cpu: int | None = None
) -> Iterator[AuditProcess]:
    audit = AuditProcess(namespace, journald, group, args, cpu).start()
    try:
        yield audit
    finally:
        if audit.process.poll() is None:
            audit.process.kill()
            audit.process.wait()
