"""The Debian package: built once (`make deb`, lintian clean), installed with
dpkg into a throwaway container, booted there by a real systemd with a real
system bus, upgraded, removed and purged.

The container's root is an overlay over this machine's root with a tmpfs on
top (this machine's dpkg database, Debian's python3, python3-dbus-fast 1.84,
python3-systemd, dbus): every write goes to the tmpfs, removed at the end.
The package is installed before the boot, as an image build would do it
(postinst enables the unit; there is no systemd to start it), and the boot
must then start it through that enablement alone: the test's target wants
sysinit.target, not tailsfwd.service.  The tests run in order, on one boot.
Last, `make install` is checked to install the package's very files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tailsfw import summary, verify
from tests.lab.boot import (
    PREFIX,
    PROBE_FILE,
    PROBE_UNIT,
    Container,
    Watch,
    active,
    boot,
    main_pid,
    restarted,
    write_units,
)
from tests.lab.command import REPO

TARGET = "tfwdeb.target"
TEST_UNITS = {
    TARGET: """[Unit]
Description=tailsfw package test
Wants=sysinit.target dbus.socket dbus.service tfwboot-probe.service
""",
    "tfwboot-probe.service": PROBE_UNIT,
}
DEB = "/var/tmp/tailsfw.deb"  # where the container sees the package
# What the upper layer may gain between before the install and after the
# purge without being the package's: dpkg's and the boot's own bookkeeping,
# the package's mount point, and /etc/resolv.conf, which tailsfwd rewrote in
# place (it stays on Tor's DNS: fail closed). What booting made besides
# (Installed.boot_made) is excused too.
NOT_THE_PACKAGES = (
    "var/lib/dpkg/",
    "var/log/",
    "var/cache/",
    "etc/.pwd.lock",
    "etc/machine-id",
    "etc/resolv.conf",
    DEB.lstrip("/"),
)
TOOLS = ("systemd-nspawn", "nsenter", "dpkg-buildpackage", "lintian")
UNAVAILABLE = [tool for tool in TOOLS if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(bool(UNAVAILABLE), reason=f"missing {UNAVAILABLE}")


@dataclass
class Installed:
    container: Container
    upper: Path  # what the container wrote over this machine's root
    before: set[str]  # what it held before the install
    install_output: str
    # What booting made (systemd-tmpfiles' /root/.ssh, ...): not the package's.
    boot_made: set[str]


def files(directory: Path) -> set[str]:
    """Every path under a directory, relative."""
    out = subprocess.run(
        ["find", ".", "-mindepth", "1"], cwd=directory, capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    return {line[2:] for line in out.stdout.splitlines()}


def mount(*argv: str) -> None:
    subprocess.run(["mount", *argv], check=True, capture_output=True)


@contextlib.contextmanager
def overlay_root(work: Path) -> Iterator[tuple[Path, Path]]:
    """This machine's root with a tmpfs overlay on top: (the root, its upper
    layer: what was written); unmounted on exit."""
    layers, root = work / "layers", work / "root"
    layers.mkdir()
    root.mkdir()
    mount("-t", "tmpfs", "-o", "mode=0755", "tfwdeb", str(layers))
    try:
        (layers / "upper").mkdir()
        (layers / "work").mkdir()
        mount(
            "-t", "overlay", "tfwdeb", "-o",
            f"lowerdir=/,upperdir={layers}/upper,workdir={layers}/work", str(root),
        )  # fmt: skip
        try:
            yield root, layers / "upper"
        finally:
            subprocess.run(["umount", str(root)], check=True)
    finally:
        subprocess.run(["umount", str(layers)], check=True)


@pytest.fixture(scope="module")
def deb() -> Iterator[Path]:
    """`make deb` (lintian must pass; the unit tests it runs on Debian's Python
    are left out here: the suite runs them)."""
    with tempfile.TemporaryDirectory(prefix=PREFIX) as out:
        env = {**os.environ, "DEB_BUILD_OPTIONS": "nocheck"}
        done = subprocess.run(
            ["make", "-s", "deb", f"DEBDIR={out}"], cwd=REPO, env=env, capture_output=True,
            text=True, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        (package,) = Path(out).glob("tailsfw_*_all.deb")
        yield package


def written(upper: Path, before: set[str]) -> set[str]:
    """What the upper layer gained since `before`, less the directories this
    machine's root has (the overlay copies a directory up to write in it)."""
    new = files(upper) - before
    return {p for p in new if not (upper / p).is_dir() or not Path("/", p).is_dir()}


@pytest.fixture(scope="module")
def installed(deb: Path) -> Iterator[Installed]:
    with (
        tempfile.TemporaryDirectory(prefix=PREFIX) as work,
        overlay_root(Path(work)) as (
            root,
            upper,
        ),
    ):
        write_units(root / "etc" / "systemd" / "system", TEST_UNITS)
        # A policy-rc.d (this machine's guard against starting services while
        # packages install) would keep deb-systemd-invoke from restarting the
        # daemon in the booted container, as it would on no real system.
        (root / "usr" / "sbin" / "policy-rc.d").unlink(missing_ok=True)
        before = files(upper)
        binds = [f"--bind-ro={deb}:{DEB}"]
        install = subprocess.run(
            ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--private-network",
             "-D", str(root), *binds, "dpkg", "-i", DEB],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert install.returncode == 0, install.stdout + install.stderr
        installed_files = files(upper)
        with boot(["-D", str(root), *binds], TARGET, Path(work) / "console.log") as c:
            c.wait("tailsfwd active", lambda: active(c), timeout=60)
            c.wait("probe done", lambda: c.run("test", "-e", PROBE_FILE, check=False)
                   .returncode == 0)  # fmt: skip
            boot_made = files(upper) - installed_files
            yield Installed(c, upper, before, install.stdout + install.stderr, boot_made)


def status(c: Container) -> tuple[int, dict[str, Any]]:
    done = c.run("tailsfwctl", "status", "--json", check=False)
    assert done.stderr == "", done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    return done.returncode, data


def policy_in_force(c: Container) -> bool:
    """Both families hold the policy's ruleset (a chain the lockdown has not)."""
    chains = c.run("nft", "list", "chains").stdout
    return all(f"table {family} tailsfw" in chains for family in ("ip", "ip6")) and (
        chains.count("chain conntracked") == 2
    )


def test_enabled_by_the_install_and_in_force_before_network_pre(installed: Installed) -> None:
    c = installed.container
    assert c.run("systemctl", "is-enabled", "tailsfwd.service").stdout.strip() == "enabled"
    at_network_pre = json.loads(c.run("cat", PROBE_FILE).stdout)["nftables"]
    assert "lockdown" not in json.dumps(at_network_pre)
    assert verify.canonical(at_network_pre) == verify.canonical(c.ruleset())
    # Installed by postinst before the boot, rewritten in place since.
    assert c.run("test", "-f", "/etc/resolv-over-clearnet.conf", check=False).returncode == 0


def test_the_daemon_runs_on_debians_python_and_answers_on_the_bus(installed: Installed) -> None:
    c = installed.container
    cmdline = c.run("cat", f"/proc/{main_pid(c)}/cmdline").stdout.split("\0")
    assert cmdline[:2] == ["/usr/bin/python3", "/usr/bin/tailsfwd"], cmdline
    version = c.run(
        "/usr/bin/python3", "-c", "from dbus_fast.__version__ import __version__ as v; print(v)"
    )
    assert version.stdout.startswith("1.84"), version.stdout  # Debian 12's, not the venv's
    code, data = status(c)
    assert code == summary.OK, data
    assert (data["daemon"]["running"], data["daemon"]["source"]) == (True, "D-Bus"), data
    owner = c.run("busctl", "--system", "status", "org.boum.tails.Firewall").stdout
    assert f"PID={main_pid(c)}" in owner


def test_the_man_page_and_the_unit_as_installed(installed: Installed) -> None:
    c = installed.container
    page = c.run("man", "-P", "cat", "tailsfwd").stdout
    assert "tailsfwd" in page and "SYNOPSIS" in page
    c.run("systemd-analyze", "verify", "/lib/systemd/system/tailsfwd.service")


def restart_without_a_gap(c: Container, *command: str) -> None:
    """`command` restarts tailsfwd, and the kernel's tables, listed all along,
    never lack the policy's ruleset."""
    old = main_pid(c)
    watch = Watch(c)
    c.run(*command, timeout=300)
    c.wait(f"restarted by {command[0]}", lambda: restarted(c, old))
    checks, gaps = watch.stop()
    assert gaps == [] and checks > 10
    assert status(c)[0] == summary.OK


def test_reload_and_restart_keep_the_rules_in_force(installed: Installed) -> None:
    c = installed.container
    watch = Watch(c)
    c.run("systemctl", "reload", "tailsfwd.service")
    c.wait("reload counted", lambda: json.loads(c.run("cat", "/run/tailsfw/status.json").stdout)
           ["counters"]["reloads"] == 1)  # fmt: skip
    assert watch.stop()[1] == []
    restart_without_a_gap(c, "systemctl", "restart", "tailsfwd.service")


def test_an_upgrade_restarts_the_daemon_with_the_rules_in_force_throughout(
    installed: Installed,
) -> None:
    restart_without_a_gap(installed.container, "dpkg", "-i", DEB)


def test_removal_leaves_the_ruleset_and_says_so_purge_leaves_no_file(
    installed: Installed,
) -> None:
    c = installed.container
    package_files = set(c.run("dpkg", "-L", "tailsfw").stdout.split())
    removed = c.run("dpkg", "-r", "tailsfw", timeout=300)
    assert "ruleset stays in force" in removed.stdout
    assert not active(c)
    assert policy_in_force(c)
    c.run("dpkg", "--purge", "tailsfw", timeout=300)
    assert policy_in_force(c)
    for made in ("/run/tailsfw", "/etc/resolv-over-clearnet.conf"):
        assert c.run("test", "-e", made, check=False).returncode != 0, made
    # The package's files were all written in the upper layer: none is left.
    left = written(installed.upper, installed.before)
    unexplained = sorted(
        p for p in left if not p.startswith(NOT_THE_PACKAGES) and p not in installed.boot_made
    )
    assert unexplained == [], "\n".join(unexplained)
    assert {p.lstrip("/") for p in package_files} & left == set()
    assert any(p.startswith("/usr/lib/python3/dist-packages/tailsfw/") for p in package_files)


def install(destdir: Path, *settings: str) -> set[str]:
    """`make install` into `destdir`: the files it made, relative."""
    done = subprocess.run(
        ["make", "-s", "install", f"DESTDIR={destdir}", *settings], cwd=REPO,
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return {p for p in files(destdir) if not (destdir / p).is_dir()}


# What the package has and `make install` has not (Debian's own), and what
# pip adds (its own records).
DEBIAN_ONLY = {"usr/share/doc/tailsfw/changelog", "usr/share/doc/tailsfw/copyright"}
PIP_ONLY = {"INSTALLER", "REQUESTED", "direct_url.json"}


def test_make_install_installs_the_files_of_the_package(deb: Path, tmp_path: Path) -> None:
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
    packaged = {
        line.split()[-1].removeprefix("./").removesuffix(".gz")
        for line in listing.splitlines()
        if not line.startswith("d")
    }
    made = install(tmp_path / "usr", "PREFIX=/usr", "UNITDIR=/lib/systemd/system")
    assert {p for p in made if p.rsplit("/", 1)[-1] not in PIP_ONLY} == packaged - DEBIAN_ONLY
    # Elsewhere, the unit runs what is installed under that prefix.
    made = install(tmp_path / "opt", "PREFIX=/opt/tfw")
    unit = (tmp_path / "opt/opt/tfw/lib/systemd/system/tailsfwd.service").read_text()
    commands = [line.split("=", 1)[1].split()[0] for line in unit.splitlines()
                if line.startswith(("ExecStart=", "ExecStartPre="))]  # fmt: skip
    assert commands == ["/opt/tfw/libexec/tailsfw/fail-closed", "/opt/tfw/bin/tailsfwd"]
    assert all(c.lstrip("/") in made for c in commands), made
