"""The D-Bus service on a real dbus-daemon with the shipped bus policy.

The service runs in the test's event loop over a fake Control; the clients
are real, separate programs (busctl, as root or as `nobody`) or a second
dbus-fast connection, so what they see is what the bus and its policy let
through.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from tailsfw import cli, service, summary
from tailsfw.status import Counters, NamespaceState, Status, SysctlState
from tests.lab.bus import PrivateBus, private_system_bus, stall, system_policy
from tests.lab.command import REPO, VENV_PYTHON
from tests.lab.policies import DEFAULT_POLICY

STATUS = Status(
    pid=4242,
    state="enforcing",
    policy="/etc/tailsfw/policy.toml",
    ruleset="ab" * 32,
    lan_mode="connected",
    connected=["192.168.77.0/24"],
    interfaces={1: "lo", 2: "eth0"},
    warnings=[],
    last_error="",
    counters=Counters(commits=3),
    sysctls=[SysctlState("net.ipv4.tcp_mtu_probing", "1", "1")],
    netlink_reads=1,
    namespaces=[NamespaceState("tbb", True, True), NamespaceState("tca", True, False, "no setns")],
)


class FakeControl:
    def __init__(self, status: Status) -> None:
        self.current = status
        self.reloads = 0
        self.accept_reload = True
        self.callbacks: list[Callable[[Status], None]] = []

    def status(self) -> Status:
        return self.current

    def reload(self) -> bool:
        self.reloads += 1
        if not self.accept_reload:
            self.current = dataclasses.replace(
                self.current, last_error="reload refused: policy.toml: log.group: -1"
            )
        return self.accept_reload

    def subscribe(self, callback: Callable[[Status], None]) -> None:
        self.callbacks.append(callback)

    def publish(self, status: Status) -> None:
        self.current = status
        for callback in self.callbacks:
            callback(status)


@pytest.fixture(scope="module")
def bus() -> Iterator[PrivateBus]:
    with private_system_bus() as running:
        yield running


Scenario = Callable[[FakeControl], Awaitable[None]]


def serving(bus: PrivateBus, scenario: Scenario, control: FakeControl | None = None) -> FakeControl:
    """Run `scenario` while the service is on the bus; returns the control."""
    control = control or FakeControl(STATUS)

    async def main() -> None:
        running = await service.serve(service.FirewallInterface(control), bus.address)
        try:
            await scenario(control)
        finally:
            running.close()

    asyncio.run(main())
    return control


async def busctl(bus: PrivateBus, *args: str, user: str | None = None) -> tuple[int, str]:
    """busctl against the bus, as root or as `user`: (exit code, output and errors)."""
    argv = ["busctl", f"--address={bus.address}", "--json=short", *args]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *argv]
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(process.communicate(), 10)
    return process.returncode or 0, out.decode()


def prop(name: str) -> tuple[str, ...]:
    return ("get-property", service.BUS_NAME, service.OBJECT_PATH, service.INTERFACE, name)


RELOAD = ("call", service.BUS_NAME, service.OBJECT_PATH, service.INTERFACE, "Reload")


def test_properties_read_by_any_user(bus: PrivateBus) -> None:
    seen: dict[str, Any] = {}

    async def scenario(control: FakeControl) -> None:
        for name, user in [
            ("State", None), ("RulesetDigest", "nobody"), ("Sysctls", "nobody"),
            ("DropsByUser", "nobody"), ("ClearnetDns", None), ("Counters", None),
            ("Namespaces", "nobody"),
        ]:  # fmt: skip
            code, out = await busctl(bus, *prop(name), user=user)
            assert code == 0, out
            seen[name] = json.loads(out)
        code, out = await busctl(
            bus, "introspect", service.BUS_NAME, service.OBJECT_PATH, user="nobody"
        )
        assert code == 0 and "RulesetDigest" in out, out

    serving(bus, scenario)
    assert seen["State"] == {"type": "s", "data": "enforcing"}
    assert seen["RulesetDigest"]["data"] == "ab" * 32
    assert seen["Sysctls"] == {
        "type": "a(sssbs)",
        "data": [["net.ipv4.tcp_mtu_probing", "1", "1", True, ""]],
    }
    assert seen["DropsByUser"] == {"type": "a{st}", "data": {}}
    assert seen["Counters"]["data"]["commits"] == 3
    assert seen["Namespaces"] == {
        "type": "a(sbbs)",
        "data": [["tbb", True, True, ""], ["tca", True, False, "no setns"]],
    }


def test_properties_changed_is_signalled(bus: PrivateBus) -> None:
    signals: list[dict[str, Any]] = []

    async def scenario(control: FakeControl) -> None:
        client = await MessageBus(bus_address=bus.address, bus_type=BusType.SYSTEM).connect()
        got = asyncio.Event()

        def handler(message: Message) -> None:
            if message.message_type == MessageType.SIGNAL and message.member == "PropertiesChanged":
                signals.append({k: v.value for k, v in message.body[1].items()})
                got.set()

        client.add_message_handler(handler)
        match = (
            f"type='signal',sender='{service.BUS_NAME}',path='{service.OBJECT_PATH}',"
            "interface='org.freedesktop.DBus.Properties',member='PropertiesChanged'"
        )
        await client.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="AddMatch",
                signature="s",
                body=[match],
            )
        )
        control.publish(STATUS)  # nothing changed: no signal
        control.publish(dataclasses.replace(STATUS, state="lockdown", last_error="no netlink"))
        await asyncio.wait_for(got.wait(), 5)
        client.disconnect()

    serving(bus, scenario)
    assert len(signals) == 1
    assert signals[0]["State"] == "lockdown"
    assert signals[0]["LastError"] == "no netlink"
    assert "RulesetDigest" not in signals[0]  # only what changed


def test_reload_by_root_calls_the_control(bus: PrivateBus) -> None:
    async def scenario(control: FakeControl) -> None:
        code, out = await busctl(bus, *RELOAD)
        assert code == 0, out
        assert json.loads(out) == {"type": "b", "data": [True]}

    assert serving(bus, scenario).reloads == 1


def test_a_refused_reload_is_an_error_naming_why(bus: PrivateBus) -> None:
    control = FakeControl(STATUS)
    control.accept_reload = False

    async def scenario(control: FakeControl) -> None:
        code, out = await busctl(bus, *RELOAD)
        assert code != 0
        assert "policy.toml: log.group: -1" in out, out
        assert "the ruleset and the policy in force stay" in out, out

    serving(bus, scenario, control)
    assert control.reloads == 1


def test_reload_by_another_user_is_refused_by_the_bus(bus: PrivateBus) -> None:
    async def scenario(control: FakeControl) -> None:
        code, out = await busctl(bus, *RELOAD, user="nobody")
        assert code != 0
        assert "Access denied" in out or "AccessDenied" in out, out

    assert serving(bus, scenario).reloads == 0


def test_a_second_owner_is_a_clear_error(bus: PrivateBus) -> None:
    async def scenario(control: FakeControl) -> None:
        with pytest.raises(service.ServiceError, match="another process owns it"):
            await service.serve(service.FirewallInterface(control), bus.address)

    serving(bus, scenario)


def test_owning_the_name_without_the_policy_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "none.conf"
    empty.write_text("<busconfig/>")
    with private_system_bus(policy=empty) as bare:

        async def main() -> None:
            with pytest.raises(service.ServiceError) as error:
                await service.serve(service.FirewallInterface(FakeControl(STATUS)), bare.address)
            assert f"cannot own the bus name {service.BUS_NAME}" in str(error.value)
            assert "not allowed to own" in str(error.value)

        asyncio.run(main())


def test_no_bus_is_a_clear_error(tmp_path: Path) -> None:
    address = f"unix:path={tmp_path}/none.sock"

    async def main() -> None:
        with pytest.raises(service.ServiceError, match=f"cannot connect to {address}"):
            await service.serve(service.FirewallInterface(FakeControl(STATUS)), address)

    asyncio.run(main())


async def tailsfwctl(bus: PrivateBus, *args: str, user: str | None = None) -> tuple[int, str, str]:
    """tailsfwctl against the bus, as root or as `user`: (exit status, stdout, stderr)."""
    argv = [str(VENV_PYTHON), "-m", "tailsfw.cli", *args, "--bus", bus.address]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *argv]
    process = await asyncio.create_subprocess_exec(
        *argv, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    return process.returncode or 0, out.decode(), err.decode()


def test_status_as_another_user_reads_the_daemon_over_the_bus(bus: PrivateBus) -> None:
    expected = cli.build(DEFAULT_POLICY).digest()
    running = dataclasses.replace(
        STATUS, ruleset=expected, policy=str(DEFAULT_POLICY), namespaces=STATUS.namespaces[:1]
    )
    control = FakeControl(running)
    answers: list[tuple[int, dict[str, Any]]] = []

    async def status_as_nobody() -> None:
        code, out, err = await tailsfwctl(bus, "status", "--json", user="nobody")
        assert err == "", err
        answers.append((code, json.loads(out)))

    async def scenario(control: FakeControl) -> None:
        await status_as_nobody()
        control.publish(dataclasses.replace(control.current, state="lockdown"))
        await status_as_nobody()
        control.publish(dataclasses.replace(running, namespaces=STATUS.namespaces))
        await status_as_nobody()

    serving(bus, scenario, control)
    (code, data), (then, later), (guest, failing) = answers
    assert code == summary.OK, data
    assert data["daemon"]["source"] == "D-Bus"
    assert data["kernel"] is None and "only root" in data["kernel_note"]
    assert data["policy"]["path"] == str(DEFAULT_POLICY)  # the daemon's, by default
    assert (then, later["summary"]) == (
        summary.NOT_IN_FORCE,
        "lockdown: only loopback traffic passes",
    )
    # A namespace whose guest side the daemon could not put in force.
    assert (guest, failing["summary"]) == (
        summary.NOT_IN_FORCE,
        "not the policy: the guest rules of namespace tca are not in force",
    )
    assert failing["namespaces"][1]["note"] == "no setns"


def test_keep_serving_waits_for_the_bus_and_comes_back_after_it_restarts(tmp_path: Path) -> None:
    """The firewall starts before the bus: the service must find it when it comes."""
    bus = PrivateBus(tmp_path, system_policy())
    address = bus.address

    async def owned() -> bool:
        try:
            client = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
        except OSError:
            return False
        try:
            reply = await client.call(
                Message(
                    destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                    interface="org.freedesktop.DBus", member="NameHasOwner",
                    signature="s", body=[service.BUS_NAME],
                )
            )  # fmt: skip
            return reply is not None and bool(reply.body[0])
        finally:
            client.disconnect()

    async def wait_owned(timeout: float = 5) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not await owned():
            assert asyncio.get_running_loop().time() < deadline, "never on the bus"
            await asyncio.sleep(0.05)

    async def main() -> None:
        task = asyncio.create_task(service.keep_serving(FakeControl(STATUS), address, 0.05))
        await asyncio.sleep(0.2)  # no bus yet: it keeps trying
        assert not task.done()
        for _ in range(2):  # the bus starts; then it restarts
            with bus:
                await wait_owned()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_tailsfwctl_reload_says_what_happened(bus: PrivateBus) -> None:
    results: list[tuple[int, str]] = []

    async def scenario(control: FakeControl) -> None:
        for user in (None, "nobody"):
            code, _, err = await tailsfwctl(bus, "reload", user=user)
            results.append((code, err))
        control.accept_reload = False
        code, _, err = await tailsfwctl(bus, "reload")
        results.append((code, err))

    control = serving(bus, scenario)
    assert control.reloads == 2  # root's two calls; nobody's never reached it
    (ok, _), (denied, why_denied), (refused, why_refused) = results
    assert ok == 0
    assert denied == summary.NO_PERMISSION and "not allowed" in why_denied, why_denied
    assert refused == summary.FAILED
    assert why_refused == (
        "tailsfwctl: reload refused: policy.toml: log.group: -1;"
        " the ruleset and the policy in force stay\n"
    )


def test_the_service_lives_through_a_stalled_bus(bus: PrivateBus) -> None:
    """The service's connection waits on a full socket (tailsfw/buswrite.py):
    dbus-fast alone drops it at the first EAGAIN."""

    async def main() -> tuple[bool, str]:
        running = await service.serve(service.FirewallInterface(FakeControl(STATUS)), bus.address)
        try:
            return await stall(bus, running.bus)
        finally:
            running.close()

    assert asyncio.run(main()) == (True, "answered")
