"""The kept files: how fast a tampered resolver file is restored, and accounts followed.

Runs in temp directories (no namespace needed: nothing here touches the
network or this machine's /etc) and returns (bench/run.py prints and saves):

- resolv_restore_ms_p50/p99: another process edits, appends to, replaces
  by rename, deletes, replaces by a symlink or chmods resolv.conf or the
  clearnet file; the time until a reader finds the right text again.  The
  restore loop (`ResolvWatch` -> `ResolvFiles.rewrite`, as the daemon
  runs it) is a process of its own; this one tampers and polls every 0.1 ms.
- resolv_converge_noop_us / _write_us: one converge when nothing differs
  (both files read and compared) and when the clearnet file must change.
- resolv_fsync_ms_p50: what an fsync of such a file costs on this
  filesystem, the reason the writer does not sync (see docs/resolv.md).
- accounts_update_ms_p50/p99: passwd replaced by rename with one more
  account, to the AccountsChanged event naming it.

`python -m bench.resolv` prints the figures as JSON.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.daemon import percentile
from tailsfw.accounts import AccountsSource
from tailsfw.resolv import ResolvFiles, resolv_texts
from tests.files import SERVERS, TAMPERINGS, holds, kept, restore_loop, time_until
from tests.lab.names import temp_prefix

ROUNDS = 50  # per tampering and file: 600 restores
CALLS = 2000
ACCOUNT_CHANGES = 200


def restore_times(work: Path) -> list[float]:
    etc = work / "etc"
    etc.mkdir()
    # Its warnings name each symlink it replaced: expected here, not shown.
    loop = subprocess.Popen(
        [sys.executable, "-m", "bench.resolv", "--serve", str(etc)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert loop.stdin is not None and loop.stdout is not None
    try:
        loop.stdout.readline()  # started
        times = []
        for _ in range(ROUNDS):
            for path, text in kept(etc).items():
                for tamper in TAMPERINGS.values():
                    tamper(path)
                    times.append(time_until(lambda: holds(path, text)))  # noqa: B023
        return times
    finally:
        loop.stdin.close()
        loop.wait(10)


def serve(etc: Path) -> None:
    """The restore loop, until stdin closes."""
    with restore_loop(etc):
        print("started", flush=True)
        sys.stdin.read()


def converge_us(work: Path) -> tuple[float, float]:
    files = ResolvFiles(work / "resolv.conf", work / "clearnet.conf")
    other = (ipaddress.IPv4Address("10.0.0.53"),)
    files.rewrite(resolv_texts(SERVERS))
    start = time.perf_counter()
    for _ in range(CALLS):
        files.rewrite(resolv_texts(SERVERS))
    noop = (time.perf_counter() - start) / CALLS * 1e6
    start = time.perf_counter()
    for i in range(CALLS):
        files.rewrite(resolv_texts(other if i % 2 else SERVERS))
    write = (time.perf_counter() - start) / CALLS * 1e6
    return noop, write


def fsync_ms(work: Path) -> float:
    path = work / "synced"
    times = []
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for i in range(50):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"nameserver 10.0.0.{i}\n".encode(), 0)
            start = time.perf_counter()
            os.fsync(fd)
            times.append((time.perf_counter() - start) * 1000)
    finally:
        os.close(fd)
    return statistics.median(times)


async def account_times(work: Path) -> list[float]:
    passwd = work / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\n")
    accounts = [f"user{i}" for i in range(ACCOUNT_CHANGES)]
    events = AccountsSource(passwd).events()
    await anext(events)
    times = []
    lines = ["root:x:0:0:root:/root:/bin/bash\n"]
    for i, name in enumerate(accounts):
        lines.append(f"{name}:x:{2000 + i}:{2000 + i}::/home/{name}:/bin/sh\n")
        start = time.monotonic()
        new = passwd.with_name("passwd+")
        new.write_text("".join(lines))
        os.replace(new, passwd)
        event = await asyncio.wait_for(anext(events), 2)
        times.append((time.monotonic() - start) * 1000)
        assert event.uids.get(name) == 2000 + i
    return times


def measure() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=temp_prefix("bench-resolv")) as tmp:
        work = Path(tmp)
        restores = restore_times(work)
        noop, write = converge_us(work)
        fsync = fsync_ms(work)
        accounts = asyncio.run(account_times(work))
    return {
        "resolv_restores": len(restores),
        "resolv_restore_ms_p50": round(percentile(restores, 50), 2),
        "resolv_restore_ms_p99": round(percentile(restores, 99), 2),
        "resolv_converge_noop_us": round(noop, 1),
        "resolv_converge_write_us": round(write, 1),
        "resolv_fsync_ms_p50": round(fsync, 2),
        "accounts_update_ms_p50": round(percentile(accounts, 50), 2),
        "accounts_update_ms_p99": round(percentile(accounts, 99), 2),
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(Path(sys.argv[2]))
    else:
        print(json.dumps(measure(), indent=2, sort_keys=True))
