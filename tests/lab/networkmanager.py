"""A real NetworkManager in a lab namespace, leased DNS servers by dnsmasq.

::

     host namespace                                  peer namespace
    +-----------------------------------+  veth    +------------------------------+
    | NetworkManager (keyfile, dns=none) |----------| dnsmasq: DHCP only (port=0)  |
    |   manages only HOST_IF, DHCP      | HOST_IF  | PEER_IF  192.168.88.1/24     |
    |   on a private bus (unix:path)    |  PEER_IF |  leases 192.168.88.50-99     |
    |   inside `unshare -m`: tmpfs /run,|          |  dns-server: the test's list |
    |   /var/lib/NetworkManager, ro /sys|          |  router: 192.168.88.1        |
    +-----------------------------------+          +------------------------------+

Shared by tests/lab/test_nm.py, the daemon's tests and the demo:

    with Lab(roles) as lab, extra_link(lab.host_ns, lab.peer_ns) as link, \\
            network_manager(lab.host_ns, lab.peer_ns, link, Path(tmp), dns=[...]) as nm:
        NetworkManagerSource(nm.bus.address) ... nm.lease(["203.0.113.53"]) ...

`extra_link` adds a second veth pair (``nm0``/``nmp0``) so that the Lab's own
``eth0`` keeps its static address; pass ``Link(HOST_IF, PEER_IF, ...)`` instead
to let NetworkManager take ``eth0`` itself (the lease then replaces the
static address).  NetworkManager never sees this machine's own files: its
/run, /var/lib/NetworkManager and /etc/resolv.conf are private to its mount
namespace, its configuration and connection are in the work directory, and
it talks only to its own bus.  Nothing is left behind: dnsmasq, the bus and
NetworkManager are killed by pid, the extra link is deleted.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import textwrap
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.lab.bus import PrivateBus
from tests.lab.command import COMMAND_PATH, command_env, netns_exec, run
from tests.lab.dbus_fixtures import NM, wait_for_name
from tests.lab.dbus_fixtures import unavailable as bus_unavailable
from tests.lab.wait import NotInTime

CONNECTION_ID = "tfwlab"
# The DNS servers the lab's DHCP server hands out first: addresses the peer
# listens on, so that packets to them can be counted.
LEASED = ("198.51.100.53", "203.0.113.53")


def nm_unavailable() -> str | None:
    missing = [
        t
        for t in ("NetworkManager", "nmcli", "dnsmasq", "unshare")
        if shutil.which(t, path=COMMAND_PATH) is None
    ]
    return "real NetworkManager skipped: missing " + ", ".join(missing) if missing else None


NM_UNAVAILABLE = bus_unavailable() or nm_unavailable()
PEER_LAN = ipaddress.IPv4Interface("192.168.88.1/24")


@dataclass(frozen=True)
class Link:
    """A veth pair between the host and the peer, and the peer's side of the LAN."""

    host_if: str = "nm0"
    peer_if: str = "nmp0"
    peer: ipaddress.IPv4Interface = PEER_LAN

    @property
    def dhcp_range(self) -> tuple[str, str]:
        network = self.peer.network
        return str(network[50]), str(network[99])


@contextlib.contextmanager
def extra_link(host_ns: str, peer_ns: str, link: Link = Link()) -> Iterator[Link]:
    """A veth pair of its own between two namespaces, deleted on exit."""
    run(["ip", "-n", peer_ns, "link", "add", link.peer_if, "type", "veth",
         "peer", "name", link.host_if, "netns", host_ns])  # fmt: skip
    try:
        run(["ip", "-n", peer_ns, "addr", "add", str(link.peer), "dev", link.peer_if])
        run(["ip", "-n", peer_ns, "link", "set", link.peer_if, "up"])
        yield link
    finally:
        # Deleting one end deletes both, and every route through them.
        with contextlib.suppress(Exception):
            run(["ip", "-n", peer_ns, "link", "delete", link.peer_if])


def kill(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.wait()


@dataclass
class LeaseServer:
    """dnsmasq in the peer namespace: DHCP only, handing out `dns`."""

    peer_ns: str
    link: Link
    workdir: Path
    dns: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = field(init=False, default=None)

    def start(self, dns: Sequence[str]) -> None:
        self.dns = tuple(dns)
        first, last = self.link.dhcp_range
        argv = [
            *netns_exec(self.peer_ns), "dnsmasq", "--no-daemon", "--conf-file=/dev/null",
            "--port=0", "--no-ping", "--bind-interfaces", f"--interface={self.link.peer_if}",
            f"--dhcp-range={first},{last},1h",
            f"--dhcp-leasefile={self.workdir / 'dnsmasq.leases'}",
            f"--dhcp-option=option:router,{self.link.peer.ip}",
        ]  # fmt: skip
        if self.dns:
            argv.append("--dhcp-option=option:dns-server," + ",".join(self.dns))
        with (self.workdir / "dnsmasq.log").open("ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=log, env=command_env())

    def stop(self) -> None:
        kill(self.process)
        self.process = None


@dataclass
class RealNetworkManager:
    """NetworkManager in the host namespace, managing only `link.host_if`."""

    host_ns: str
    link: Link
    workdir: Path
    bus: PrivateBus
    process: subprocess.Popen[bytes] | None = field(init=False, default=None)

    @property
    def log_path(self) -> Path:
        return self.workdir / "NetworkManager.log"

    def configure(self) -> None:
        connections = self.workdir / "connections"
        for directory in (
            connections,
            *(self.workdir / d for d in ("conf.d", "system-conf.d", "run", "lib")),
        ):
            directory.mkdir(parents=True, exist_ok=True)
        (self.workdir / "NetworkManager.conf").write_text(textwrap.dedent(f"""\
            [main]
            plugins=keyfile
            auth-polkit=false
            no-auto-default=*
            hostname-mode=none
            dns=none
            rc-manager=unmanaged
            [keyfile]
            path={connections}
            unmanaged-devices=except:interface-name:{self.link.host_if}
            [logging]
            level=INFO
            """))  # fmt: skip
        keyfile = connections / f"{CONNECTION_ID}.nmconnection"
        keyfile.write_text(textwrap.dedent(f"""\
            [connection]
            id={CONNECTION_ID}
            uuid={uuid.uuid4()}
            type=ethernet
            interface-name={self.link.host_if}
            [ethernet]
            [ipv4]
            method=auto
            [ipv6]
            method=disabled
            """))  # fmt: skip
        keyfile.chmod(0o600)  # NetworkManager ignores a keyfile others may read
        (self.workdir / "resolv.conf").write_text("")

    def start(self) -> None:
        """Starts it; returns once it owns its name on the bus."""
        w = self.workdir
        # A private mount namespace: nothing it writes reaches this machine's
        # files; /sys read-only tells it there is no udev to wait for.
        # Its /run/NetworkManager and /var/lib/NetworkManager are directories
        # of the work directory, kept across restarts as a machine keeps them:
        # a restarted NetworkManager takes its device back from them.
        script = (
            "mount -t tmpfs tmpfs /run && mkdir /run/NetworkManager && "
            f"mount --bind {w / 'run'} /run/NetworkManager && "
            f"mount --bind {w / 'lib'} /var/lib/NetworkManager && "
            f"mount --bind {w / 'resolv.conf'} /etc/resolv.conf && "
            "mount -o remount,bind,ro /sys && "
            f"exec NetworkManager --no-daemon --debug --config={w / 'NetworkManager.conf'} "
            f"--config-dir={w / 'conf.d'} --system-config-dir={w / 'system-conf.d'} "
            f"--state-file={w / 'NetworkManager.state'} "
            f"--intern-config={w / 'NetworkManager-intern.conf'}"
        )
        # `ip netns exec`, `unshare` (without --fork) and `sh -c exec` all exec
        # in place: the pid is NetworkManager's.
        argv = [*netns_exec(self.host_ns), "unshare", "-m", "--propagation", "private",
                "sh", "-ec", script]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=log, env=self.bus.env())
        try:
            wait_for_name(self.bus, NM, present=True)
        except NotInTime:
            self.kill()
            raise RuntimeError(f"NetworkManager did not start:\n{self.log()}") from None

    def kill(self) -> None:
        """SIGKILL: what a crash looks like (it leaves the address in place)."""
        kill(self.process)
        self.process = None
        wait_for_name(self.bus, NM, present=False)

    def nmcli(self, *args: str) -> str:
        done = run([*netns_exec(self.host_ns), "env",
                    f"DBUS_SYSTEM_BUS_ADDRESS={self.bus.address}", f"PATH={COMMAND_PATH}",
                    "nmcli", *args])  # fmt: skip
        return done.stdout

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@dataclass
class NetworkManagerLab:
    """What `network_manager` gives: the bus, dnsmasq and NetworkManager."""

    host_ns: str
    peer_ns: str
    link: Link
    bus: PrivateBus
    dnsmasq: LeaseServer
    nm: RealNetworkManager

    def lease(self, dns: Sequence[str]) -> None:
        """A new lease with other DNS servers: dnsmasq restarted with them,
        and the connection brought up again, so that NetworkManager asks."""
        self.dnsmasq.stop()
        self.dnsmasq.start(dns)
        self.nm.nmcli("connection", "up", CONNECTION_ID)

    def carrier(self, on: bool) -> None:
        """The peer's end down or up: the host's end loses or gets its carrier."""
        run(["ip", "-n", self.peer_ns, "link", "set", self.link.peer_if, "up" if on else "down"])


@contextlib.contextmanager
def network_manager(
    host_ns: str, peer_ns: str, link: Link, workdir: Path, dns: Sequence[str]
) -> Iterator[NetworkManagerLab]:
    """A private bus and NetworkManager in `host_ns`, dnsmasq in `peer_ns`
    leasing `dns`; everything killed by pid on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    with PrivateBus(workdir / "bus", namespace=host_ns) as bus:
        dnsmasq = LeaseServer(peer_ns, link, workdir)
        nm = RealNetworkManager(host_ns, link, workdir, bus)
        try:
            dnsmasq.start(dns)
            nm.configure()
            nm.start()
            yield NetworkManagerLab(host_ns, peer_ns, link, bus, dnsmasq, nm)
        finally:
            kill(nm.process)
            dnsmasq.stop()
