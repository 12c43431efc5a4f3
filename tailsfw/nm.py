"""NetworkManager's DNS servers, from its D-Bus API (dbus-fast, asyncio).

`NetworkManagerSource.events()` yields `DnsServers`: the whole state first,
then a new value only when it changes.  It reads, on the system bus (or a
given address):

    Manager.ActiveConnections -> each Connection.Active (Devices, Default, Vpn)
      -> each Device (Interface, Ip4Config) -> each IP4Config
         (NameserverData, or Nameservers on old versions; DnsPriority)

and puts the servers in NetworkManager's own order (see `ordered`).  Every
value goes through `check_address`: what is not a usable IPv4 address is
refused with a reason and never reaches the list.

Signal matches (NameOwnerChanged for NetworkManager's name, and every
PropertiesChanged it sends) are added before the first read, so no change
falls between the two; any relevant change makes it read everything again.
While NetworkManager or the bus is gone the last good list is yielded with
`available=False`; it is read again when NetworkManager comes back, and the
bus is reconnected with a backoff.  `events()` never raises for their
failures and never blocks the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import struct
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from .buswrite import patient
from .dnsserver import Refused, check_address, show
from .events import DnsServers

log = logging.getLogger(__name__)

NM = "org.freedesktop.NetworkManager"
NM_PATH = "/org/freedesktop/NetworkManager"
ACTIVE = "org.freedesktop.NetworkManager.Connection.Active"
DEVICE = "org.freedesktop.NetworkManager.Device"
IP4 = "org.freedesktop.NetworkManager.IP4Config"
PROPERTIES = "org.freedesktop.DBus.Properties"
DBUS = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"

MAX_SERVERS = 32  # kept; more are refused (glibc reads 3, NetworkManager writes them all)
MAX_REFUSED = 16  # reasons kept in one DnsServers; the rest are counted in one line
MAX_OBJECTS = 64  # active connections / devices read; more are refused
MAX_PATH_SHOWN = 80  # characters of an object path quoted in a refusal
MAX_ENTRIES = 64  # nameserver entries looked at per configuration; more are counted
# NetworkManager's default ipv4.dns-priority (0 on D-Bus means "the default"):
# 100, and 50 for a VPN.
DEFAULT_PRIORITY = 100
DEFAULT_VPN_PRIORITY = 50

# The properties whose change can change the servers, per interface.
RELEVANT: Mapping[str, frozenset[str]] = {
    NM: frozenset({"ActiveConnections"}),
    ACTIVE: frozenset({"Devices", "Default", "Vpn"}),
    DEVICE: frozenset({"Ip4Config", "Interface"}),
    IP4: frozenset({"NameserverData", "Nameservers", "DnsPriority"}),
}
NAME_OWNER_RULE = (
    f"type='signal',sender='{DBUS}',path='{DBUS_PATH}',interface='{DBUS}',"
    f"member='NameOwnerChanged',arg0='{NM}'"
)
# Both the standard org.freedesktop.DBus.Properties signal and the older
# per-interface one NetworkManager used to send are named PropertiesChanged.
# The bus matches `sender` against whoever owns the name at emission time.
PROPERTIES_RULE = (
    f"type='signal',sender='{NM}',member='PropertiesChanged',path_namespace='{NM_PATH}'"
)


# -- pure: the validator and NetworkManager's order ---------------------------


def mistyped(value: Variant, what: str, signature: str) -> Refused | None:
    """A refusal if the value does not have the documented D-Bus type."""
    if value.signature == signature:
        return None
    return Refused(f"{what} of D-Bus type {value.signature!r}, not {signature!r}")


def nameserver_values(props: Mapping[str, Variant]) -> Iterator[object]:
    """An IP4Config's nameservers as they come: address strings, or Refused
    for what does not have the documented D-Bus type.

    `NameserverData` (aa{sv}, each with an "address" string) is used when
    present; old versions only have `Nameservers` (au, each an address in
    network byte order, which as NetworkManager runs on this host is its
    native order).  At most MAX_ENTRIES are looked at, the rest counted in
    one refusal: a configuration of 4,000 entries costs what 64 do.
    """
    data = props.get("NameserverData")
    if isinstance(data, Variant):
        if wrong := mistyped(data, "NameserverData", "aa{sv}"):
            yield wrong
            return
        for entry in data.value[:MAX_ENTRIES]:
            address = entry.get("address")
            if not isinstance(address, Variant):
                yield Refused("a NameserverData entry without an address")
            else:
                yield mistyped(address, "an address", "s") or address.value
        yield from _beyond(len(data.value))
        return
    legacy = props.get("Nameservers")
    if isinstance(legacy, Variant):
        if wrong := mistyped(legacy, "Nameservers", "au"):
            yield wrong
            return
        for number in legacy.value[:MAX_ENTRIES]:
            yield str(ipaddress.IPv4Address(struct.pack("=I", number)))
        yield from _beyond(len(legacy.value))


def _beyond(entries: int) -> Iterator[Refused]:
    if entries > MAX_ENTRIES:
        yield Refused(f"{entries - MAX_ENTRIES} entries over {MAX_ENTRIES} ignored")


@dataclass(frozen=True)
class Config:
    """One IPv4 configuration (a device's, or a VPN's), as read from NetworkManager."""

    interface: str  # the device's interface, or "vpn " and the VPN connection's name
    default: bool  # its active connection holds the default IPv4 route
    props: Mapping[str, Variant]  # the IP4Config's properties
    vpn: bool = False


def dns_priority(config: Config) -> int:
    """ipv4.dns-priority as NetworkManager uses it (0 or absent: the default)."""
    priority = config.props.get("DnsPriority")
    if isinstance(priority, Variant) and priority.signature == "i" and priority.value:
        return int(priority.value)
    return DEFAULT_VPN_PRIORITY if config.vpn else DEFAULT_PRIORITY


def ordered(configs: Sequence[Config]) -> list[Config]:
    """Configurations in the order NetworkManager writes their servers.

    As its DNS manager does: lower `DnsPriority` first (a VPN's default is
    50, anything else's 100: a VPN's servers come first unless a priority
    says otherwise); at equal priority a VPN first, then the one holding the
    default route; then in the order given (active connections in
    `ActiveConnections` order).  If the first has a negative priority, only
    configurations of that same priority are used.
    """
    result = sorted(configs, key=lambda c: (dns_priority(c), not c.vpn, not c.default))
    if result and (first := dns_priority(result[0])) < 0:
        result = [c for c in result if dns_priority(c) == first]
    return result


def dns_servers(configs: Sequence[Config], available: bool = True) -> DnsServers:
    """The checked servers of these configurations, in NetworkManager's order,
    without repeats and at most MAX_SERVERS; every refusal with its reason."""
    servers: list[ipaddress.IPv4Address] = []
    refused = Refusals()
    for config in ordered(configs):
        name = show(config.interface)
        for value in nameserver_values(config.props):
            if len(servers) == MAX_SERVERS:  # full: the rest is only counted
                refused.add(name, f"over {MAX_SERVERS} servers")
                continue
            try:
                if isinstance(value, Refused):
                    raise value
                address = check_address(value)
            except Refused as e:
                refused.add(name, e)
                continue
            if address not in servers:
                servers.append(address)
    return DnsServers(tuple(servers), refused.reasons(), available)


class Refusals:
    """The reasons of one read: the first few as text, the rest only counted
    (a text is built only for what is reported)."""

    def __init__(self, reasons: Iterable[str] = ()) -> None:
        self.kept: list[str] = []
        self.more = 0
        for reason in reasons:
            self.add(reason)

    def add(self, *parts: object) -> None:
        """One reason, the parts joined by ": " (only if it is kept as text)."""
        if len(self.kept) < MAX_REFUSED:
            self.kept.append(": ".join(map(str, parts)))
        else:
            self.more += 1

    def reasons(self) -> tuple[str, ...]:
        if not self.more:
            return tuple(self.kept)
        kept = MAX_REFUSED - 1
        return (*self.kept[:kept], f"and {len(self.kept) - kept + self.more} more values refused")


def relevant(interface: str, names: Iterable[str]) -> bool:
    return not RELEVANT.get(interface, frozenset()).isdisjoint(names)


def signal_is_relevant(msg: Message) -> bool:
    """Whether a PropertiesChanged signal may change the servers.  A body
    that cannot be understood counts as relevant: reading again is safe."""
    try:
        if msg.interface == PROPERTIES:
            interface, changed, invalidated = msg.body
            return relevant(interface, [*changed, *invalidated])
        return relevant(msg.interface or "", msg.body[0])
    except (ValueError, TypeError, IndexError, AttributeError):
        return True


# -- I/O: the bus ---------------------------------------------------------------


class ReadFailed(Exception):
    """NetworkManager answered a call with an error, or not in time."""


class ObjectFailed(ReadFailed):
    """One object answered with an error (it went away, or never was)."""

    def __init__(self, message: str, error_name: str) -> None:
        super().__init__(message)
        self.error_name = error_name


@dataclass
class Session:
    """What one bus connection has learnt from the signals."""

    owner: str | None = None  # NetworkManager's unique name, None if absent
    owner_changes: int = 0


Found = tuple[str, bool, bool, str]  # name, default, vpn, IP4Config path


def connections(
    active: Sequence[tuple[str, dict[str, Variant]]], refused: list[str]
) -> tuple[dict[str, bool], list[Found]]:
    """From the active connections' properties: device -> whether its
    connection holds the default route, and the VPNs' configurations.  A VPN
    lists its parent device, which has its own active connection: the VPN's
    servers are in its own IP4Config."""
    devices: dict[str, bool] = {}
    found: list[Found] = []
    for path, props in active:
        default = bool(typed(props, "Default", "b", refused))
        if typed(props, "Vpn", "b", refused):
            config = typed(props, "Ip4Config", "o", refused)
            name = f"vpn {typed(props, 'Id', 's', refused) or path}"
            if config and config != "/":
                found.append((name, default, True, config))
            continue
        for device in typed(props, "Devices", "ao", refused) or []:
            devices.setdefault(device, default)
    return devices, found


class NetworkManagerSource:
    """The DNS servers NetworkManager holds, followed over D-Bus."""

    name = "networkmanager"

    def __init__(
        self,
        bus_address: str | None = None,
        *,
        call_timeout: float = 5.0,
        first_wait: float = 0.25,
        retry: tuple[float, float] = (0.05, 2.0),
    ) -> None:
        """`bus_address`: a D-Bus address; None: the system bus
        (DBUS_SYSTEM_BUS_ADDRESS, else /var/run/dbus/system_bus_socket).
        `first_wait`: how long the first event may wait for a full read
        before it says "unavailable"; `retry`: first and longest wait
        between attempts after a failure."""
        self.bus_address = bus_address
        self.call_timeout = call_timeout
        self.first_wait = first_wait
        self.retry = retry
        self.reads = 0  # full reads of NetworkManager's state
        self.connects = 0  # connections made to the bus
        self.last_error = ""
        self._value = DnsServers((), (), available=False)
        self._changed = asyncio.Event()

    # -- the consumer side

    async def events(self) -> AsyncGenerator[DnsServers, None]:
        self._changed = asyncio.Event()
        task = asyncio.create_task(self._run(), name="networkmanager")
        try:
            # The first value never waits long for NetworkManager: the
            # daemon's start must not depend on it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self.first_wait)
            last = self._value
            yield last
            while True:
                await self._changed.wait()
                self._changed.clear()
                if self._value != last:
                    last = self._value
                    yield last
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _publish(self, value: DnsServers) -> None:
        # The consumer compares with what it yielded last: waking it for an
        # equal value costs nothing, and lets the first event go out at once.
        self._value = value
        self._changed.set()

    def _unavailable(self, why: str) -> None:
        if self._value.available or why != self.last_error:
            log.warning("NetworkManager: %s: keeping the last DNS servers", why)
        self.last_error = why
        self._publish(DnsServers(self._value.servers, (), available=False))

    # -- the producer side

    async def _run(self) -> None:
        delay = self.retry[0]
        while True:
            bus: MessageBus | None = None
            try:
                bus = MessageBus(
                    bus_address=self.bus_address,
                    bus_type=BusType.SYSTEM,
                    auth_timeout=self.call_timeout,
                )
                await asyncio.wait_for(bus.connect(), self.call_timeout)
                patient(bus)  # a stalled bus must not drop us (tailsfw/buswrite.py)
                self.connects += 1
                delay = self.retry[0]
                await self._session(bus)
                why = "the bus connection ended"
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the bus or NetworkManager failed: try again later
                why = f"bus {self.bus_address or 'system'}: {describe(e)}"
            finally:
                if bus is not None:
                    with contextlib.suppress(Exception):
                        bus.disconnect()
            self._unavailable(why)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry[1])

    async def _session(self, bus: MessageBus) -> None:
        """Follows NetworkManager on one bus connection, until it ends."""
        session = Session()
        wake = asyncio.Event()

        def on_message(msg: Message) -> None:
            if msg.message_type is not MessageType.SIGNAL:
                return
            if msg.member == "NameOwnerChanged" and msg.sender == DBUS:
                if msg.body[:1] == [NM]:
                    session.owner = msg.body[2] or None
                    session.owner_changes += 1
                    wake.set()
            elif (
                msg.member == "PropertiesChanged"
                and msg.sender == session.owner
                and signal_is_relevant(msg)
            ):
                wake.set()

        bus.add_message_handler(on_message)
        # Subscribe first, then read: a change during the read wakes us again.
        for rule in (NAME_OWNER_RULE, PROPERTIES_RULE):
            await self._call(bus, DBUS, DBUS_PATH, DBUS, "AddMatch", "s", [rule])
        changes = session.owner_changes
        owner = await self._name_owner(bus)
        if session.owner_changes == changes:  # no newer news from a signal
            session.owner = owner
        disconnected = asyncio.ensure_future(bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
        failures = 0
        try:
            while not disconnected.done():
                wake.clear()
                timeout: float | None = None
                if session.owner is None:
                    self._unavailable("NetworkManager is not on the bus")
                else:
                    try:
                        value = await self._read(bus)
                        if not self._value.available:
                            log.info("NetworkManager: read, %d DNS servers", len(value.servers))
                        self._publish(value)
                        failures = 0
                        self.reads += 1
                    except ReadFailed as e:
                        # Often an object that went away under the read: its
                        # signal is on its way.  Persistent: say so.
                        failures += 1
                        log.info("NetworkManager: %s (attempt %d)", e, failures)
                        if failures >= 3:
                            self._unavailable(str(e))
                        timeout = min(self.retry[0] * 2**failures, self.retry[1])
                waker = asyncio.ensure_future(wake.wait())
                try:
                    await asyncio.wait(
                        [waker, disconnected], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    waker.cancel()
        finally:
            disconnected.cancel()
            if disconnected.done() and not disconnected.cancelled():
                disconnected.exception()  # seen: the caller reconnects

    async def _name_owner(self, bus: MessageBus) -> str | None:
        try:
            reply = await self._call(bus, DBUS, DBUS_PATH, DBUS, "GetNameOwner", "s", [NM])
        except ReadFailed:
            return None  # NameHasNoOwner
        return str(reply[0])

    async def _read(self, bus: MessageBus) -> DnsServers:
        """Reads the whole state once: the servers in NetworkManager's order.

        An object that answers with an error (a path pointing nowhere) is
        skipped and named in the refusals; the others are used.  No answer
        in time fails the whole read (ReadFailed).
        """
        refused: list[str] = []
        try:
            async with asyncio.timeout(self.call_timeout):
                key = "ActiveConnections"
                manager = {key: await self._get(bus, NM_PATH, NM, key)}
                paths = limit(typed(manager, key, "ao", refused) or [], "connections", refused)
                active = await self._get_all_of(bus, paths, ACTIVE, refused)
                devices, found = connections(active, refused)
                device_paths = limit(list(devices), "devices", refused)
                for path, props in await self._get_all_of(bus, device_paths, DEVICE, refused):
                    config = typed(props, "Ip4Config", "o", refused)
                    interface = typed(props, "Interface", "s", refused) or path
                    if config and config != "/":
                        found.append((interface, devices[path], False, config))
                configs = list(dict.fromkeys(c for *_, c in found))
                ip4 = dict(await self._get_all_of(bus, configs, IP4, refused))
        except TimeoutError:
            raise ReadFailed(f"no full read within {self.call_timeout} s") from None
        servers = dns_servers(
            [Config(name, default, ip4[c], vpn) for name, default, vpn, c in found if c in ip4]
        )
        return DnsServers(servers.servers, Refusals([*refused, *servers.refused]).reasons())

    async def _get(self, bus: MessageBus, path: str, interface: str, name: str) -> Variant:
        reply = await self._call(bus, NM, path, PROPERTIES, "Get", "ss", [interface, name])
        value = reply[0]
        if not isinstance(value, Variant):
            raise ReadFailed(f"{path} {interface}.{name}: not a variant")
        return value

    async def _get_all_of(
        self, bus: MessageBus, paths: Sequence[str], interface: str, refused: list[str]
    ) -> list[tuple[str, dict[str, Variant]]]:
        """(path, properties) of each object that answers GetAll, pipelined on
        the connection; an object that answers with an error is left out, and
        named in `refused`."""
        replies = await asyncio.gather(
            *(self._call(bus, NM, p, PROPERTIES, "GetAll", "s", [interface]) for p in paths),
            return_exceptions=True,
        )
        got = []
        for path, reply in zip(paths, replies, strict=True):
            if isinstance(reply, ObjectFailed):
                refused.append(f"{show_path(path)}: skipped ({reply.error_name})")
            elif isinstance(reply, BaseException):
                raise reply
            else:
                got.append((path, dict(reply[0]) if isinstance(reply[0], dict) else {}))
        return got

    async def _call(
        self,
        bus: MessageBus,
        destination: str,
        path: str,
        interface: str,
        member: str,
        signature: str,
        body: list[Any],
    ) -> list[Any]:
        message = Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=body,
        )
        try:
            reply = await asyncio.wait_for(bus.call(message), self.call_timeout)
        except TimeoutError:
            raise ReadFailed(f"{path} {interface}.{member}: no answer in time") from None
        if reply.message_type is MessageType.ERROR:
            detail = reply.body[0] if reply.body else ""
            raise ObjectFailed(
                f"{path} {interface}.{member}: {reply.error_name}: {show(detail)}",
                show(reply.error_name),
            )
        return list(reply.body)


def typed(props: Mapping[str, Variant], name: str, signature: str, refused: list[str]) -> Any:
    """A property's value if it has the documented D-Bus type, else None
    (and a refusal naming it); None for an absent property."""
    value = props.get(name)
    if value is None:
        return None
    if wrong := mistyped(value, name, signature):
        refused.append(str(wrong))
        return None
    return value.value


def limit(paths: Sequence[str], what: str, refused: list[str]) -> list[str]:
    if len(paths) > MAX_OBJECTS:
        refused.append(f"{len(paths) - MAX_OBJECTS} {what} over {MAX_OBJECTS} ignored")
    return list(paths[:MAX_OBJECTS])


def show_path(path: str) -> str:
    """An object path for a message: quoted, and if long its end (where the
    object's own name is) kept."""
    text = repr(path)
    return text if len(text) <= MAX_PATH_SHOWN else "..." + text[3 - MAX_PATH_SHOWN :]


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
