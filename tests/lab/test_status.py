"""`tailsfwctl status` in the lab host: the kernel's real tables, a real daemon.

No bus here (--bus points nowhere): the kernel and status.json are what
status reads, as at early boot or with dbus down.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tailsfw import compiler, summary
from tests.lab import policies
from tests.lab.bus import private_system_bus
from tests.lab.command import REPO, VENV_PYTHON, netns_exec
from tests.lab.daemon_process import run_daemon
from tests.lab.kernel import remove_tailsfw_tables, tailsfw_tables
from tests.lab.topology import Lab

pytestmark = pytest.mark.usefixtures("daemon_host")


@pytest.fixture
def policy(lab: Lab, tmp_path: Path) -> Path:
    return policies.lab_policy(lab, tmp_path / "policy.toml")


def tailsfwctl(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*netns_exec(lab.host_ns), VENV_PYTHON, "-m", "tailsfw.cli", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


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
    assert data["kernel"] == {"holds": "policy", "tables": ["ip", "ip6"]}
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


def test_a_status_file_left_by_a_dead_daemon_is_not_running(
    lab: Lab, policy: Path, tmp_path: Path
) -> None:
    remove_tailsfw_tables(lab.host_ns)
    with run_daemon(lab.host_ns, policy, tmp_path / "d") as daemon:
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
    assert f"pid {daemon.process.pid} of {state_file} has exited" in data["daemon"]["source"]
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
