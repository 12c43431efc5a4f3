"""The shipped units and the fail-closed script, checked by systemd and nft themselves."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tailsfw import compiler, verify
from tests.lab.boot import VENV, installed_units, write_units
from tests.lab.command import REPO
from tests.lab.kernel import in_scratch_namespace

FAIL_CLOSED = REPO / "libexec" / "fail-closed"
MAN = REPO / "man"


def test_systemd_analyze_verify_passes_for_every_shipped_unit(tmp_path: Path) -> None:
    """As installed here (this checkout's paths), with the man pages it names."""
    units = installed_units(REPO, VENV)
    write_units(tmp_path / "units", units)
    for page in MAN.glob("*.[1-8]"):
        section = tmp_path / "man" / f"man{page.suffix[1:]}"
        section.mkdir(parents=True, exist_ok=True)
        (section / page.name).symlink_to(page)
    done = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / "units" / n) for n in units)],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "MANPATH": str(tmp_path / "man"), "SYSTEMD_LOG_LEVEL": "notice"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_fail_closed_loads_the_compilers_lockdown_where_no_table_is() -> None:
    done = in_scratch_namespace(f"{FAIL_CLOSED} && nft -j list ruleset")
    assert done.returncode == 0, done.stderr
    assert verify.differences(json.loads(done.stdout)["nftables"], compiler.lockdown()) == []


def test_fail_closed_leaves_a_ruleset_in_force_untouched() -> None:
    # The policy's ip table in force, no ip6 table: only ip6 gets the lockdown.
    policy = compiler.lockdown().to_json().replace("lockdown: loopback only", "in force")
    done = in_scratch_namespace(
        f"nft -j -f - && nft delete table ip6 tailsfw && {FAIL_CLOSED} && nft list ruleset",
        policy,
    )
    assert done.returncode == 0, done.stderr
    ip, ip6 = done.stdout.split("table ip6 tailsfw")
    assert "in force" in ip and "lockdown" not in ip
    assert "lockdown: loopback only" in ip6
    assert "no ip6 tailsfw table: lockdown ruleset loaded" in done.stderr
    assert "no ip tailsfw" not in done.stderr
