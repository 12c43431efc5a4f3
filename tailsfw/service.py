"""The D-Bus face of tailsfwd: read-only properties and Reload(), over `Control`.

Name `org.boum.tails.Firewall`, object `/org/boum/tails/Firewall`, interface
`org.boum.tails.Firewall1`.  Every property comes from one `Status` value
through `properties()` (pure); `PropertiesChanged` carries what differs from
the last value published.  `Reload()` calls the same `Control.reload()` as
SIGHUP.  Who may own the name and call Reload is the bus's business: see
etc/dbus-1/system.d/org.boum.tails.Firewall.conf.

The firewall never waits for the bus: tailsfwd starts before dbus does, so
`keep_serving()` connects when the bus appears and again after it restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from dbus_fast import BusType, DBusError, NameFlag, PropertyAccess, RequestNameReply
from dbus_fast.aio import MessageBus

# `method` is dbus_method in dbus-fast >= 2, kept there as an alias: 1.84 has only `method`.
from dbus_fast.service import ServiceInterface, dbus_property
from dbus_fast.service import method as dbus_method

from .buswrite import patient
from .status import Status

if TYPE_CHECKING:  # the readers of properties() need none of the daemon
    from .control import ControlApi

log = logging.getLogger("tailsfwd")

BUS_NAME = "org.boum.tails.Firewall"
OBJECT_PATH = "/org/boum/tails/Firewall"
INTERFACE = "org.boum.tails.Firewall1"
ERROR_RELOAD_REFUSED = f"{INTERFACE}.ReloadRefused"
# How often keep_serving() tries again while there is no bus (early boot).
RETRY_DELAY = 2.0

READ = PropertyAccess.READ
Method = TypeVar("Method", bound=Callable[..., Any])


def signature(dbus_type: str) -> Callable[[Method], Method]:
    """Gives a method its D-Bus type as the return annotation every dbus-fast
    reads: a string constant.  Debian 12's python3-dbus-fast (1.84) reads only
    that (dbus_fast.annotations came with 2.x); the Python return type stays
    for mypy.  Put it below @dbus_property/@dbus_method, which read it."""

    def mark(method: Method) -> Method:
        method.__annotations__["return"] = repr(dbus_type)
        return method

    return mark


class ServiceError(RuntimeError):
    """The service could not be put on the bus; the message says why."""


def usec(seconds: float) -> int:
    """A wall-clock time as D-Bus time values go (systemd's): µs since the epoch, 0 unknown."""
    return max(0, round(seconds * 1_000_000))


def properties(status: Status) -> dict[str, Any]:
    """The interface's properties, by D-Bus name, from one Status value.

    The drop counters are not in Status yet: until they are, they read as
    empty (a client sees the property, with nothing counted).
    """
    counters = dict(vars(status.counters))
    counters["netlink_reads"] = status.netlink_reads
    return {
        "State": status.state,
        "StatusLine": status.line(),
        "Pid": status.pid,
        "RunningSince": usec(status.running_since),
        "PolicyPath": status.policy,
        "RulesetDigest": status.ruleset,
        "LanMode": status.lan_mode,
        "Connected": list(status.connected),
        "Interfaces": dict(status.interfaces),
        "LastApply": usec(status.last_apply),
        "LastApplyCause": status.last_apply_cause,
        "LastError": status.last_error,
        "Warnings": list(status.warnings),
        "ClearnetDns": list(status.clearnet_dns),
        "DnsRefused": list(status.dns_refused),
        "NetworkManager": status.networkmanager,
        "Sysctls": [[s.name, s.wanted or "", s.actual or "", s.ok, s.note] for s in status.sysctls],
        "Counters": counters,
        "DropsByUser": dict(status.drops.by_user),
        "DropsByReason": dict(status.drops.by_reason),
        "Failing": dict(status.failing),
        "Namespaces": [[n.name, n.present, n.in_force, n.note] for n in status.namespaces],
    }


def changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in new.items() if old.get(name) != value}


class FirewallInterface(ServiceInterface):
    def __init__(self, control: ControlApi) -> None:
        super().__init__(INTERFACE)
        self._control = control
        # Read and subscribed in one step of the loop: no change falls between.
        self._values = properties(control.status())
        control.subscribe(self.update)

    def update(self, status: Status) -> None:
        """A new status was published: signal what changed."""
        new = properties(status)
        diff = changed(self._values, new)
        self._values = new
        if not diff:
            return
        try:
            self.emit_properties_changed(diff)
        except Exception as e:  # the bus's trouble must never reach the daemon's loop
            log.warning("D-Bus: cannot signal the change: %s", e)

    @dbus_method()
    @signature("b")
    def Reload(self) -> bool:
        """Adopt the policy file again; an error, naming why, if refused."""
        if self._control.reload():
            return True
        why = self._control.status().last_error or "the daemon refused it"
        raise DBusError(ERROR_RELOAD_REFUSED, f"{why}; the ruleset and the policy in force stay")

    def _get(self, name: str) -> Any:
        return self._values[name]

    # Read-only properties, each the value of properties() under its name.
    @dbus_property(access=READ)
    @signature("s")
    def State(self) -> str:
        return str(self._get("State"))

    @dbus_property(access=READ)
    @signature("s")
    def StatusLine(self) -> str:
        return str(self._get("StatusLine"))

    @dbus_property(access=READ)
    @signature("u")
    def Pid(self) -> int:
        return int(self._get("Pid"))

    @dbus_property(access=READ)
    @signature("t")
    def RunningSince(self) -> int:
        return int(self._get("RunningSince"))

    @dbus_property(access=READ)
    @signature("s")
    def PolicyPath(self) -> str:
        return str(self._get("PolicyPath"))

    @dbus_property(access=READ)
    @signature("s")
    def RulesetDigest(self) -> str:
        return str(self._get("RulesetDigest"))

    @dbus_property(access=READ)
    @signature("s")
    def LanMode(self) -> str:
        return str(self._get("LanMode"))

    @dbus_property(access=READ)
    @signature("as")
    def Connected(self) -> list[str]:
        return list(self._get("Connected"))

    @dbus_property(access=READ)
    @signature("a{us}")
    def Interfaces(self) -> dict[int, str]:
        return dict(self._get("Interfaces"))

    @dbus_property(access=READ)
    @signature("t")
    def LastApply(self) -> int:
        return int(self._get("LastApply"))

    @dbus_property(access=READ)
    @signature("s")
    def LastApplyCause(self) -> str:
        return str(self._get("LastApplyCause"))

    @dbus_property(access=READ)
    @signature("s")
    def LastError(self) -> str:
        return str(self._get("LastError"))

    @dbus_property(access=READ)
    @signature("as")
    def Warnings(self) -> list[str]:
        return list(self._get("Warnings"))

    @dbus_property(access=READ)
    @signature("as")
    def ClearnetDns(self) -> list[str]:
        return list(self._get("ClearnetDns"))

    @dbus_property(access=READ)
    @signature("as")
    def DnsRefused(self) -> list[str]:
        return list(self._get("DnsRefused"))

    @dbus_property(access=READ)
    @signature("s")
    def NetworkManager(self) -> str:
        return str(self._get("NetworkManager"))

    @dbus_property(access=READ)
    # name, wanted, actual, ok, note ("" for a value the kernel does not have)
    @signature("a(sssbs)")
    def Sysctls(self) -> list[list[Any]]:
        return list(self._get("Sysctls"))

    @dbus_property(access=READ)
    @signature("a{st}")
    def Counters(self) -> dict[str, int]:
        return dict(self._get("Counters"))

    @dbus_property(access=READ)
    @signature("a{st}")
    def DropsByUser(self) -> dict[str, int]:
        return dict(self._get("DropsByUser"))

    @dbus_property(access=READ)
    @signature("a{st}")
    def DropsByReason(self) -> dict[str, int]:
        return dict(self._get("DropsByReason"))

    @dbus_property(access=READ)
    @signature("a{ss}")
    def Failing(self) -> dict[str, str]:
        return dict(self._get("Failing"))

    @dbus_property(access=READ)
    # name, present, guest side in force, why not ("" when in force or absent)
    @signature("a(sbbs)")
    def Namespaces(self) -> list[list[Any]]:
        return list(self._get("Namespaces"))


@dataclass
class Service:
    """The interface on a bus connection that owns the name."""

    bus: MessageBus
    interface: FirewallInterface

    async def wait_closed(self) -> str:
        """Until the connection ends; why it ended."""
        try:
            await self.bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
        except Exception as e:  # the bus went away: EOFError, ConnectionResetError...
            return f"{type(e).__name__} {e}".strip()
        return "closed"

    def close(self) -> None:
        """Detach the interface (it serves the next connection) and hang up."""
        # Hung up first: unexport then has no one to announce the removal to
        # (on a dead connection, announcing it would fail in the background).
        self.bus.disconnect()
        with contextlib.suppress(Exception):
            self.bus.unexport(OBJECT_PATH, self.interface)


def describe_address(address: str | None) -> str:
    return address or "the system bus"


async def serve(interface: FirewallInterface, address: str | None = None) -> Service:
    """Connect, export the object and own the name; ServiceError if any step fails."""
    bus = MessageBus(bus_address=address, bus_type=BusType.SYSTEM)
    try:
        await bus.connect()
    except Exception as e:  # the socket is missing, refused, or auth failed
        raise ServiceError(f"cannot connect to {describe_address(address)}: {e}") from e
    patient(bus)  # a stalled bus must not drop us (tailsfw/buswrite.py)
    try:
        bus.export(OBJECT_PATH, interface)
        try:
            reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        except DBusError as e:
            raise ServiceError(
                f"cannot own the bus name {BUS_NAME} on {describe_address(address)}: {e.text}"
            ) from e
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            raise ServiceError(
                f"cannot own the bus name {BUS_NAME} on {describe_address(address)}:"
                " another process owns it"
            )
    except BaseException:
        bus.disconnect()
        raise
    return Service(bus, interface)


async def keep_serving(
    control: ControlApi, address: str | None = None, retry: float = RETRY_DELAY
) -> None:
    """Stay on the bus for as long as the daemon runs; never raises for the bus's faults.

    Tries again every `retry` seconds while there is no bus (early boot, a
    restarted dbus) or the name cannot be had; each new reason is logged once.
    """
    interface = FirewallInterface(control)  # one for every connection: one subscription
    last = ""
    while True:
        try:
            service = await serve(interface, address)
        except ServiceError as e:
            if str(e) != last:
                log.warning("D-Bus: %s; trying again every %s s", e, retry)
                last = str(e)
            await asyncio.sleep(retry)
            continue
        log.info("D-Bus: %s on %s", BUS_NAME, describe_address(address))
        last = ""
        try:
            why = await service.wait_closed()
        finally:
            service.close()
        log.warning("D-Bus: disconnected from %s (%s)", describe_address(address), why)
