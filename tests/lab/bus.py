"""A private dbus-daemon configured like the system bus, with the project's policy.

The default policy is the system bus's own (deny owning names and method
calls, allow signals and replies), and the project's
etc/dbus-1/system.d/org.boum.tails.Firewall.conf is included as installed.
The socket is a path in a temporary directory that every user can reach, so
that a client run as another user (setpriv) meets the bus policy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
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


def bus_config(socket: Path, policy: str) -> str:
    """A system-type bus listening on `socket`, with `policy` (busconfig XML)."""
    return (
        f"{HEADER}\n<busconfig>\n  <type>system</type>\n  <listen>unix:path={socket}</listen>\n"
        f"  <auth>EXTERNAL</auth>\n{policy}\n</busconfig>\n"
    )


@dataclass(frozen=True)
class PrivateBus:
    address: str
    directory: Path
    pid: int


def write_config(directory: Path, policy: Path = POLICY) -> Path:
    """A system-like bus configuration listening on directory/bus.sock."""
    directory.chmod(0o755)  # other users' clients reach the socket
    config = directory / "bus.conf"
    config.write_text(bus_config(directory / "bus.sock", SYSTEM_POLICY.format(policy=policy)))
    return config


@contextlib.contextmanager
def dbus_daemon(config: Path) -> Iterator[PrivateBus]:
    """dbus-daemon running with `config`; killed by its pid on exit."""
    done = subprocess.run(
        ["dbus-daemon", f"--config-file={config}", "--fork", "--print-address=1",
         "--print-pid=1"],
        capture_output=True, text=True, timeout=10, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"dbus-daemon did not start: {done.stderr.strip()}")
    address, pid = done.stdout.split()
    try:
        yield PrivateBus(address, config.parent, int(pid))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGTERM)
        _wait_gone(int(pid))


def _wait_gone(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.01)


@contextlib.contextmanager
def private_system_bus(policy: Path = POLICY) -> Iterator[PrivateBus]:
    """A running bus in a temporary directory, removed on exit."""
    directory = Path(tempfile.mkdtemp(prefix="tfwboot-bus-"))
    try:
        with dbus_daemon(write_config(directory, policy)) as bus:
            yield bus
    finally:
        shutil.rmtree(directory, ignore_errors=True)
