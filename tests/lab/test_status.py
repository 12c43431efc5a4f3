"""`tailsfwctl status` in the lab host: the kernel's real tables, a real daemon.

No bus here (--bus points nowhere): the kernel and status.json are what
status reads, as at early boot or with dbus down.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tailsfw import compiler, statusfile, summary
from tailsfw.status import HEARTBEAT
from tests.lab import policies
from tests.lab.bus import private_system_bus
from tests.lab.command import REPO, VENV_PYTHON, netns_exec, tailsfwctl_in
from tests.lab.daemon_process import run_daemon, unit_cgroup
from tests.lab.kernel import remove_tailsfw_tables, tailsfw_tables
from tests.lab.topology import INTERNET_V4, Lab

pytestmark = pytest.mark.usefixtures("daemon_host")


@pytest.fixture
def policy(lab: Lab, tmp_path: Path) -> Path:
    return policies.lab_policy(lab, tmp_path / "policy.toml")


def tailsfwctl(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    """This tree's tailsfwctl, in the lab host (never raises on exit codes)."""
    return tailsfwctl_in(lab.host_ns, *args)


def status(lab: Lab, policy: Path, state_file: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    done = tailsfwctl(
        lab, "status", "--json", "--policy", str(policy), "--bus", "unix:path=/nonexistent",
        "--state-file", str(state_file), *extra,
    )  # fmt: skip
    assert done.stderr == "", done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    assert data["exit_status"] == done.returncode
    return done.returncode, data


def test_the_applied_policy_is_in_force(lab: Lab, policy: Path, tmp_path: Path) -> None:
    remove_tailsfw_tables(lab.host_ns)
    assert tailsfwctl(lab, "apply", "--policy", str(policy)).returncode == 0
    code, data = status(lab, policy, tmp_path / "none.json")
    assert code == summary.OK, data
    assert data["kernel"] == {"holds": "policy", "tables": ["ip", "ip6"], "differences": []}
    assert data["daemon"]["running"] is False
    text = tailsfwctl(lab, "status", "--policy", str(policy), "--bus", "unix:path=/none")
    assert text.stdout.startswith("● tailsfw: on: the policy's ruleset is in force\n")
    assert "Daemon: not running" in text.stdout


def test_no_tables_is_3(lab: Lab, policy: Path, tmp_path: Path) -> None:
    remove_tailsfw_tables(lab.host_ns)
    code, data = status(lab, policy, tmp_path / "none.json")
    assert (code, data["kernel"]["holds"]) == (summary.NOT_IN_FORCE, "none")


def test_lockdown_is_3(lab: Lab, policy: Path, tmp_path: Path) -> None:
    lab.host(["nft", "-j", "-f", "-"], input=compiler.lockdown().to_json())
    code, data = status(lab, policy, tmp_path / "none.json")
    assert (code, data["kernel"]["holds"]) == (summary.NOT_IN_FORCE, "lockdown")
    assert data["summary"] == "lockdown: only loopback traffic passes"


def test_another_policy_is_3(lab: Lab, policy: Path, tmp_path: Path) -> None:
    def flip(p: dict[str, Any]) -> None:
        p["lan"]["mode"] = "rfc1918" if p["lan"].get("mode") == "connected" else "connected"

    other = policies.lab_policy(lab, tmp_path / "other.toml", flip)
    assert tailsfwctl(lab, "apply", "--policy", str(other)).returncode == 0
    code, data = status(lab, policy, tmp_path / "none.json")
    assert (code, data["kernel"]["holds"]) == (summary.NOT_IN_FORCE, "other")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can read (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="tfwlab-status-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def status_as(lab: Lab, role: str, policy: Path, state_file: Path, bus: str) -> tuple[int, Any]:
    done = lab.run_as(role, [
        VENV_PYTHON, "-m", "tailsfw.cli", "status", "--json", "--policy", str(policy),
        "--bus", bus, "--state-file", str(state_file),
    ], timeout=60)  # fmt: skip
    assert done.stderr == "", done.stderr
    return done.returncode, json.loads(done.stdout)


NO_BUS = "unix:path=/nonexistent"


def test_a_frozen_daemon_is_not_on_for_a_user(lab: Lab, shared_dir: Path) -> None:
    """SIGSTOP the daemon, delete its tables: once its file is older than
    three heartbeats, a user's status says unknown (4), never "on"."""
    policy = policies.lab_policy(lab, shared_dir / "policy.toml")
    remove_tailsfw_tables(lab.host_ns)
    with unit_cgroup() as into_unit, run_daemon(lab.host_ns, policy, shared_dir / "d") as d:
        into_unit(d.process.pid)
        d.wait_ready()
        state_file = d.state_dir / "status.json"
        code, data = status_as(lab, "amnesia", policy, state_file, NO_BUS)
        assert (code, data["daemon"]["source"]) == (summary.OK, str(state_file)), data
        # Nothing changes, yet a live daemon's file stays fresh (the heartbeat).
        time.sleep(statusfile.HEARTBEATS * HEARTBEAT + 1)
        code, data = status_as(lab, "amnesia", policy, state_file, NO_BUS)
        assert (code, data["daemon"]["source"]) == (summary.OK, str(state_file)), data
        os.kill(d.process.pid, signal.SIGSTOP)
        frozen = time.time()
        try:
            remove_tailsfw_tables(lab.host_ns)
            time.sleep(max(0.0, frozen + statusfile.HEARTBEATS * HEARTBEAT + 1 - time.time()))
            code, data = status_as(lab, "amnesia", policy, state_file, NO_BUS)
            assert code == summary.NO_PERMISSION, data
            assert data["summary"].startswith("unknown: tailsfwd is not running"), data
            assert "tailsfwd is not answering" in data["daemon"]["source"]
            code, data = status(lab, policy, state_file)  # root sees the kernel
            assert (code, data["kernel"]["holds"]) == (summary.NOT_IN_FORCE, "none")
        finally:
            os.kill(d.process.pid, signal.SIGCONT)


def test_a_daemon_silent_on_the_bus_is_not_on(lab: Lab, shared_dir: Path) -> None:
    """Frozen while it holds its bus name: the call times out, and status says
    so in one line instead of trusting the (still fresh) file."""
    policy = policies.lab_policy(lab, shared_dir / "policy.toml")
    with (
        private_system_bus() as bus,
        unit_cgroup() as into_unit,
        run_daemon(lab.host_ns, policy, shared_dir / "d", ["--bus", bus.address]) as d,
    ):
        into_unit(d.process.pid)
        d.wait_ready()
        state_file = d.state_dir / "status.json"
        for _ in range(50):  # the service comes on the bus just after READY
            code, data = status_as(lab, "amnesia", policy, state_file, bus.address)
            if data["daemon"]["source"] == "D-Bus":
                break
            time.sleep(0.1)
        assert (code, data["daemon"]["source"]) == (summary.OK, "D-Bus"), data
        os.kill(d.process.pid, signal.SIGSTOP)
        try:
            code, data = status_as(lab, "amnesia", policy, state_file, bus.address)
        finally:
            os.kill(d.process.pid, signal.SIGCONT)
        assert code == summary.NO_PERMISSION, data
        assert data["summary"] == (
            "unknown: tailsfwd does not answer and only root can read the kernel"
        )
        assert data["daemon"]["source"] == "tailsfwd does not answer on the bus (3 s)"


@pytest.mark.parametrize(
    ("command", "named"),
    [
        ("add table inet tailsfw", "table inet tailsfw"),
        ("add table inet filter; add chain inet filter tailsfw", "chain inet filter tailsfw"),
    ],
)
def test_status_and_verify_agree_on_anything_named_tailsfw(
    lab: Lab, policy: Path, tmp_path: Path, command: str, named: str
) -> None:
    remove_tailsfw_tables(lab.host_ns)
    assert tailsfwctl(lab, "apply", "--policy", str(policy)).returncode == 0
    lab.host(["nft", command])
    try:
        code, data = status(lab, policy, tmp_path / "none.json")
        assert (code, data["kernel"]["holds"]) == (summary.NOT_IN_FORCE, "other"), data
        assert data["kernel"]["differences"] == [f"{named}: in the kernel, not in the policy"]
        done = tailsfwctl(lab, "verify", "--policy", str(policy), "--bus", NO_BUS)
        assert (done.returncode, done.stdout) == (1, f"{named}: in the kernel, not in the policy\n")
    finally:
        lab.host(["nft", f"delete table inet {named.split()[2]}"])


def test_counted_packets_do_not_change_the_verdict(lab: Lab, policy: Path, tmp_path: Path) -> None:
    remove_tailsfw_tables(lab.host_ns)
    assert tailsfwctl(lab, "apply", "--policy", str(policy)).returncode == 0
    for _ in range(3):
        lab.probe("amnesia", "tcp", 4, INTERNET_V4[0], 443)
    counted = lab.host(["nft", "list", "ruleset"]).stdout
    assert any(
        word == "packets" and count != "0"
        for word, count in zip(counted.split(), counted.split()[1:], strict=False)
    ), counted
    code, data = status(lab, policy, tmp_path / "none.json")
    assert (code, data["kernel"]["holds"]) == (summary.OK, "policy"), data


def test_a_status_file_left_by_a_dead_daemon_is_not_running(
    lab: Lab, policy: Path, tmp_path: Path
) -> None:
    remove_tailsfw_tables(lab.host_ns)
    with (
        unit_cgroup() as into_unit,
        run_daemon(lab.host_ns, policy, tmp_path / "d") as daemon,
    ):
        into_unit(daemon.process.pid)
        daemon.wait_ready()
        state_file = daemon.state_dir / "status.json"
        code, data = status(lab, policy, state_file)
        assert code == summary.OK
        assert data["daemon"]["running"] is True
        assert data["daemon"]["properties"]["Pid"] == daemon.process.pid
        daemon.stop()
    assert tailsfw_tables(lab.host_ns) == {"ip", "ip6"}
    code, data = status(lab, policy, state_file)
    assert data["daemon"]["running"] is False
    assert f"its pid {daemon.process.pid} has exited" in data["daemon"]["source"]
    assert code == summary.OK  # the rules outlive the daemon: still in force


def test_apply_as_another_user_says_it_needs_root(lab: Lab, policy: Path) -> None:
    done = lab.run_as(
        "amnesia", [VENV_PYTHON, "-m", "tailsfw.cli", "apply", "--policy", str(policy)]
    )
    assert done.returncode == summary.NO_PERMISSION
    assert done.stderr == "tailsfwctl: apply needs root; the ruleset in force is unchanged\n"


def test_the_running_daemon_answers_on_the_bus(lab: Lab, policy: Path, tmp_path: Path) -> None:
    """The real daemon's Control, served on a system-like bus: status over
    D-Bus says the policy is in force, reload works for root only."""
    with (
        private_system_bus() as bus,
        run_daemon(lab.host_ns, policy, tmp_path / "d", ["--bus", bus.address]) as daemon,
    ):
        daemon.wait_ready()
        args = ("status", "--json", "--policy", str(policy), "--bus", bus.address)
        for _ in range(50):  # the service comes on the bus just after READY
            done = tailsfwctl(lab, *args)
            data = json.loads(done.stdout)
            if data["daemon"]["source"] == "D-Bus":
                break
            time.sleep(0.1)
        assert done.returncode == 0, data
        assert data["daemon"]["source"] == "D-Bus"
        assert data["daemon"]["properties"]["Pid"] == daemon.process.pid
        reloads = daemon.status()["counters"]["reloads"]
        assert tailsfwctl(lab, "reload", "--bus", bus.address).returncode == 0
        daemon.wait_status(lambda s: s["counters"]["reloads"] == reloads + 1)
        nobody = subprocess.run(
            [*netns_exec(lab.host_ns), "setpriv", "--reuid=nobody", "--regid=nogroup",
             "--clear-groups", VENV_PYTHON, "-m", "tailsfw.cli", "reload", "--bus", bus.address],
            capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
        )  # fmt: skip
        assert nobody.returncode != 0 and "Traceback" not in nobody.stderr, nobody.stderr
        time.sleep(0.2)
        assert daemon.status()["counters"]["reloads"] == reloads + 1
