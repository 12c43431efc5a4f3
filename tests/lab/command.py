"""The lab's one way to run a command: as root, here or in a named network
namespace, with sbin on PATH, raising `LabError` (with its stderr) on failure.

The paths every lab part shares (the repository, its venv's interpreter,
Debian's own interpreter for the standalone scripts) live here too.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The shared venv, editable-installed: run with cwd=REPO, `-m` imports this checkout's code.
VENV_PYTHON = str(REPO / ".venv" / "bin" / "python")
PYTHON = "/usr/bin/python3"  # Debian's: the standalone scripts need nothing else
# The tools live in sbin, which a non-login environment may not have on PATH.
COMMAND_PATH = os.pathsep.join(
    [os.environ.get("PATH", os.defpath), "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
)


class LabError(RuntimeError):
    """A lab command failed; the message carries its stderr."""


def command_env() -> dict[str, str]:
    return {**os.environ, "PATH": COMMAND_PATH}


def netns_exec(namespace: str) -> list[str]:
    """The prefix that runs a command in a named namespace (`ip netns exec`
    execs in place: the pid is the command's)."""
    return ["ip", "netns", "exec", namespace]


def run(
    argv: Sequence[str],
    *,
    input: str | None = None,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """Runs a command, raising LabError (with its stderr) if it fails."""
    try:
        done = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=command_env(),
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{shlex.join(argv)}: no exit within {timeout} s") from exc
    if done.returncode != 0:
        raise LabError(
            f"{shlex.join(argv)} exited with {done.returncode}: "
            f"{done.stderr.strip() or done.stdout.strip() or '(no output)'}"
        )
    return done


def ns_run(
    namespace: str, argv: Sequence[str], *, input: str | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """`run` inside a named network namespace."""
    return run([*netns_exec(namespace), *argv], input=input, timeout=timeout)


AS_NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")


def tailsfwctl_in(
    namespace: str, *argv: str, nobody: bool = False
) -> subprocess.CompletedProcess[str]:
    """This tree's tailsfwctl in a named namespace, as root or as `nobody`
    (never raises on exit codes)."""
    return subprocess.run(
        [*netns_exec(namespace), *(AS_NOBODY if nobody else ()), VENV_PYTHON, "-m",
         "tailsfw.cli", *argv],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO, env=command_env(),
    )  # fmt: skip
