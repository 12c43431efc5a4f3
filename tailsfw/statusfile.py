"""The daemon's status.json, read back by `tailsfwctl status` when the bus cannot tell.

A file is only what someone wrote, so it is believed only when:
- it is a regular file (never a symlink, FIFO or device: opened non-blocking,
  without following), owned by root and writable by nobody else, at most
  MAX_BYTES, and strict JSON with finite numbers of bounded size;
- it is fresh: the daemon rewrites it every HEARTBEAT seconds, so a file
  older than HEARTBEATS of them is from a daemon that stopped, or froze;
- its pid is the daemon's, by what no other process can fake: the process
  runs as root in the tailsfwd.service cgroup (only root can put a process
  there), its executable is this interpreter (where /proc lets us read it:
  root only), and it started before the file was written (a pid reused
  since is another process).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import safefile

if TYPE_CHECKING:  # imported once a file is worth reading: tailsfwctl starts faster
    from .status import Status

MAX_BYTES = 1024 * 1024  # a status is a few KiB
HEARTBEATS = 3  # a file older than this many heartbeats is not a daemon answering
UNIT = "tailsfwd.service"
MAX_PID = 2**22  # the kernel's PID_MAX_LIMIT
MAX_TIME = 2.0**33  # seconds since the epoch (year 2242): beyond, not a time
MAX_DIGITS = 20  # an integer of the status fits in 64 bits
TIMES = ("updated", "running_since", "last_apply")
# Seconds of slack between the boot-relative start time and the wall clock.
START_SLACK = 1.0
PROC = Path("/proc")


class StatusFileError(ValueError):
    """The file is not a status to believe; the message says why, in one line."""


def _number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or abs(value) > 2.0**64:
        raise StatusFileError(f"number {text[:20]} out of range")
    return value


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise StatusFileError(f"integer {text[:20]}... out of range")
    return int(text)


def _constant(text: str) -> Any:
    raise StatusFileError(f"{text} is not a number")


def read(path: Path, owner: int = 0) -> dict[str, Any]:
    """The JSON object in `path`, checked as the module says; StatusFileError if not."""
    try:
        data = safefile.read_regular(path, MAX_BYTES, follow=False, refusal=_untrusted(owner))
    except FileNotFoundError:
        raise StatusFileError(f"no {path}") from None
    except safefile.TooLarge:
        raise StatusFileError(f"{path} is larger than {MAX_BYTES} bytes") from None
    except safefile.Refused as e:
        raise StatusFileError(f"{path} is {e.strerror}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise StatusFileError(f"{path} is a symbolic link") from None
        raise StatusFileError(f"cannot read {path}: {e.strerror}") from None
    try:
        found = json.loads(data, parse_float=_number, parse_int=_integer, parse_constant=_constant)
    except StatusFileError as e:
        raise StatusFileError(f"{path}: {e}") from None
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, or nested too deep
        raise StatusFileError(f"{path} is not JSON: {str(e)[:80]}") from None
    if not isinstance(found, dict):
        raise StatusFileError(f"{path} is not a JSON object")
    _check_fields(path, found)
    _check_shapes(path, found)
    return found


def _untrusted(owner: int) -> Callable[[os.stat_result], str | None]:
    def why(info: os.stat_result) -> str | None:
        if info.st_uid != owner:
            return f"owned by uid {info.st_uid}, not root"
        if info.st_mode & 0o022:
            return f"writable by others (mode {info.st_mode & 0o777:o})"
        return None

    return why


# The plain fields of Status, by their annotation, and what each must hold.
SHAPES: dict[str, type | tuple[type, ...]] = {
    "str": str, "list[str]": list, "int": int, "float": (int, float),
}  # fmt: skip


def _check_fields(path: Path, data: dict[str, Any]) -> None:
    pid = data.get("pid")
    if type(pid) is not int or not 0 < pid <= MAX_PID:
        raise StatusFileError(f"{path}: pid {pid!r} is not a process id")
    for name in TIMES:
        value = data.get(name, 0)
        if type(value) not in (int, float) or not 0 <= value <= MAX_TIME:
            raise StatusFileError(f"{path}: {name} {value!r} is not a time")


def _check_shapes(path: Path, data: dict[str, Any]) -> None:
    from .status import Status

    for f in dataclasses.fields(Status):
        shape = SHAPES.get(str(f.type))
        value = data.get(f.name)
        if value is None or shape is None:
            continue  # absent (a default), or built by its own class
        ok = isinstance(value, shape) and not isinstance(value, bool)
        if ok and f.type == "list[str]":
            ok = all(isinstance(v, str) for v in value)
        if not ok:
            raise StatusFileError(f"{path}: {f.name} is not {f.type}")


def status_from_json(data: dict[str, Any]) -> Status:
    """A Status from its status.json form; fields unknown to this version are left out."""
    from .status import Counters, DropCounters, NamespaceState, Status, SysctlState

    names = {f.name for f in dataclasses.fields(Status)}
    values = {k: v for k, v in data.items() if k in names}
    values["counters"] = Counters(**data.get("counters", {}))
    values["sysctls"] = [SysctlState(**s) for s in data.get("sysctls", [])]
    values["interfaces"] = {int(k): v for k, v in data.get("interfaces", {}).items()}
    values["drops"] = DropCounters(**data.get("drops", {}))
    values["namespaces"] = [NamespaceState(**n) for n in data.get("namespaces", [])]
    return Status(**values)


def process_started(pid: int, proc: Path = PROC) -> float:
    """When a process started, in seconds since the epoch (to the second)."""
    fields = (proc / str(pid) / "stat").read_text().rpartition(")")[2].split()
    ticks = int(fields[19])  # field 22, counted from after the command name
    boot = next(
        int(line.split()[1])
        for line in (proc / "stat").read_text().splitlines()
        if line.startswith("btime ")
    )
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def unit_of(cgroups: str) -> str:
    """The systemd unit of a /proc/PID/cgroup text ("" if none): the first
    `.service` or `.scope` in the path, in the unified hierarchy or systemd's
    own.  Only root makes cgroups there, except in a user's delegated tree,
    which lies under user@UID.service: a user's "tailsfwd.service" is never
    the first unit of its path."""
    for line in cgroups.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers in ("", "name=systemd"):
            units = [p for p in path.split("/") if p.endswith((".service", ".scope"))]
            if units:
                return units[0]
    return ""


def not_the_daemon(pid: int, updated: float, proc: Path = PROC) -> str:
    """Why process `pid` is not the tailsfwd that wrote a status at `updated`, or ""."""
    try:
        started = process_started(pid, proc)
        ids = (proc / str(pid) / "status").read_text()
        unit = unit_of((proc / str(pid) / "cgroup").read_text())
    except (OSError, ValueError, IndexError, StopIteration):
        return f"its pid {pid} has exited"
    if started > updated + START_SLACK:
        return f"it is older than process {pid}: stale"
    uids = next((line.split()[1:3] for line in ids.splitlines() if line.startswith("Uid:")), [])
    if uids != ["0", "0"] or unit != UNIT:
        return f"its pid {pid} is not tailsfwd (not root in {UNIT})"
    try:
        exe = os.readlink(proc / str(pid) / "exe")
    except PermissionError:  # only root may read another user's; the cgroup said enough
        return ""
    except OSError:
        return f"its pid {pid} has exited"
    if exe != os.path.realpath(sys.executable):
        return f"its pid {pid} is not tailsfwd (it runs {exe})"
    return ""


def daemon_status(
    path: Path, now: float | None = None, proc: Path = PROC, owner: int = 0
) -> Status:
    """The status in `path` when a live, answering tailsfwd wrote it; else
    StatusFileError saying why not."""
    data = read(path, owner)
    from .status import HEARTBEAT

    age = (time.time() if now is None else now) - data["updated"]
    if age > HEARTBEATS * HEARTBEAT:
        raise StatusFileError(
            f"{path} was last written {age:.0f} s ago (tailsfwd rewrites it every "
            f"{HEARTBEAT:g} s): tailsfwd is not answering"
        )
    if age < -START_SLACK:
        raise StatusFileError(f"{path} is dated {-age:.0f} s in the future")
    why = not_the_daemon(data["pid"], data["updated"], proc)
    if why:
        raise StatusFileError(f"{path} is no running daemon's: {why}")
    try:
        return status_from_json(data)
    except (TypeError, ValueError, AttributeError) as e:
        raise StatusFileError(f"{path} is not a status file of this version: {e}") from None
