"""Tails' application namespaces in the lab, built as `tails-create-netns` builds them.

Inside the lab host (never this machine's namespace): for each policy
namespace NAME, a namespace ``tfwlab-SUFFIX-NAME`` (the prefix lets a
crashed run's be removed with the lab's leftovers), its ``lo`` up, a veth
pair ``veth-NAME`` (lab host) / ``veth0`` (inside), the /30's first address
on the host side and the second inside, and for a clearnet namespace the
default route via the host.  No rule, no setting: those are tailsfw's.

Listeners stand in for the services: on the host, TCP on each host address
at Tor's ports (what Tor's ``SocksPort 10.200.1.1:9050`` and onion-grater's
``0.0.0.0:951`` are in Tails) and beside them; inside each namespace, TCP
and UDP on ``GUEST_PORT`` (what the LAN peer or another namespace must never
reach).

``tor_browser_namespace`` is the Tor lab's: tbb alone, made once the
firewall is in force, beside a real Tor's ``SocksPort 10.200.1.1:9050``.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tailsfw import nsrules, policy, verify
from tailsfw.nft import Nft
from tailsfw.nspolicy import GUEST_VETH, Namespace
from tailsfw.sysctl import sysctl_name
from tests.lab.command import netns_exec, run
from tests.lab.names import LAB_NS
from tests.lab.netns import delete_if_present, in_netns
from tests.lab.topology import HOST_V4, Lab, ProbeResult, endpoint, stop_process, wait_ready
from tests.lab.wait import wait_for

# Host ports listened on at each host address: the exposed ones and two
# that no namespace is given (the raw ControlPort, another SocksPort).
HOST_PORTS = (951, 9050, 9052, 9062)
TOR_SOCKS_PORT = 9050
GUEST_RULES_WITHIN = 5.0  # seconds: a readiness wait for tailsfwd, not a measure
GUEST_PORT = 7000
SEEN_TABLE = "tfwseen"
SEEN_RULESET = f"""
table netdev {SEEN_TABLE} {{
    counter seen {{ }}
    chain ingress {{
        type filter hook ingress device "{GUEST_VETH}" priority 0; policy accept;
        meta protocol ip counter name "seen"
    }}
}}
"""


def netns_prefix(lab: Lab) -> str:
    """What the lab puts before a policy namespace's name (tailsfwd's
    ``--netns-prefix``): /run/netns/PREFIX+NAME is the namespace NAME."""
    return f"{LAB_NS}-{lab.suffix}-"


def make_namespace(
    ns: Namespace, netns: str, host_ns: str | None = None, via: Sequence[str] = ()
) -> None:
    """As tails-create-netns: the namespace `netns`, lo up, the veth pair
    with `veth0` inside, the addresses, clearnet's default route; no rule,
    no setting.  Run through `via` (nothing: on this machine; a container's
    way in), with the host side in `host_ns` (None: where `via` runs)."""

    def batch(where: Sequence[str], commands: list[str]) -> None:
        run([*via, "ip", *where, "-batch", "-"], input="\n".join(commands) + "\n")

    run([*via, "ip", "netns", "add", netns])
    batch(["-n", host_ns] if host_ns else [], [
        f"link add {ns.veth} type veth peer name {GUEST_VETH} netns {netns}",
        f"addr add {ns.host}/30 dev {ns.veth}",
        f"link set {ns.veth} up",
    ])  # fmt: skip
    batch(["-n", netns], [
        "link set lo up",
        f"addr add {ns.guest}/30 dev {GUEST_VETH}",
        f"link set {GUEST_VETH} up",
        *([f"route add default via {ns.host}"] if ns.clearnet else []),
    ])  # fmt: skip


def guest_differences(ns: Namespace, inside: Sequence[str]) -> list[str] | None:
    """What the tailsfw table listed through `inside` (the way into the
    namespace) lacks or has more than `ns`'s guest ruleset (None: no such table)."""
    done = subprocess.run([*inside, "nft", "-j", "list", "table", "ip", "tailsfw"],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        return None
    return verify.differences(json.loads(done.stdout)["nftables"], nsrules.guest_ruleset(ns))


def wait_guest(
    ns: Namespace,
    inside: Sequence[str],
    timeout: float = GUEST_RULES_WITHIN,
    why: Callable[[], str] | None = None,
) -> None:
    """Until tailsfwd has put `ns`'s guest ruleset in force, exactly."""
    wait_for(lambda: guest_differences(ns, inside) == [], timeout, 0.01,
             what=f"the guest ruleset of {ns.name} ({' '.join(inside)})", why=why)  # fmt: skip


FLUSH = {"nftables": [{"flush": {"ruleset": None}}]}


def restore_times(
    netns: str, ns: Namespace, pauses: Sequence[float], timeout: float = 5.0
) -> list[float]:
    """From one thread inside `netns`: after each pause, its ruleset flushed
    (another process's doing, for tailsfwd) and timed, in ms, until `ns`'s
    guest table is back whole (listed through one libnftables context about
    every millisecond)."""
    wanted = nsrules.guest_ruleset(ns)

    def inside() -> list[float]:
        nft, times = Nft(), []
        for i, pause in enumerate(pauses):
            time.sleep(pause)
            start = time.monotonic()
            nft.apply(FLUSH)
            wait_for(lambda: not verify.differences(nft.list_ruleset(), wanted), timeout, 0.001,
                     what=f"the guest ruleset back after flush {i}")  # fmt: skip
            times.append((time.monotonic() - start) * 1000)
        return times

    return in_netns(netns, inside)


@dataclass
class AppNamespaces:
    """``with AppNamespaces(lab, namespaces) as apps:``; removed on exit.

    host_ports: the stand-in listeners at each host address (without the
    ports a real service takes there)."""

    lab: Lab
    namespaces: Sequence[Namespace]
    host_ports: Sequence[int] = HOST_PORTS
    _stack: ExitStack = field(init=False, repr=False, default_factory=ExitStack)

    def netns(self, ns: Namespace) -> str:
        return netns_prefix(self.lab) + ns.name

    def named(self, name: str) -> Namespace:
        (ns,) = [ns for ns in self.namespaces if ns.name == name]
        return ns

    def __enter__(self) -> AppNamespaces:
        try:
            for ns in self.namespaces:
                self.create(ns)
            self._listen()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def create(self, ns: Namespace) -> None:
        """As tails-create-netns, with the lab's counter inside."""
        name = self.netns(ns)
        self._stack.callback(delete_if_present, name)
        make_namespace(ns, name, host_ns=self.lab.host_ns)
        # What arrives inside, counted (not ARP): see guest_packets.
        self.run_in(ns, ["nft", "-f", "-"], input=SEEN_RULESET)
        # Lets probe.py use ICMP echo sockets inside.
        self.run_in(ns, ["sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 2147483647"])

    def _listen(self) -> None:
        host_args = [
            arg
            for ns in self.namespaces
            for port in self.host_ports
            for arg in ("--tcp", endpoint(str(ns.host), port))
        ]
        processes = [self.lab.listeners(self.lab.host_ns, host_args)]
        for ns in self.namespaces:
            guest = endpoint("0.0.0.0", GUEST_PORT)
            processes.append(self.lab.listeners(self.netns(ns), ["--tcp", guest, "--udp", guest]))
        for process in processes:
            self._stack.callback(stop_process, process)
        wait_ready(processes, timeout=10.0)

    def run_in(self, ns: Namespace, argv: Sequence[str], input: str | None = None) -> str:
        return run([*netns_exec(self.netns(ns)), *argv], input=input).stdout

    def wait_guest(self, ns: Namespace) -> None:
        wait_guest(ns, netns_exec(self.netns(ns)))

    # -- what tailsfwd does, done here by hand (the daemon does it live) ------

    def apply_guest(self, ns: Namespace) -> None:
        """The guest ruleset and settings, as nsrules says."""
        self.run_in(ns, ["nft", "-j", "-f", "-"], input=nsrules.guest_ruleset(ns).to_json())
        for parts, value in nsrules.GUEST_SETTINGS:
            self.run_in(ns, ["sysctl", "-q", "-w", f"{sysctl_name(parts)}={value}"])

    def apply_host_settings(self) -> None:
        present = {ns.veth for ns in self.namespaces}
        for parts, value in nsrules.host_sysctls(self.namespaces, present):
            self.lab.host(["sysctl", "-q", "-w", f"{sysctl_name(parts)}={value}"])

    def guest_packets(self, ns: Namespace) -> int:
        """IPv4 packets that arrived inside the namespace so far."""
        listing = self.run_in(ns, ["nft", "-j", "list", "counter", "netdev", SEEN_TABLE, "seen"])
        (counter,) = [o["counter"] for o in json.loads(listing)["nftables"] if "counter" in o]
        return int(counter["packets"])

    def probe(
        self, ns: Namespace, proto: str, dst: str, port: int | None = None, timeout: float = 1.0
    ) -> ProbeResult:
        """One attempt from inside the namespace, as root there."""
        return self.lab.probe_in(self.netns(ns), proto, 4, dst, port, timeout)

    def peer_route(self) -> None:
        """The LAN peer routes the namespaces' addresses to the host, as an
        attacker on the LAN would; removed on exit."""
        self.lab.peer(["ip", "route", "add", "10.200.1.0/24", "via", HOST_V4])
        self._stack.callback(
            lambda: subprocess.run(
                ["ip", "netns", "exec", self.lab.peer_ns, "ip", "route", "del", "10.200.1.0/24"],
                capture_output=True, check=False,
            )
        )  # fmt: skip


@contextmanager
def tor_browser_namespace(lab: Lab, policy_path: Path, by_daemon: bool) -> Iterator[AppNamespaces]:
    """The policy's tbb namespace, made as tails-create-netns makes it, with
    the host's stand-ins on every port but Tor's SocksPort (a real Tor binds
    it there once this returns); its guest side put in force by tailsfwd
    (running with ``--netns-prefix netns_prefix(lab)``), waited for, or, with
    `by_daemon` False, by hand.  Removed on exit."""
    (tbb,) = [ns for ns in policy.load(policy_path).namespaces if ns.name == "tbb"]
    ports = [port for port in HOST_PORTS if port != TOR_SOCKS_PORT]
    with AppNamespaces(lab, [tbb], ports) as apps:
        if by_daemon:
            apps.wait_guest(tbb)
        else:
            apps.apply_guest(tbb)
        yield apps
