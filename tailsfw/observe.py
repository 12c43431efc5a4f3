"""What `tailsfwctl status` and `reload` look at, and the one call they make.

- the daemon: its properties over D-Bus; else its status.json, but only
  when the pid in it is alive, is tailsfwd, and wrote that file (a file
  left by a dead daemon, or older than the process now holding the pid, is
  no daemon at all);
- the kernel (root only): the tailsfw tables, compared with the policy's
  ruleset and the lockdown ruleset, each loaded into a scratch network
  namespace and listed back by the same nft;
- the policy: compiled with the facts of now (accounts, on-link networks).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dbus_fast import BusType, ErrorType, Message, MessageType
from dbus_fast.aio import MessageBus

from . import compiler, policy, summary, users
from .droplog import DropCounters
from .facts import Facts
from .netlink import NetlinkSource, Snapshot
from .nft import Nft, NftError, scratch_namespace
from .service import BUS_NAME, INTERFACE, OBJECT_PATH, properties
from .status import Counters, Status
from .sysctl import SysctlState

DEFAULT_STATE_FILE = Path("/run/tailsfw/status.json")
BUS_TIMEOUT = 3.0
# Seconds of slack between the boot-relative start time and the wall clock.
START_SLACK = 1.0
DAEMON_NAMES = (b"tailsfwd", b"tailsfw.daemon")


class ControlError(RuntimeError):
    """A call to the daemon failed; `code` is tailsfwctl's exit status for it."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# -- the daemon ----------------------------------------------------------------


async def _call(address: str | None, member: str, signature: str, body: list[Any]) -> Message:
    try:
        bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
    except OSError as e:
        raise ControlError(
            summary.NO_DAEMON, f"tailsfwd is not on the bus: no system bus ({e.strerror})"
        ) from e
    try:
        interface = INTERFACE if member == "Reload" else "org.freedesktop.DBus.Properties"
        message = Message(
            destination=BUS_NAME, path=OBJECT_PATH, interface=interface,
            member=member, signature=signature, body=body,
        )  # fmt: skip
        reply = await asyncio.wait_for(bus.call(message), BUS_TIMEOUT)
    except TimeoutError:
        raise ControlError(summary.NO_DAEMON, "tailsfwd does not answer on the bus") from None
    finally:
        bus.disconnect()
    assert reply is not None
    if reply.message_type == MessageType.ERROR:
        raise control_error(reply.error_name or "", str(reply.body[0] if reply.body else ""))
    return reply


def control_error(name: str, text: str) -> ControlError:
    if name in (ErrorType.SERVICE_UNKNOWN.value, ErrorType.NAME_HAS_NO_OWNER.value):
        return ControlError(summary.NO_DAEMON, "tailsfwd is not running (not on the bus)")
    if name == ErrorType.ACCESS_DENIED.value:
        return ControlError(summary.NO_PERMISSION, f"not allowed: {text} (root only)")
    return ControlError(summary.FAILED, text or name)


def reload(address: str | None = None) -> None:
    """Ask the daemon to adopt its policy again; ControlError if it did not."""
    asyncio.run(_call(address, "Reload", "", []))


def daemon_from_bus(address: str | None = None) -> dict[str, Any]:
    reply = asyncio.run(_call(address, "GetAll", "s", [INTERFACE]))
    return {name: variant.value for name, variant in reply.body[0].items()}


def status_from_json(data: dict[str, Any]) -> Status:
    """A Status from its status.json form; fields unknown to this version are left out."""
    names = {f.name for f in dataclasses.fields(Status)}
    values = {k: v for k, v in data.items() if k in names}
    values["counters"] = Counters(**data.get("counters", {}))
    values["sysctls"] = [SysctlState(**s) for s in data.get("sysctls", [])]
    values["interfaces"] = {int(k): v for k, v in data.get("interfaces", {}).items()}
    values["drops"] = DropCounters(**data.get("drops", {}))
    return Status(**values)


def process_started(pid: int, proc: Path = Path("/proc")) -> float:
    """When a process started, in seconds since the epoch (to the second)."""
    fields = (proc / str(pid) / "stat").read_text().rpartition(")")[2].split()
    ticks = int(fields[19])  # field 22, counted from after the command name
    boot = next(
        int(line.split()[1])
        for line in (proc / "stat").read_text().splitlines()
        if line.startswith("btime ")
    )
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def not_running(pid: int, updated: float, path: Path, proc: Path = Path("/proc")) -> str:
    """Why the daemon that wrote `path` is not running, or "" if it is."""
    try:
        argv = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
        started = process_started(pid, proc)
    except (OSError, ValueError, IndexError, StopIteration):
        return f"pid {pid} of {path} has exited"
    if not any(Path(a.decode(errors="replace")).name.encode() in DAEMON_NAMES for a in argv):
        return f"pid {pid} of {path} is not tailsfwd"
    if started > updated + START_SLACK:
        return f"{path} is older than process {pid}: stale"
    return ""


def daemon_from_file(path: Path, proc: Path = Path("/proc")) -> tuple[dict[str, Any] | None, str]:
    """The properties from status.json and "status.json", or None and why not."""
    try:
        data = json.loads(path.read_text())
        pid, updated = int(data["pid"]), float(data["updated"])
    except FileNotFoundError:
        return None, f"no {path}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"cannot read {path}: {e}"
    why = not_running(pid, updated, path, proc)
    if why:
        return None, why
    try:
        return properties(status_from_json(data)), f"{path}"
    except (TypeError, ValueError, AttributeError) as e:
        return None, f"{path} is not a status file of this version: {e}"


def daemon(address: str | None, state_file: Path) -> tuple[dict[str, Any] | None, str]:
    """The running daemon's properties and where they came from, or None and why."""
    try:
        return daemon_from_bus(address), "D-Bus"
    except ControlError as bus_error:
        found, source = daemon_from_file(state_file)
        return found, source if found is not None else f"{bus_error}; {source}"


# -- the policy and the kernel -------------------------------------------------


def connected_now() -> frozenset[ipaddress.IPv4Network]:
    async def first() -> Snapshot:
        snapshots = NetlinkSource().snapshots()
        try:
            return await anext(snapshots)
        finally:
            await snapshots.aclose()  # type: ignore[attr-defined]

    return asyncio.run(first()).connected


def compile_now(path: Path, dns: list[str]) -> compiler.Ruleset:
    """The policy's ruleset with the facts of now; PolicyError if it is broken."""
    pol = policy.load(path)
    connected = connected_now() if pol.lan.mode == "connected" else frozenset()
    facts = Facts(
        uids=users.lookup_uids(pol),
        connected=connected,
        dns=tuple(ipaddress.IPv4Address(a) for a in dns),
    )
    return compiler.compile_policy(pol, facts)


def ours(listing: list[dict[str, Any]]) -> list[Any]:
    """The tailsfw tables of a listing, without what changes as it runs (handles, counts)."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: 0 if k in ("packets", "bytes") else clean(v)
                for k, v in value.items()
                if k != "handle"
            }
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    kept = []
    for obj in listing:
        body = next(iter(obj.values()))
        if isinstance(body, dict) and compiler.TABLE in (body.get("table"), body.get("name")):
            kept.append(clean(obj))
    return kept


def scratch_listing(ruleset: compiler.Ruleset) -> list[Any]:
    """The listing nft gives back for `ruleset`, loaded in a throw-away network namespace."""
    done = subprocess.run(
        [*scratch_namespace(), "sh", "-c", "nft -j -f - && nft -j list ruleset"],
        input=ruleset.to_json(), capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise NftError(f"cannot load the ruleset in a scratch namespace: {done.stderr.strip()}")
    return ours(json.loads(done.stdout)["nftables"])


def kernel(expected: compiler.Ruleset | None) -> tuple[summary.Kernel | None, str]:
    """The kernel's tailsfw tables and whose ruleset they are (root only)."""
    if os.geteuid() != 0:
        return None, "only root can read the kernel's tables"
    try:
        held = ours(Nft().list_ruleset())
        families = tuple(sorted({o["table"]["family"] for o in held if "table" in o}))
        how = "the kernel's tables compared with the ruleset listed back from a scratch namespace"
        if not families:
            return summary.Kernel((), summary.NONE), how
        candidates: list[tuple[str, Callable[[], compiler.Ruleset]]] = [
            (summary.LOCKDOWN, compiler.lockdown)
        ]
        if expected is not None:
            candidates.insert(0, (summary.POLICY, lambda: expected))
        for holds, ruleset in candidates:
            if held == scratch_listing(ruleset()):
                return summary.Kernel(families, holds), how
        return summary.Kernel(families, summary.OTHER), how
    except NftError as e:
        return None, str(e)


def observe(
    policy_path: Path | None, default_policy: Path, address: str | None, state_file: Path
) -> summary.Observation:
    """Without --policy, the policy the daemon runs (or the default one) is compared."""
    found, source = daemon(address, state_file)
    path = policy_path or (Path(found["PolicyPath"]) if found else default_policy)
    expected: compiler.Ruleset | None = None
    error = ""
    try:
        expected = compile_now(path, found["ClearnetDns"] if found else [])
    except policy.PolicyError as e:
        error = str(e)
    held, note = kernel(expected)
    return summary.Observation(
        policy_path=str(path),
        expected=expected.digest() if expected else "",
        policy_error=error,
        daemon=found,
        daemon_source=source,
        kernel=held,
        kernel_note=note,
    )
