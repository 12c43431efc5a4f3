"""A bus that stalls long enough for our socket to fill: the connection waits.

dbus-fast alone drops the connection on the first EAGAIN (see
tailsfw/buswrite.py); a real dbus-daemon, stopped with SIGSTOP, stands for
the stalled bus.
"""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_fast import BusType, Message
from dbus_fast.aio import MessageBus

from tailsfw.buswrite import patient
from tests.lab.dbus_fixtures import PrivateBus, private_bus, scratch_namespace

SIGNALS = 3000
PAYLOAD = "x" * 1024  # 3 MB in all: far more than the socket buffers hold


@pytest.fixture
def bus() -> Iterator[PrivateBus]:
    with (
        scratch_namespace() as namespace,
        tempfile.TemporaryDirectory(prefix="tfwnm-") as tmp,
        private_bus(namespace, Path(tmp)) as bus,
    ):
        yield bus


def test_a_full_socket_waits_for_the_bus(bus: PrivateBus) -> None:
    outcome = asyncio.run(stall(bus, wait_on_full=True))
    assert outcome == (True, "answered")


async def stall(bus: PrivateBus, wait_on_full: bool) -> tuple[bool, str]:
    # wait_on_full=False is dbus-fast on its own: it gives (False, "dropped")
    # (seen; not a test of its own: the dropped connection's errors upset
    # the interpreter's state for the rest of the run).
    """Whether the connection lived through a stall, and whether the bus
    answered on it afterwards."""
    connection = await MessageBus(bus_address=bus.address, bus_type=BusType.SYSTEM).connect()
    if wait_on_full:
        patient(connection)
    os.kill(bus.pid, signal.SIGSTOP)
    try:
        for _ in range(SIGNALS):
            flood = Message.new_signal("/org/tailsfw/Test", "org.tailsfw.Test", "Flood", "s",
                                       [PAYLOAD])  # fmt: skip
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
    reply = await asyncio.wait_for(
        connection.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="GetId",
            )
        ),
        10,
    )
    alive = connection.connected
    connection.disconnect()
    return alive, "answered" if reply.body else "no answer"
