"""What the kernel holds in a lab namespace, read and changed from outside
tailsfwd: its tables, the LAN set, sysctls; links changed by another process
(`Changer`); and the host put back as the other tests expect it after a
daemon ran there (`reset_host`, `lab_host_put_back`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from tailsfw.cli import scratch_argv
from tests.lab.command import ns_run
from tests.lab.topology import HOST_IF, HOST_V6, PEER_LAN_V6

if TYPE_CHECKING:
    from tests.lab.topology import Lab

# What tailsfwd changes in the lab's host: the settings, its own and eth0's.
LAB_HOST_SYSCTLS = (
    "net.ipv4.tcp_mtu_probing",
    "net.ipv4.ip_forward",  # the namespaces: tailsfwd sets it while a clearnet veth exists
    *(f"net.ipv6.conf.{i}.disable_ipv6" for i in ("all", "default", "lo", HOST_IF)),
)


def in_scratch_namespace(script: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """`sh -c script` in a throw-away network namespace (never this one)."""
    return subprocess.run(
        [*scratch_argv(), "sh", "-c", script],
        input=stdin, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def tailsfw_tables(namespace: str) -> set[str]:
    listing = json.loads(ns_run(namespace, ["nft", "-j", "list", "tables"]).stdout)
    return {
        t["table"]["family"]
        for t in listing["nftables"]
        if "table" in t and t["table"]["name"] == "tailsfw"
    }


def lan_networks(namespace: str) -> set[ipaddress.IPv4Network]:
    """The on-link LAN networks in force: the `lan` set ("connected" mode)."""
    listing = json.loads(
        ns_run(namespace, ["nft", "-j", "list", "set", "ip", "tailsfw", "lan"]).stdout
    )
    networks: set[ipaddress.IPv4Network] = set()
    for item in listing["nftables"]:
        for key in item.get("set", {}).get("elem", []):
            if isinstance(key, dict) and "prefix" in key:
                key = f"{key['prefix']['addr']}/{key['prefix']['len']}"
            elif isinstance(key, dict) and "range" in key:
                low, high = (ipaddress.IPv4Address(a) for a in key["range"])
                networks.update(ipaddress.summarize_address_range(low, high))
                continue
            networks.add(ipaddress.IPv4Network(key))
    return networks


def read_sysctls(namespace: str, names: Sequence[str]) -> dict[str, str]:
    done = ns_run(namespace, ["sysctl", "-n", *names])
    return dict(zip(names, done.stdout.split(), strict=True))


@contextlib.contextmanager
def reset_host(
    namespace: str, sysctls: Sequence[str], restore: Callable[[], None] | None = None
) -> Iterator[None]:
    """On exit, undo what tailsfwd did to a lab namespace (tests only).

    The daemon itself never does this: its rules and settings outlive it.
    Removes the tailsfw tables, writes back the sysctls as they were on
    entry, then calls `restore` (switching IPv6 off drops an interface's
    IPv6 addresses and routes, which only the lab knows how to put back).
    """
    before = read_sysctls(namespace, sysctls)
    try:
        yield
    finally:
        abort_connections(namespace)
        remove_tailsfw_tables(namespace)
        # `all` first: writing it also writes every interface.
        order = sorted(before, key=lambda n: (".all." not in n, n))
        ns_run(namespace, ["sysctl", "-q", *(f"{n}={before[n]}" for n in order)])
        if restore is not None:
            restore()


def abort_connections(*namespaces: str) -> None:
    """Test hygiene, while the rules are still in force: aborts every TCP
    connection left in the namespaces.  A flow whose rights a test took away
    is left retransmitting for minutes (both ends in FIN-WAIT-1, seen after
    test_flowcut), and would reach the peer's counter once the rules go."""
    for namespace in namespaces:
        ns_run(namespace, ["ss", "-K", "-tH", "state", "connected"])


def remove_tailsfw_tables(namespace: str) -> None:
    """Test set-up only: the daemon itself never removes a rule."""
    for family in sorted(tailsfw_tables(namespace)):
        ns_run(namespace, ["nft", "delete", "table", family, "tailsfw"])


def restore_lab_ipv6(lab: Lab) -> None:
    # Switching IPv6 off on eth0 dropped its address and default route.
    lab.host(["ip", "-6", "addr", "replace", f"{HOST_V6}/64", "dev", HOST_IF, "nodad"])
    lab.host(["ip", "-6", "route", "replace", "default", "via", PEER_LAN_V6])


@contextlib.contextmanager
def lab_host_put_back(lab: Lab) -> Iterator[None]:
    """On exit, the lab's host as the other lab tests expect it: no
    ruleset, its sysctls as on entry, IPv6 on."""
    with reset_host(lab.host_ns, LAB_HOST_SYSCTLS, restore=lambda: restore_lab_ipv6(lab)):
        try:
            yield
        finally:
            abort_connections(lab.peer_ns)  # its ends answer too, once the rules go


class Changer:
    """Another process that changes links and addresses: `ip -batch`, fed
    one line at a time, so that each change is timed from its own write."""

    def __init__(self, namespace: str) -> None:
        self.process = subprocess.Popen(
            ["ip", "-n", namespace, "-force", "-batch", "-"], stdin=subprocess.PIPE, text=True
        )

    def __call__(self, command: str) -> float:
        """Sends one command; returns the monotonic time just before."""
        assert self.process.stdin is not None
        start = time.monotonic()
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return start

    def close(self) -> None:
        """Waits until every command sent so far has been run."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(30)

    def __enter__(self) -> Changer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
