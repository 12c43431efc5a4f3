"""status.json read back (tailsfw/statusfile.py): believed only when strict, fresh
and written by the real tailsfwd; anything else is one line, never a hang or a
traceback.  Real files in a temp directory; /proc is a fake one of the test's."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import pytest

from tailsfw import observe, statusfile, summary
from tailsfw.status import HEARTBEAT, Counters, Status

PID = 77
ME = os.getuid()  # the test's files are the test user's: "root" below means this owner
STATUS = Status(
    pid=PID, state="enforcing", policy="/etc/tailsfw/policy.toml", ruleset="ab" * 32,
    lan_mode="rfc1918", connected=[], interfaces={1: "lo"}, warnings=[], last_error="",
    counters=Counters(), sysctls=[], netlink_reads=1, clearnet_dns=["192.168.77.1"],
)  # fmt: skip
SERVICE = "0::/system.slice/tailsfwd.service\n"


def fake_proc(
    root: Path,
    started: float,
    cgroup: str = SERVICE,
    uid: str = "0",
    exe: str = os.path.realpath(sys.executable),
) -> Path:
    """A /proc with process PID, started at `started` (seconds since the epoch)."""
    boot = int(started) - 100
    ticks = 100 * os.sysconf("SC_CLK_TCK")
    (root / str(PID)).mkdir(parents=True)
    fields = ["S"] + ["0"] * 18 + [str(ticks)] + ["0"] * 10
    (root / str(PID) / "stat").write_text(f"{PID} (python3) " + " ".join(fields))
    (root / str(PID) / "status").write_text(f"Name:\tpython3\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    (root / str(PID) / "cgroup").write_text(cgroup)
    (root / str(PID) / "exe").symlink_to(exe)
    (root / "stat").write_text(f"cpu 0 0\nbtime {boot}\n")
    return root


def status_file(path: Path, **changes: object) -> Path:
    data = json.loads(json.dumps(dataclasses.asdict(STATUS)))
    data["updated"] = time.time()
    data.update(changes)
    path.write_text(json.dumps(data))
    path.chmod(0o644)
    return path


def read(path: Path, proc: Path) -> Status:
    return statusfile.daemon_status(path, proc=proc, owner=ME)


def refused(path: Path, proc: Path) -> str:
    with pytest.raises(statusfile.StatusFileError) as caught:
        read(path, proc)
    text = str(caught.value)
    assert "\n" not in text
    return text


def test_a_fresh_file_of_the_running_daemon_is_believed(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path / "proc", time.time() - 60)
    found = read(status_file(tmp_path / "status.json"), proc)
    assert (found.pid, found.ruleset, found.clearnet_dns) == (PID, "ab" * 32, ["192.168.77.1"])


@pytest.mark.parametrize(
    ("age", "why"),
    [
        (3 * HEARTBEAT + 1, "tailsfwd is not answering"),  # stopped, or frozen (SIGSTOP)
        (-60, "in the future"),
    ],
)
def test_a_file_not_rewritten_on_the_heartbeat_is_not_believed(
    tmp_path: Path, age: float, why: str
) -> None:
    proc = fake_proc(tmp_path / "proc", time.time() - 600)
    path = status_file(tmp_path / "status.json", updated=time.time() - age)
    assert why in refused(path, proc)


@pytest.mark.parametrize(
    ("proc_args", "why"),
    [
        # The old check's only test: "tailsfwd" in argv; anyone can run that.
        ({"cgroup": "0::/user.slice/user-1000.slice/session-2.scope\n"}, "is not tailsfwd"),
        # A user's own service of that name sits under user@UID.service.
        ({"cgroup": "0::/user.slice/user-1000.slice/user@1000.service/tailsfwd.service\n"},
         "is not tailsfwd"),
        ({"uid": "1000"}, "is not tailsfwd"),
        ({"exe": "/usr/bin/sleep"}, "it runs /usr/bin/sleep"),
    ],
)  # fmt: skip
def test_a_pid_that_is_not_the_daemon_is_not_believed(
    tmp_path: Path, proc_args: dict[str, str], why: str
) -> None:
    proc = fake_proc(tmp_path / "proc", time.time() - 60, **proc_args)
    assert why in refused(status_file(tmp_path / "status.json"), proc)


def test_systemds_own_hierarchy_names_the_unit_on_cgroup_v1(tmp_path: Path) -> None:
    cgroups = "9:name=systemd:/system.slice/tailsfwd.service\n4:memory:/x\n0::/\n"
    proc = fake_proc(tmp_path / "proc", time.time() - 60, cgroup=cgroups)
    assert read(status_file(tmp_path / "status.json"), proc).pid == PID


def test_an_exited_or_reused_pid_is_not_believed(tmp_path: Path) -> None:
    path = status_file(tmp_path / "status.json")
    (tmp_path / "empty").mkdir()
    assert f"its pid {PID} has exited" in refused(path, tmp_path / "empty")
    proc = fake_proc(tmp_path / "proc", time.time() + 30)  # started after the file
    assert "stale" in refused(path, proc)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"pid": 77, "updated": Infinity}', "Infinity is not a number"),
        ('{"pid": 77, "updated": NaN}', "NaN is not a number"),
        ('{"pid": 77, "updated": 1e999}', "out of range"),
        ('{"pid": 1e999, "updated": 1}', "out of range"),
        ('{"pid": 1e300, "updated": 1}', "number 1e300 out of range"),
        ('{"pid": 77.0, "updated": 1}', "pid 77.0 is not a process id"),
        ('{"pid": 77, "updated": 1, "running_since": 1e300}', "out of range"),
        ('{"pid": 77, "updated": 1, "running_since": 1e15}', "running_since 1000000000000000.0"),
        ('{"pid": 77, "updated": 1e18}', "updated 1e+18 is not a time"),
        ('{"pid": 99999999999999999999999, "updated": 1}', "out of range"),
        ('{"pid": true, "updated": 1}', "pid True is not a process id"),
        ('{"pid": 77, "updated": 1, "state": 5}', "state is not str"),
        ('{"pid": 77, "updated": 1, "warnings": [1]}', "warnings is not list[str]"),
        ("[1, 2]", "is not a JSON object"),
        ("[" * 100_000, "is not JSON"),
        ("\xff", "is not JSON"),
    ],
)  # fmt: skip
def test_a_file_is_parsed_strictly(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "status.json"
    path.write_bytes(text.encode("latin-1"))
    path.chmod(0o644)
    assert why in refused(path, fake_proc(tmp_path / "proc", 1))


def test_what_is_not_a_small_regular_file_of_root_is_refused_at_once(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path / "proc", time.time() - 60)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # nobody writes it: reading would wait forever
    assert refused(fifo, proc).endswith("fifo is not a regular file (a FIFO)")
    assert "is not a regular file" in refused(Path("/dev/zero"), proc)
    assert "is not a regular file" in refused(tmp_path, proc)
    link = tmp_path / "link"
    link.symlink_to(status_file(tmp_path / "status.json"))
    assert refused(link, proc).endswith("link is a symbolic link")
    big = tmp_path / "big"
    with big.open("wb") as f:
        f.truncate(statusfile.MAX_BYTES + 1)
    big.chmod(0o644)
    assert "is larger than" in refused(big, proc)
    assert refused(tmp_path / "none", proc) == f"no {tmp_path / 'none'}"


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_a_file_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    path = status_file(tmp_path / "status.json")
    path.chmod(mode)
    assert f"is writable by others (mode {mode:o})" in refused(path, fake_proc(tmp_path / "p", 1))


def test_a_file_not_owned_by_root_is_refused(tmp_path: Path) -> None:
    path = status_file(tmp_path / "status.json")
    with pytest.raises(statusfile.StatusFileError, match=f"owned by uid {ME}, not root"):
        statusfile.daemon_status(path, proc=fake_proc(tmp_path / "proc", 1), owner=ME + 1)


def test_status_names_why_it_does_not_believe_the_file(tmp_path: Path) -> None:
    """Through observe.daemon, as `tailsfwctl status` asks: no bus, a FIFO."""
    fifo = tmp_path / "status.json"
    os.mkfifo(fifo)
    found, source = observe.daemon(f"unix:path={tmp_path}/no-bus", fifo)
    assert found is None
    assert source == (
        f"tailsfwd is not on the bus: no system bus (no {tmp_path}/no-bus); "
        f"{fifo} is not a regular file (a FIFO)"
    )
    obs = summary.Observation(str(fifo), "", "", found, source, None, "only root")
    assert summary.verdict(obs)[0] == summary.NO_PERMISSION
