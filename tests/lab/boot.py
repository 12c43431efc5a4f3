"""Boot the project's units under a real systemd, in systemd-nspawn.

The container (see ../shared/lab-notes.md) is this machine's /usr on a tmpfs
root (`--volatile=yes`), with its own network namespace (`--private-network`),
its own journald, and only what a target of the test pulls in.  Bound in:
the unit directory (the project's units as installed here, and the test's),
the repository and its venv at their own paths, and the policy.

`boot()` is the part that starts and halts the container, for other roots
too (test_deb.py boots an overlay over this machine's root with the Debian
package installed).

`installed_unit()` makes the installed tailsfwd.service from the shipped one,
substituting only the paths (ExecStart runs this checkout with the venv's
python), so that the units under test are the shipped ones.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.lab.command import REPO
from tests.lab.leftovers import remove_empty_cgroups
from tests.lab.names import temp_prefix
from tests.lab.wait import wait_for

VENV = (REPO / ".venv").resolve()
VENV_PYTHON = VENV / "bin" / "python"
SHIPPED_UNITS = REPO / "systemd"
PREFIX = "tfwboot-"
PROBE_FILE = "/run/tfwboot/at-network-pre.json"
# What a network service meets: a unit ordered only after network-pre.target
# lists the ruleset the moment it starts.
PROBE_UNIT = f"""[Unit]
Description=a network service of the test
DefaultDependencies=no
After=network-pre.target
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'mkdir -p /run/tfwboot && nft -j list ruleset > {PROBE_FILE}'
"""
# Lists the chains every few ms until told to stop; a listing without the full
# ruleset in both families (a chain only the policy's ruleset has) is a gap.
WATCH = """
n=0
while [ ! -e /run/tfwboot/stop ]; do
    chains=$(nft list chains)
    case "$chains" in
        *"table ip tailsfw"*conntracked*"table ip6 tailsfw"*conntracked*) ;;
        *) echo "gap: $chains" ;;
    esac
    n=$((n+1))
done
echo "checks $n"
"""
CGROUP_ROOT = Path("/sys/fs/cgroup")
# This checkout and its venv, as the container's units see them: at a fixed
# path outside /tmp, which the unit's PrivateTmp= would hide (a checkout in
# /tmp, as CI's may be, made the daemon fail at EXEC).
INSTALLED = Path("/opt/tailsfw")


def installed_unit(shipped: str, repo: Path = INSTALLED, venv: Path = INSTALLED / ".venv") -> str:
    """The shipped unit with a checkout's paths (by default as the container
    sees this one); raises if a path to substitute is not found."""
    substitutions = {  # the installed paths in the shipped unit, and what they become
        "/usr/libexec/tailsfw/": f"{repo}/libexec/",
        "ExecStart=/usr/bin/tailsfwd ": f"ExecStart={venv}/bin/python -m tailsfw.tailsfwd ",
    }
    text = shipped
    for old, new in substitutions.items():
        if old not in text:
            raise ValueError(f"the shipped unit has no {old!r} to substitute")
        text = text.replace(old, new)
    # The venv's editable install may point at another checkout: this one first.
    return text.replace("[Service]\n", f"[Service]\nEnvironment=PYTHONPATH={repo}\n", 1)


def installed_units(repo: Path = INSTALLED, venv: Path = INSTALLED / ".venv") -> dict[str, str]:
    return {
        path.name: installed_unit(path.read_text(), repo, venv)
        for path in sorted(SHIPPED_UNITS.glob("*"))
    }


def write_units(directory: Path, units: Mapping[str, str]) -> None:
    """Unit files (and drop-ins, as "NAME.d/FILE.conf") into a unit directory."""
    for name, text in units.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


class BootError(RuntimeError):
    pass


@dataclass
class Container:
    nspawn: subprocess.Popen[bytes]
    init: int  # the container's PID 1, as this machine numbers it
    console: Path

    @property
    def way_in(self) -> list[str]:
        """The prefix that runs a command inside, in all its namespaces."""
        return ["nsenter", "-t", str(self.init), "-a"]

    def run(
        self, *argv: str, check: bool = True, timeout: float = 30, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*self.way_in, *argv],
            capture_output=True, text=True, timeout=timeout, check=False, input=input,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise BootError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
        return done

    def popen(self, *argv: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*self.way_in, *argv],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def show(self, unit: str, prop: str) -> str:
        return self.run("systemctl", "show", "-P", prop, unit).stdout.strip()

    def wait(self, what: str, check: Callable[[], bool], timeout: float = 20) -> float:
        """Polls `check` until true; returns the seconds it took."""
        return wait_for(check, timeout, 0.02, what=what, why=self.console_text)

    def ruleset(self) -> list[dict[str, Any]]:
        listing: list[dict[str, Any]] = json.loads(self.run("nft", "-j", "list", "ruleset").stdout)[
            "nftables"
        ]
        return listing

    def journal(self, *match: str) -> list[dict[str, Any]]:
        out = self.run("journalctl", "--no-pager", "-o", "json", *match, check=False).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def console_text(self) -> str:
        return self.console.read_text(errors="replace")


def container_init(nspawn: int) -> int | None:
    """The container's PID 1: the child of systemd-nspawn, once it is systemd
    (before that, the child is nspawn's own set-up process)."""
    try:
        children = Path(f"/proc/{nspawn}/task/{nspawn}/children").read_text().split()
        if children and Path(f"/proc/{children[0]}/comm").read_text().strip() == "systemd":
            return int(children[0])
    except OSError:
        pass
    return None


@contextlib.contextmanager
def booted(
    units: Mapping[str, str], target: str, binds: Sequence[tuple[str, str]] = ()
) -> Iterator[Container]:
    """A container booted into `target` with `units` installed; halted on exit."""
    with tempfile.TemporaryDirectory(prefix=temp_prefix("boot")) as work:
        unit_dir = Path(work) / "units"
        write_units(unit_dir, units)
        options = [
            "-D", "/", "--volatile=yes",
            f"--bind-ro={unit_dir}:/etc/systemd/system",
            f"--bind-ro={REPO}", f"--bind-ro={VENV}",
            f"--bind-ro={REPO}:{INSTALLED}", f"--bind-ro={VENV}:{INSTALLED}/.venv",
            f"--bind-ro={REPO / 'etc' / 'tailsfw'}:/etc/tailsfw",
            *(f"--bind-ro={src}:{dst}" for src, dst in binds),
        ]  # fmt: skip
        with boot(options, target, Path(work) / "console.log") as container:
            yield container


@contextlib.contextmanager
def boot(options: Sequence[str], target: str, console: Path) -> Iterator[Container]:
    """systemd-nspawn with `options` (the root, binds) booted into `target`,
    in its own network namespace; halted on exit."""
    argv = [
        "systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--private-network",
        *options, "--boot", "--", f"--unit={target}",
    ]  # fmt: skip
    with console.open("wb") as out:
        nspawn = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        deadline = time.monotonic() + 10
        while (init := container_init(nspawn.pid)) is None:
            if nspawn.poll() is not None or time.monotonic() > deadline:
                raise BootError(f"systemd-nspawn did not start:\n{console.read_text()}")
            time.sleep(0.01)
        container = Container(nspawn, init, console)
        container.wait(
            "systemd answers",
            lambda: (
                container.run("systemctl", "is-system-running", check=False).stdout.strip()
                not in ("", "offline", "initializing")
            ),
        )
        yield container
    finally:
        halt(nspawn)
        remove_empty_cgroups()


def active(c: Container) -> bool:
    return c.show("tailsfwd.service", "ActiveState") == "active"


class Watch:
    """The kernel's tables listed continuously inside the container."""

    def __init__(self, c: Container) -> None:
        self.container = c
        c.run("rm", "-f", "/run/tfwboot/stop")
        self.process = c.popen("sh", "-c", WATCH)

    def stop(self) -> tuple[int, list[str]]:
        """(how many listings, the gaps seen)."""
        self.container.run("touch", "/run/tfwboot/stop")
        out, _ = self.process.communicate(timeout=10)
        lines = out.splitlines()
        checks = int(lines[-1].split()[1])
        return checks, [line for line in lines if line.startswith("gap")]


def main_pid(c: Container) -> int:
    return int(c.show("tailsfwd.service", "MainPID"))


def restarted(c: Container, old_pid: int) -> bool:
    return main_pid(c) not in (0, old_pid) and active(c)


def halt(nspawn: subprocess.Popen[bytes]) -> None:
    """SIGTERM to nspawn halts the container cleanly; SIGKILL if it hangs."""
    if nspawn.poll() is None:
        nspawn.send_signal(signal.SIGTERM)
        try:
            nspawn.wait(15)
        except subprocess.TimeoutExpired:
            nspawn.kill()
            nspawn.wait()
