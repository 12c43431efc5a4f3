"""tailsfwctl imports only what the command in hand needs (docs/benchmarks.md):
a test on what is imported, read from `python -X importtime`, not on time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
POLICY = REPO / "etc" / "tailsfw" / "policy.toml"
# The heavy pieces: libnftables, the D-Bus library, the journal's, the event
# loop, the daemon's event classes, the drop audit's decoder and limiter, what
# enters a namespace's guest side, and the policy and its compiler.
HEAVY = (
    "nftables", "dbus_fast", "systemd", "asyncio", "tailsfw.events", "tailsfw.nflog",
    "tailsfw.droplog", "tailsfw.guests", "tailsfw.policy", "tailsfw.compiler",
)  # fmt: skip


def imported(argv: list[str], euid: int | None = None) -> set[str]:
    """The modules `tailsfwctl ARGV` imports, run as a process of its own
    (`euid`: what os.geteuid() says in it, so no command here needs root;
    as "root", the kernel's listing is empty: this machine's is not read)."""
    fake = f"os.geteuid = lambda: {euid}; " if euid is not None else ""
    if euid == 0:
        fake += "import tailsfw.nft; tailsfw.nft.Nft.list_ruleset = lambda self: []; "
    script = f"import os, sys; {fake}from tailsfw.cli import main; sys.exit(main({argv!r}))"
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", script],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    lines = [line for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert lines, done.stderr
    return {line.rpartition("|")[2].strip() for line in lines}


def roots(modules: set[str]) -> set[str]:
    """The heavy pieces among `modules` (a package counts once, as its name)."""
    return {heavy for m in modules for heavy in HEAVY if m == heavy or m.startswith(heavy + ".")}


def test_help_imports_nothing_heavy() -> None:
    assert roots(imported(["--help"])) == set()


@pytest.mark.parametrize("command", ["apply", "status", "verify", "reload", "render"])
def test_a_commands_help_imports_nothing_heavy(command: str) -> None:
    assert roots(imported([command, "--help"])) == set()


def test_render_imports_the_compiler_only() -> None:
    assert roots(imported(["render", "--policy", str(POLICY)])) == {
        "tailsfw.policy", "tailsfw.compiler"
    }  # fmt: skip


def test_status_without_a_daemon_or_root_compiles_nothing_and_loads_no_bus_library(
    tmp_path: Path,
) -> None:
    """A user's status with no bus and no status file: nothing to compare, so
    neither the compiler nor libnftables nor the D-Bus library is loaded."""
    argv = ["status", "--bus", f"unix:path={tmp_path}/none", "--state-file", str(tmp_path / "n")]
    assert roots(imported(argv, euid=1000)) == set()


def test_reload_without_a_bus_loads_no_bus_library(tmp_path: Path) -> None:
    assert roots(imported(["reload", "--bus", f"unix:path={tmp_path}/none"])) == set()


def test_status_as_root_compiles_and_lists_without_the_daemons_pieces(tmp_path: Path) -> None:
    """Root's status with no daemon compiles the policy and reads the kernel:
    the compiler and libnftables, never the event loop, the D-Bus or journal
    libraries, the daemon's event classes or the audit's parts; with no
    application namespace present, nothing that enters one."""
    argv = [
        "status", "--policy", str(POLICY), "--bus", f"unix:path={tmp_path}/none",
        "--state-file", str(tmp_path / "n"),
    ]  # fmt: skip
    assert roots(imported(argv, euid=0)) == {"tailsfw.policy", "tailsfw.compiler", "nftables"}
