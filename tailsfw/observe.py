"""What `tailsfwctl status`, `verify` and `reload` look at, and the one call they make.

- the daemon: its properties over D-Bus; else its status.json, believed
  only as tailsfw/statusfile.py says (strict, fresh, written by the real
  tailsfwd).  A daemon that is on the bus but does not answer is not a
  running daemon, and its file is not read;
- the kernel (root only): the tailsfw tables, compared with the policy's
  ruleset and the lockdown ruleset by tailsfw/verify.py (the comparison the
  daemon and `verify` make too); and inside each policy namespace present,
  its guest ruleset and settings compared the same way;
- the policy: compiled with the facts of now (tailsfw/now.py).

Each piece is imported only when it is needed: the D-Bus library when there
is a bus to ask, the compiler when there is something to compare with.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import summary

if TYPE_CHECKING:
    from dbus_fast import Message

    from .compiler import Ruleset
    from .nspolicy import Namespace

BUS_TIMEOUT = 3.0
SYSTEM_BUS = "unix:path=/var/run/dbus/system_bus_socket"  # as D-Bus defines it


class ControlError(RuntimeError):
    """A call to the daemon failed; `code` is tailsfwctl's exit status for it."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class NoAnswer(ControlError):
    """tailsfwd holds its name on the bus but did not answer in time."""


# -- the daemon ----------------------------------------------------------------


def missing_socket(address: str | None) -> str:
    """The socket file of a `unix:path=` bus address when it does not exist, else ""."""
    address = address or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or SYSTEM_BUS
    kind, _, rest = address.partition(":")
    keys = dict(pair.partition("=")[::2] for pair in rest.split(","))
    path = keys.get("path", "")
    if kind != "unix" or ";" in address or not path or os.path.lexists(path):
        return ""
    return path


async def _call(address: str | None, member: str) -> Message:
    import asyncio

    from dbus_fast import BusType, Message, MessageType
    from dbus_fast.aio import MessageBus

    from .service import BUS_NAME, INTERFACE, OBJECT_PATH

    try:
        bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
    except OSError as e:
        raise ControlError(
            summary.NO_DAEMON, f"tailsfwd is not on the bus: no system bus ({e.strerror})"
        ) from e
    try:
        if member == "Reload":
            interface, signature, body = INTERFACE, "", []
        else:  # GetAll: every property of the interface
            interface, signature, body = "org.freedesktop.DBus.Properties", "s", [INTERFACE]
        message = Message(
            destination=BUS_NAME, path=OBJECT_PATH, interface=interface,
            member=member, signature=signature, body=body,
        )  # fmt: skip
        reply = await asyncio.wait_for(bus.call(message), BUS_TIMEOUT)
    except TimeoutError:
        raise NoAnswer(
            summary.NO_DAEMON, f"{summary.NO_ANSWER} on the bus ({BUS_TIMEOUT:g} s)"
        ) from None
    finally:
        bus.disconnect()
    assert reply is not None
    if reply.message_type == MessageType.ERROR:
        raise control_error(reply.error_name or "", str(reply.body[0] if reply.body else ""))
    return reply


def call(address: str | None, member: str) -> Message:
    """Reload or GetAll, called on tailsfwd; ControlError if it did not answer."""
    if socket := missing_socket(address):
        raise ControlError(
            summary.NO_DAEMON, f"tailsfwd is not on the bus: no system bus (no {socket})"
        )
    import asyncio

    return asyncio.run(_call(address, member))


def control_error(name: str, text: str) -> ControlError:
    from dbus_fast import ErrorType

    if name in (ErrorType.SERVICE_UNKNOWN.value, ErrorType.NAME_HAS_NO_OWNER.value):
        return ControlError(summary.NO_DAEMON, "tailsfwd is not running (not on the bus)")
    if name == ErrorType.ACCESS_DENIED.value:
        return ControlError(summary.NO_PERMISSION, f"not allowed: {text} (root only)")
    return ControlError(summary.FAILED, text or name)


def reload(address: str | None = None) -> None:
    """Ask the daemon to adopt its policy again; ControlError if it did not."""
    call(address, "Reload")


def daemon_from_bus(address: str | None = None) -> dict[str, Any]:
    reply = call(address, "GetAll")
    return {name: variant.value for name, variant in reply.body[0].items()}


def daemon(address: str | None, state_file: Path) -> tuple[dict[str, Any] | None, str]:
    """The running daemon's properties and where they came from, or None and why."""
    try:
        return daemon_from_bus(address), "D-Bus"
    except NoAnswer as e:
        return None, str(e)  # on the bus and silent: frozen or stuck, not running
    except ControlError as bus_error:
        from . import statusfile

        try:
            found = statusfile.daemon_status(state_file)
        except statusfile.StatusFileError as e:
            return None, f"{bus_error}; {e}"
        from .service import properties  # the D-Bus library: only for a file believed

        return properties(found), str(state_file)


# -- the policy and the kernel -------------------------------------------------


def expected(path: Path, found: dict[str, Any] | None) -> tuple[Ruleset, Sequence[Namespace]]:
    """The policy's ruleset with the facts of now, and the running daemon's
    DNS servers, and its namespaces; PolicyError if the policy is broken."""
    from . import compiler, now, policy

    pol = policy.load(path)
    return compiler.compile_policy(pol, now.facts(pol, found["ClearnetDns"] if found else ())), (
        pol.namespaces
    )


@dataclass(frozen=True)
class NetnsPlace:
    """Where the namespace files are: `directory`/`prefix`NAME (as tailsfwd's options)."""

    directory: Path | None = None  # None: /run/netns
    prefix: str = ""


def guests(namespaces: Sequence[Namespace], place: NetnsPlace) -> tuple[summary.Guest, ...]:
    """Each policy namespace, and if present its guest side read from inside
    it (root only: a thread enters it; this thread never does) and compared
    with nsrules' as verify compares the host's tables."""
    from . import nsrules, verify
    from .netnsfiles import NETNS_DIR, in_threads, present

    directory = place.directory or NETNS_DIR
    files, _ = present(directory, place.prefix)
    here = [ns for ns in namespaces if ns.name in files]
    inside: dict[str, tuple[list[dict[str, Any]], dict[str, str]] | Exception] = {}
    wanted: list[tuple[str, str]] = []
    if here:  # what enters and reads a guest, only when one is there
        from .guests import read_guest
        from .sysctl import sysctl_name

        read = in_threads(lambda ns: read_guest(directory / (place.prefix + ns.name)), here)
        inside = dict(zip((ns.name for ns in here), read, strict=True))
        wanted = [(sysctl_name(parts), value) for parts, value in nsrules.GUEST_SETTINGS]
    found: list[summary.Guest] = []
    for ns in namespaces:
        got = inside.get(ns.name)
        if got is None:
            found.append(summary.Guest(ns.name, present=False, in_force=False))
        elif isinstance(got, Exception):
            found.append(summary.Guest(ns.name, True, False, note=f"cannot look inside: {got}"))
        else:
            listing, values = got
            differs = verify.differences(listing, nsrules.guest_ruleset(ns))
            differs += verify.settings_differences(wanted, values)
            found.append(summary.Guest(ns.name, True, not differs, tuple(differs)))
    return tuple(found)


def kernel(wanted: Ruleset | None) -> tuple[summary.Kernel | None, str]:
    """The kernel's tailsfw tables and whose ruleset they are (root only)."""
    if os.geteuid() != 0:
        return None, "only root can read the kernel's tables"
    from . import compiler, verify
    from .nft import Nft, NftError

    try:
        listing = Nft().list_ruleset()
    except NftError as e:
        return None, str(e)
    held = verify.canonical(listing)
    families = tuple(sorted({f for kind, f, _ in held.objects if kind == "table"}))
    how = "the kernel's tables compared with the ruleset, as verify compares them"
    if not held.objects and not held.foreign:
        return summary.Kernel((), summary.NONE), how
    found: list[str] = []
    for holds, ruleset in ((summary.POLICY, wanted), (summary.LOCKDOWN, compiler.lockdown())):
        if ruleset is None:
            continue
        differences = verify.tables_differences(held, verify.canonical(ruleset.objects))
        if not differences:
            return summary.Kernel(families, holds), how
        found = found or differences
    return summary.Kernel(families, summary.OTHER, tuple(found)), how


def observe(
    policy_path: Path | None,
    default_policy: Path,
    address: str | None,
    state_file: Path,
    place: NetnsPlace,
) -> summary.Observation:
    """Without --policy, the policy the daemon runs (or the default one) is compared."""
    found, source = daemon(address, state_file)
    path = policy_path or (Path(found["PolicyPath"]) if found else default_policy)
    wanted: Ruleset | None = None
    namespaces: Sequence[Namespace] = ()
    error = ""
    if found is not None or os.geteuid() == 0:  # else nothing to compare it with
        from . import policy

        try:
            wanted, namespaces = expected(path, found)
        except policy.PolicyError as e:
            error = str(e)
    held, note = kernel(wanted)
    inside = guests(namespaces, place) if held is not None and wanted is not None else None
    return summary.Observation(
        policy_path=str(path),
        expected=wanted.digest() if wanted else "",
        policy_error=error,
        daemon=found,
        daemon_source=source,
        kernel=held,
        kernel_note=note,
        guests=inside,
    )
