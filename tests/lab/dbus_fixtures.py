"""python-dbusmock's NetworkManager on a private bus (bus.py), and a thread
that collects what a source yields.

Shared by tests/lab/test_nm_mock.py, tests/lab/networkmanager.py (the real
NetworkManager) and bench/nm.py:

- `MockNetworkManager`: ``python3 -m dbusmock --template networkmanager`` on
  that bus, with IP4Config objects added by hand (the template has none),
  killed and started again at will;
- `EventLog`: an event source run in a thread of its own, every event kept
  with the time it arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from tests.lab.bus import PrivateBus
from tests.lab.command import COMMAND_PATH, PYTHON
from tests.lab.wait import wait_for

NM = "org.freedesktop.NetworkManager"
NM_PATH = "/org/freedesktop/NetworkManager"
DEVICE = "org.freedesktop.NetworkManager.Device"
ACTIVE = "org.freedesktop.NetworkManager.Connection.Active"
IP4 = "org.freedesktop.NetworkManager.IP4Config"
MOCK = "org.freedesktop.DBus.Mock"


def unavailable() -> str | None:
    """Why a private bus with dbusmock cannot run here, or None."""
    missing = [t for t in ("dbus-daemon", "ip") if shutil.which(t, path=COMMAND_PATH) is None]
    done = subprocess.run([PYTHON, "-c", "import dbusmock"], capture_output=True, check=False)
    if done.returncode != 0:
        missing.append("python3-dbusmock")
    try:
        import dbus  # noqa: F401
    except ImportError:
        missing.append("python3-dbus")
    return "private D-Bus skipped: missing " + ", ".join(missing) if missing else None


def wait_for_name(bus: PrivateBus, name: str, present: bool, timeout: float = 10.0) -> None:
    connection = bus.connection()
    try:
        what = f"{name} {'on' if present else 'off'} the bus"
        wait_for(lambda: bool(connection.name_has_owner(name)) == present, timeout, 0.01, what=what)
    finally:
        connection.close()


def nameserver_data(*addresses: Any) -> Any:
    """NameserverData (aa{sv}) with one {"address": s} per value.  A value
    that is already a dbus type keeps it (for the wrong-type tests)."""
    import dbus

    return dbus.Array(
        [dbus.Dictionary({"address": a if hasattr(a, "variant_level") else dbus.String(a)},
                         signature="sv") for a in addresses],
        signature="a{sv}",
    )  # fmt: skip


@dataclass
class MockNetworkManager:
    """python-dbusmock's NetworkManager template, started on a private bus."""

    bus: PrivateBus
    process: subprocess.Popen[bytes] | None = field(init=False, default=None)
    _connection: Any = field(init=False, default=None)
    _count: int = field(init=False, default=0)
    # Active connections made by `connection_with`, for `set_active`.
    active: list[str] = field(init=False, default_factory=list)

    def start(self) -> MockNetworkManager:
        self.process = subprocess.Popen(
            [*self.bus.exec_prefix(), PYTHON, "-m", "dbusmock", "--system",
             "--template", "networkmanager"],
            env=self.bus.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for_name(self.bus, NM, present=True)
        self._connection = self.bus.connection()
        return self

    def kill(self) -> None:
        self.active.clear()
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        wait_for_name(self.bus, NM, present=False)

    def mock(self, path: str = NM_PATH) -> Any:
        import dbus

        return dbus.Interface(self._connection.get_object(NM, path), MOCK)

    # -- building NetworkManager's objects

    def add_config(self, nameservers: Any = None, **properties: Any) -> str:
        """An IP4Config object; `nameservers` becomes its NameserverData."""
        self._count += 1
        path = f"{NM_PATH}/IP4Config/{self._count}"
        props = dict(properties)
        if nameservers is not None:
            props["NameserverData"] = nameservers
        self.mock().AddObject(path, IP4, props, [])
        return path

    def add_device(self, interface: str, config: str = "/") -> str:
        import dbus

        path = str(self.mock().AddEthernetDevice(interface, interface, 100))
        self.mock(path).AddProperty(DEVICE, "Ip4Config", dbus.ObjectPath(config))
        return path

    def add_active(
        self, devices: Sequence[str], default: bool = True, vpn: bool = False, config: str = "/"
    ) -> str:
        """An active connection; `config`: its own IP4Config (a VPN's servers are there)."""
        import dbus

        self._count += 1
        path = f"{NM_PATH}/ActiveConnection/{self._count}"
        props = {
            "Devices": dbus.Array([dbus.ObjectPath(d) for d in devices], signature="o"),
            "Default": dbus.Boolean(default),
            "Vpn": dbus.Boolean(vpn),
            "Ip4Config": dbus.ObjectPath(config),
            "Id": dbus.String(f"connection {self._count}"),
        }
        self.mock().AddObject(path, ACTIVE, props, [])
        return path

    def set_active(self, paths: Sequence[str]) -> None:
        import dbus

        value = dbus.Array([dbus.ObjectPath(p) for p in paths], signature="o")
        self.update(NM_PATH, NM, ActiveConnections=value)

    def update(self, path: str, interface: str, **properties: Any) -> None:
        """Changes properties, each with a standard PropertiesChanged
        (org.freedesktop.DBus.Properties; the mock's UpdateProperties cannot
        carry object paths)."""
        import dbus

        settable = dbus.Interface(self._connection.get_object(NM, path), dbus.PROPERTIES_IFACE)
        for name, value in properties.items():
            settable.Set(interface, name, value)

    def update_legacy(self, path: str, interface: str, name: str, value: Any) -> None:
        """Changes a property; emits the older per-interface PropertiesChanged."""
        self.mock().SetProperty(path, interface, name, value)

    def connection_with(self, interface: str, *addresses: Any, default: bool = True) -> str:
        """A device with a config holding these servers, and its active connection
        (not yet in ActiveConnections); returns the config's path."""
        config = self.add_config(nameserver_data(*addresses))
        device = self.add_device(interface, config)
        self.active.append(self.add_active([device], default=default))
        return config

    def serve(self, interface: str, *addresses: Any) -> str:
        """One more active connection with these servers, in ActiveConnections."""
        config = self.connection_with(interface, *addresses)
        self.set_active(self.active)
        return config


@contextlib.contextmanager
def mock_network_manager(bus: PrivateBus) -> Iterator[MockNetworkManager]:
    mock = MockNetworkManager(bus)
    try:
        yield mock
    finally:
        if mock.process is not None:
            mock.kill()


T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class EventSource(Protocol[T_co]):
    def events(self) -> AsyncIterator[T_co]: ...


class EventLog(Generic[T]):
    """Runs `source.events()` on a loop in its own thread; keeps every event
    with the monotonic time it arrived."""

    def __init__(self, source: EventSource[T]) -> None:
        self.source = source
        self.events: list[tuple[float, T]] = []
        self._changed = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> EventLog[T]:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._cancel)
        self._thread.join(10)

    def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _run(self) -> None:
        self._task = self._loop.create_task(self._consume())
        with contextlib.suppress(asyncio.CancelledError):
            self._loop.run_until_complete(self._task)
        self._loop.close()

    async def _consume(self) -> None:
        async for event in self.source.events():
            with self._changed:
                self.events.append((time.monotonic(), event))
                self._changed.notify_all()

    def mark(self) -> int:
        with self._changed:
            return len(self.events)

    def wait(self, predicate: Callable[[T], bool], timeout: float = 5.0, since: int = 0) -> T:
        """The first event from position `since` on that satisfies predicate."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for _, event in self.events[since:]:
                    if predicate(event):
                        return event
                since = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0:
                    history = "\n".join(repr(e) for _, e in self.events[-10:])
                    raise AssertionError(f"no such event within {timeout} s; last:\n{history}")
                self._changed.wait(left)

    def settled(
        self, predicate: Callable[[T], bool], quiet: float = 1.0, timeout: float = 20.0
    ) -> T:
        """The last event, once it satisfies `predicate` and none has come for
        `quiet` seconds (a source still churning is not settled)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                now = time.monotonic()
                if self.events:
                    arrived, last = self.events[-1]
                    if predicate(last) and now - arrived >= quiet:
                        return last
                if now >= deadline:
                    history = "\n".join(repr(e) for _, e in self.events[-10:])
                    raise AssertionError(f"not settled within {timeout} s; last:\n{history}")
                self._changed.wait(min(quiet, deadline - now))

    def timed(self, predicate: Callable[[T], bool], timeout: float = 5.0, since: int = 0) -> float:
        """The arrival time of the first such event from `since` on."""
        event = self.wait(predicate, timeout, since)
        with self._changed:
            return next(t for t, e in self.events[since:] if e is event)
