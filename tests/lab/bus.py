"""The lab's one private dbus-daemon, in a configuration of two:

- `system_policy()`: like the system bus (deny owning names and method
  calls, allow signals and replies) with the project's
  etc/dbus-1/system.d/org.boum.tails.Firewall.conf included as installed;
- `OPEN_POLICY`: anyone may own any name and call anything (python-dbusmock's
  NetworkManager and the real one own their names on it).

The socket is directory/bus.sock (a path socket crosses network namespaces;
the directory is opened to every user, so that a client run as another user
with setpriv meets the bus policy). The daemon runs in a network namespace
if given one, and is ended by its pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.lab.command import REPO, command_env, netns_exec, run
from tests.lab.names import temp_prefix

POLICY = REPO / "etc" / "dbus-1" / "system.d" / "org.boum.tails.Firewall.conf"

HEADER = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">"""
# The system bus's own default policy: deny owning names and method calls,
# allow signals and replies; the project's policy file is included.
SYSTEM_POLICY = """  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
  </policy>
  <include>{policy}</include>"""
# Anyone may own any name and call anything: dbusmock and NetworkManager.
OPEN_POLICY = """  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>"""


def system_policy(policy: Path = POLICY) -> str:
    return SYSTEM_POLICY.format(policy=policy)


def bus_config(socket: Path, policy: str) -> str:
    """A system-type bus listening on `socket`, with `policy` (busconfig XML)."""
    return (
        f"{HEADER}\n<busconfig>\n  <type>system</type>\n  <listen>unix:path={socket}</listen>\n"
        f"  <auth>EXTERNAL</auth>\n{policy}\n</busconfig>\n"
    )


@dataclass
class PrivateBus:
    """dbus-daemon with `policy` (busconfig XML), its socket in `directory`;
    started and stopped at will (`with bus:` does both)."""

    directory: Path
    policy: str = OPEN_POLICY
    namespace: str | None = None  # None: this process's own network namespace
    pid: int = field(init=False, default=0)

    @property
    def socket(self) -> Path:
        return self.directory / "bus.sock"

    @property
    def address(self) -> str:
        return f"unix:path={self.socket}"

    def start(self) -> PrivateBus:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o755)  # other users' clients reach the socket
        config = self.directory / "bus.conf"
        config.write_text(bus_config(self.socket, self.policy))
        done = run(
            [*self.exec_prefix(), "dbus-daemon", f"--config-file={config}", "--fork",
             "--print-address=1", "--print-pid=1"],
            timeout=10,
        )  # fmt: skip
        self.pid = int(done.stdout.split()[1])
        return self

    def close(self) -> None:
        """Ends it by its pid (SIGKILL if SIGTERM is not enough) and waits
        until it is gone, so that the socket can be bound again."""
        if self.pid:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, sig)
                if _gone(self.pid, timeout=5.0):
                    break
            self.pid = 0
        self.socket.unlink(missing_ok=True)

    def __enter__(self) -> PrivateBus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def exec_prefix(self) -> list[str]:
        """Runs a command where the bus runs (its network namespace)."""
        return netns_exec(self.namespace) if self.namespace is not None else []

    def env(self) -> dict[str, str]:
        return {**command_env(), "DBUS_SYSTEM_BUS_ADDRESS": self.address}

    def connection(self) -> Any:
        """A dbus-python connection to this bus (blocking calls, no main loop)."""
        import dbus

        return dbus.bus.BusConnection(self.address)


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@contextlib.contextmanager
def private_system_bus(policy: Path = POLICY) -> Iterator[PrivateBus]:
    """A running system-like bus in a temporary directory, removed on exit."""
    directory = Path(tempfile.mkdtemp(prefix=temp_prefix("bus")))
    try:
        with PrivateBus(directory, system_policy(policy)) as bus:
            yield bus
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# A real dbus-daemon stopped with SIGSTOP stands for a stalled bus.
FLOOD_SIGNALS = 3000
FLOOD_PAYLOAD = "x" * 1024  # 3 MB in all: far more than the socket buffers hold


async def stall(bus: PrivateBus, connection: Any) -> tuple[bool, str]:
    """Stop `bus`, flood `connection` (a dbus-fast MessageBus on it) with
    signals, resume: whether the connection lived through the stall, and
    whether the bus answered on it afterwards."""
    from dbus_fast import Message

    os.kill(bus.pid, signal.SIGSTOP)
    try:
        for _ in range(FLOOD_SIGNALS):
            flood = Message.new_signal("/org/tailsfw/Test", "org.tailsfw.Test", "Flood", "s",
                                       [FLOOD_PAYLOAD])  # fmt: skip
            try:
                connection.send(flood)
            except Exception:  # the connection was dropped under us (its fd is gone)
                return False, "dropped"
            await asyncio.sleep(0)
        await asyncio.sleep(1.0)  # the writer meets the full socket meanwhile
    finally:
        os.kill(bus.pid, signal.SIGCONT)
    if not connection.connected:
        return False, "dropped"
    get_id = Message(
        destination="org.freedesktop.DBus",
        path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus",
        member="GetId",
    )
    reply = await asyncio.wait_for(connection.call(get_id), 10)
    alive = connection.connected
    return alive, "answered" if reply.body else "no answer"
