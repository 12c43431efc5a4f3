"""A two-namespace network lab for firewall tests.

::

      host namespace: the Tails machine       peer namespace: its LAN and "the Internet"
     +------------------------------+        +------------------------------------------+
     | lo   127.0.0.1  ::1          |        | lan0  192.168.77.1/24  2001:db8:77::1/64 |
     |      listeners (root): TCP   |        |       ingress counter "fromhost"         |
     |      9050 9062 9063 9040     |  veth  |                                          |
     |      9052 951 4101 631 8000, |        | inet0 (veth to inet1: no dummy driver)   |
     |      [::1]:4101, UDP 5353    |        |       198.51.100.10/24  203.0.113.10/24  |
     | eth0 192.168.77.2/24         |--------|       2001:db8:1::10/64                  |
     |      2001:db8:77::2/64       | eth0 - | listeners TCP+UDP on every address above |
     | default via 192.168.77.1     |   lan0 |   ports 42 53 80 137 443 5000            |
     |     and via 2001:db8:77::1   |        |                                          |
     +------------------------------+        +------------------------------------------+

The peer owns the "Internet" addresses itself, so it needs no forwarding. Every
packet the host sends to the peer passes ``lan0``'s ingress hook, where a named
nftables counter counts it (all but ARP and IPv6 neighbour discovery / MLD, see
COUNTER_RULESET): ``Lab.probe`` reads it before and after a probe, so a test
can prove that not a single packet left the host.

Nothing here touches the machine's own network namespace: no ruleset, no sysctl,
no resolv.conf; every command runs through ``ip netns exec`` or ``ip -n``. The
test users are real accounts of the machine (``tfwt-*``), since uids are not
namespaced; they are removed on exit.

Only one lab runs on a machine at a time (a lock file serialises them), because
account names are global and setup removes any leftover of a crashed run.
"""

from __future__ import annotations

import fcntl
import grp
import json
import os
import pwd
import re
import selectors
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

from tests.lab.command import COMMAND_PATH, PYTHON, LabError, command_env, netns_exec, run
from tests.lab.leftovers import remove_leftovers
from tests.lab.names import LAB_NS, USER_PREFIX, owned_name, temp_prefix
from tests.lab.netns import delete_namespace

LAB_GIDS = 59100  # the test accounts' groups: far from any system uid

OTHER_ROLE = "other"  # an account that no policy names
LOCK_PATH = Path("/run/lock/tfwlab.lock")
HERE = Path(__file__).resolve().parent
TOOLS = ("ip", "nft", "setpriv", "useradd", "userdel", "groupmod", "groupdel", "getent", "sysctl")

HOST_IF = "eth0"
PEER_IF = "lan0"
HOST_V4 = "192.168.77.2"
HOST_V6 = "2001:db8:77::2"
PEER_LAN_V4 = "192.168.77.1"
PEER_LAN_V6 = "2001:db8:77::1"
INTERNET_V4 = ("198.51.100.10", "203.0.113.10")
INTERNET_V6 = ("2001:db8:1::10",)
PEER_ADDRESSES = (PEER_LAN_V4, *INTERNET_V4, PEER_LAN_V6, *INTERNET_V6)
# The ports the policy names, and those just beside them (so that a rule
# widened by one port shows as an answer, not as "nothing listens").
PEER_PORTS = (42, 52, 53, 54, 80, 123, 136, 137, 138, 443, 5000)
HOST_TCP_PORTS = (9050, 9062, 9063, 9040, 9052, 951, 4101, 631, 8000,
                  9049, 9051, 9053, 9061, 9064, 950, 952, 4100, 4102)  # fmt: skip
HOST_TCP6 = (("::1", 4101), ("::1", 4100), ("::1", 4102))
HOST_UDP = tuple(("127.0.0.1", port) for port in (5353, 52, 54, 123, 5352, 5354))
# On every address of the host: what arrives from outside (the input chain).
HOST_INBOUND_PORT = 7000
HOST_INBOUND = (("0.0.0.0", HOST_INBOUND_PORT), ("::", HOST_INBOUND_PORT))

COUNTER_TABLE = "labcount"
COUNTER = "fromhost"
# ARP and IPv6 neighbour discovery / MLD are the kernel's link housekeeping:
# router solicitations and MLD reports are sent on their own, seconds after a
# link comes up and again later, and neighbour probes whenever a cache entry
# ages. Counting them would make "arrived" noisy; they go to a separate
# counter, so they stay visible but never blur a probe's count.
HOUSEKEEPING_ICMPV6 = (
    "nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, "
    "mld-listener-report, mld2-listener-report, mld-listener-done"
)
COUNTER_RULESET = f"""
table netdev {COUNTER_TABLE} {{
    counter {COUNTER} {{ }}
    counter housekeeping {{ }}
    chain ingress {{
        type filter hook ingress device "{PEER_IF}" priority 0; policy accept;
        meta protocol arp accept
        icmpv6 type {{ {HOUSEKEEPING_ICMPV6} }} counter name "housekeeping" accept
        counter name "{COUNTER}"
    }}
}}
"""

# raw: IP protocol 253; udplite, sctp, dccp: raw packets that start with ports.
PROTOS = ("tcp", "udp", "icmp", "raw", "udplite", "sctp", "dccp")


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class ProbeResult:
    result: str  # open | refused | sent | timeout | error (see probe.py)
    ms: float
    detail: str
    arrived: int  # packets the peer counted during the probe


ROOT = Account("root", 0, 0)


def account_name(role: str) -> str:
    """The test account standing in for a policy's account name."""
    return (USER_PREFIX + re.sub(r"[^a-z0-9-]", "-", role.lower()))[:32]


def unavailable() -> str | None:
    """Why the lab cannot run here, or None."""
    problems = []
    if os.geteuid() != 0:
        problems.append(f"not root (euid {os.geteuid()})")
    missing = [tool for tool in TOOLS if shutil.which(tool, path=COMMAND_PATH) is None]
    if not os.access(PYTHON, os.X_OK):
        missing.append(PYTHON)
    if missing:
        problems.append("missing " + ", ".join(missing))
    return "network lab skipped: " + "; ".join(problems) if problems else None


UNAVAILABLE = unavailable()


def endpoint(address: str, port: int) -> str:
    """``ADDR:PORT`` as listeners.py reads it (IPv6 in brackets)."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def host_listener_args() -> list[str]:
    """listeners.py's arguments for the stand-ins on the host's loopback, and
    the listener on every address that inbound probes aim at."""
    return [
        *(arg for p in HOST_TCP_PORTS for arg in ("--tcp", endpoint("127.0.0.1", p))),
        *(arg for a, p in HOST_TCP6 for arg in ("--tcp", endpoint(a, p))),
        *(arg for a, p in HOST_UDP for arg in ("--udp", endpoint(a, p))),
        *(arg for a, p in HOST_INBOUND for arg in ("--tcp", endpoint(a, p))),
        *(arg for a, p in HOST_INBOUND for arg in ("--udp", endpoint(a, p))),
    ]


@contextmanager
def exclusive_lock(path: Path, timeout: float) -> Iterator[None]:
    """Waits for the machine-wide lab lock; the kernel drops it if we die."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LabError(f"another lab holds {path} for over {timeout} s") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def create_account(name: str) -> Account:
    run(
        [
            "useradd",
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "--user-group",
            name,
        ]
    )
    # Never the uid as the gid (useradd gives equal numbers when it can): a uid/gid
    # swap in the NFLOG decoder or the journal fields would pass unseen.
    used = {g.gr_gid for g in grp.getgrall()}
    gid = next(g for g in range(LAB_GIDS, LAB_GIDS + 1000) if g not in used)
    run(["groupmod", "--gid", str(gid), name])  # also the account's primary group
    entry = pwd.getpwnam(name)
    assert entry.pw_gid == gid != entry.pw_uid, entry
    return Account(name, entry.pw_uid, entry.pw_gid)


def delete_account(name: str) -> None:
    run(["userdel", name])  # also removes its own group (USERGROUPS_ENAB)


def stage_scripts(directory: Path) -> None:
    """Copies the standalone scripts where every test user can read them.

    The work tree may sit below a directory that only root can enter.
    """
    directory.chmod(0o755)
    for name in ("probe.py", "listeners.py", "dnsquery.py"):
        shutil.copy(HERE / name, directory / name)
        (directory / name).chmod(0o644)


def wait_ready(processes: Sequence[subprocess.Popen[str]], timeout: float) -> None:
    """Waits until every listener process has printed ``ready``."""
    selector = selectors.DefaultSelector()
    streams: dict[int, tuple[IO[str], subprocess.Popen[str]]] = {}
    for process in processes:
        assert process.stdout is not None
        streams[process.stdout.fileno()] = (process.stdout, process)
        selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while selector.get_map():
        events = selector.select(max(deadline - time.monotonic(), 0))
        if not events:
            raise LabError(f"listeners not ready within {timeout} s")
        for key, _ in events:
            stream, process = streams[key.fd]
            if stream.readline().strip() != "ready":
                process.kill()
                _, errors = process.communicate()
                raise LabError(f"listeners {process.args!r} failed: {errors.strip()}")
            selector.unregister(stream)


def stop_process(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.communicate(timeout=2)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()


@dataclass
class Lab:
    """The lab, built on ``with Lab(roles) as lab:`` and removed on exit.

    ``roles`` are account names that a policy uses ("amnesia", "debian-tor",
    "_apt" ...): each gets a test account (see ``account_name``), "root" is
    the real root. ``accounts`` maps every role, plus "other" (an account no
    policy names), to its Account.
    """

    roles: list[str]
    # Its owner's pid first, as names.py wants.
    suffix: str = field(default_factory=lambda: owned_name(LAB_NS).removeprefix(f"{LAB_NS}-"))
    # Parallel work in several checkouts queues on the lock: TFWLAB_LOCK_TIMEOUT lengthens the wait.
    lock_timeout: float = field(
        default_factory=lambda: float(os.environ.get("TFWLAB_LOCK_TIMEOUT", "120"))
    )
    accounts: dict[str, Account] = field(init=False, default_factory=dict)
    scripts: Path | None = field(init=False, default=None)  # set while built
    _host_listeners: subprocess.Popen[str] = field(init=False, repr=False)
    _stack: ExitStack = field(init=False, repr=False, default_factory=ExitStack)

    @property
    def host_ns(self) -> str:
        return f"{LAB_NS}-{self.suffix}-host"

    @property
    def peer_ns(self) -> str:
        return f"{LAB_NS}-{self.suffix}-peer"

    def __enter__(self) -> Lab:
        self._stack.enter_context(exclusive_lock(LOCK_PATH, self.lock_timeout))
        try:
            remove_leftovers()
            self._build()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stack.close()  # undoes every step, in reverse, even if one fails

    # -- building -------------------------------------------------------------

    def _build(self) -> None:
        self._stack.callback(self._forget)
        scripts_dir = tempfile.TemporaryDirectory(prefix=temp_prefix("scripts"))
        scripts = self._stack.enter_context(scripts_dir)
        self.scripts = Path(scripts)
        stage_scripts(self.scripts)
        for namespace in (self.host_ns, self.peer_ns):
            run(["ip", "netns", "add", namespace])
            self._stack.callback(delete_namespace, namespace)
        self._build_network()
        self._create_accounts()
        self._start_listeners()

    def _build_network(self) -> None:
        # The peer side comes up first, so that the host's link has a carrier
        # when it gets its routes. One `ip -batch` per namespace keeps it fast.
        self._batch(
            self.peer_ns,
            "link set lo up",
            f"link add {PEER_IF} type veth peer name {HOST_IF} netns {self.host_ns}",
            # A veth pair stands in for a dummy interface: this kernel has no
            # dummy driver, and veth is needed anyway.
            "link add inet0 type veth peer name inet1",
            "link set inet1 up",
            *(f"addr add {address}/24 dev inet0" for address in INTERNET_V4),
            *(f"addr add {address}/64 dev inet0 nodad" for address in INTERNET_V6),
            "link set inet0 up",
            f"addr add {PEER_LAN_V4}/24 dev {PEER_IF}",
            f"addr add {PEER_LAN_V6}/64 dev {PEER_IF} nodad",
            f"link set {PEER_IF} up",
        )
        self.peer(["nft", "-f", "-"], input=COUNTER_RULESET)
        self._batch(
            self.host_ns,
            "link set lo up",
            f"addr add {HOST_V4}/24 dev {HOST_IF}",
            f"addr add {HOST_V6}/64 dev {HOST_IF} nodad",
            f"link set {HOST_IF} up",
            f"route add default via {PEER_LAN_V4}",
            f"route add ::/0 via {PEER_LAN_V6}",
        )
        # Lets the probes use ICMP echo sockets (in the peer: towards the host).
        for namespace in (self.host, self.peer):
            namespace(["sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 2147483647"])

    def _forget(self) -> None:
        # After teardown nothing here exists any more: fail loudly if used.
        self.accounts.clear()
        self.scripts = None

    def _batch(self, namespace: str, *commands: str) -> None:
        run(["ip", "-n", namespace, "-batch", "-"], input="\n".join(commands) + "\n")

    def _create_accounts(self) -> None:
        roles = dict.fromkeys([*self.roles, OTHER_ROLE])
        names: dict[str, str] = {}
        self.accounts["root"] = ROOT
        for role in roles:
            if role == "root":
                continue
            name = account_name(role)
            if name in names:
                raise ValueError(f"roles {names[name]!r} and {role!r} both map to {name}")
            names[name] = role
            self.accounts[role] = create_account(name)
            self._stack.callback(delete_account, name)

    def _start_listeners(self) -> None:
        peer_endpoints = [endpoint(a, p) for a in PEER_ADDRESSES for p in PEER_PORTS]
        peer_args = [
            *(arg for e in peer_endpoints for arg in ("--tcp", e)),
            *(arg for e in peer_endpoints for arg in ("--udp", e)),
        ]
        peer = self.listeners(self.peer_ns, peer_args)
        self._stack.callback(stop_process, peer)
        self._host_listeners = self.listeners(self.host_ns, host_listener_args())
        # Stops whichever host listeners run at the end (see without_host_listeners).
        self._stack.callback(lambda: stop_process(self._host_listeners))
        wait_ready([peer, self._host_listeners], timeout=10.0)

    def listeners(self, namespace: str, args: list[str]) -> subprocess.Popen[str]:
        # `ip netns exec` execs in place, so terminate() reaches the script.
        return subprocess.Popen(
            [*netns_exec(namespace), PYTHON, "-I", self.script("listeners.py"), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=command_env(),
        )

    @contextmanager
    def without_host_listeners(self) -> Iterator[None]:
        """The lab without its stand-in listeners on the host's loopback
        while inside, so that the real services (a real Tor on 9050, 9040,
        5353...) can bind those ports; they are back on exit."""
        stop_process(self._host_listeners)
        try:
            yield
        finally:
            self._host_listeners = self.listeners(self.host_ns, host_listener_args())
            wait_ready([self._host_listeners], timeout=10.0)

    # -- using ----------------------------------------------------------------

    def host(
        self, argv: Sequence[str], *, input: str | None = None, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Runs a command as root in the host namespace (check=True)."""
        return run([*netns_exec(self.host_ns), *argv], input=input, timeout=timeout)

    def peer(
        self, argv: Sequence[str], *, input: str | None = None, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Runs a command as root in the peer namespace (check=True)."""
        return run([*netns_exec(self.peer_ns), *argv], input=input, timeout=timeout)

    def run_as(
        self, role: str, argv: Sequence[str], timeout: float = 30.0, namespace: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Runs argv in the host namespace (or `namespace`) as the role's
        account (see ``setpriv``); never raises on a non-zero exit (the
        caller looks at returncode)."""
        return subprocess.run(
            [*netns_exec(namespace or self.host_ns), *self.setpriv(role), *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=command_env(),
        )

    def setpriv(self, role: str) -> list[str]:
        """The command prefix that becomes the role's account (empty for root),
        for ``[*netns_exec(lab.host_ns), *lab.setpriv(role), *argv]``.

        Non-root accounts get a clean login-like environment (--reset-env) and
        CAP_NET_RAW as an ambient capability, so that raw sockets are the
        firewall's business, not the kernel's permission check.
        """
        account = self.account(role)
        if account.uid == 0:
            return []
        return [
            "setpriv",
            f"--reuid={account.uid}",
            f"--regid={account.gid}",
            "--clear-groups",
            "--reset-env",
            "--inh-caps=+net_raw",
            "--ambient-caps=+net_raw",
            "--",
        ]

    def script(self, name: str) -> str:
        if self.scripts is None:
            raise LabError("the lab is not built: use it as `with Lab(roles) as lab:`")
        return str(self.scripts / name)

    def account(self, role: str) -> Account:
        try:
            return self.accounts[role]
        except KeyError:
            raise LabError(
                f"no account for role {role!r}; roles: {sorted(self.accounts)}"
            ) from None

    def peer_packets(self, counter: str = COUNTER) -> int:
        """Packets counted so far by a named counter on the peer's lan0."""
        listing = self.peer(["nft", "-j", "list", "counter", "netdev", COUNTER_TABLE, counter])
        for item in json.loads(listing.stdout)["nftables"]:
            if "counter" in item:
                return int(item["counter"]["packets"])
        raise LabError(f"no counter {counter!r} in: {listing.stdout}")

    def probe(
        self,
        role: str,
        proto: str,
        family: int,
        dst: str,
        port: int | None = None,
        timeout: float = 1.0,
    ) -> ProbeResult:
        """One attempt by probe.py as the role; ``arrived`` counts the packets
        the peer received meanwhile (a TCP probe ends with a RST and waits for
        the listener's FIN, so no packet of it is still under way).

        proto is one of PROTOS, family 4 or 6 (plain str/int so that callers'
        own protocols accept a Lab)."""
        argv = self._probe_argv(proto, family, dst, port, timeout)
        before = self.peer_packets()
        done = self.run_as(role, argv, timeout=timeout + 30)
        arrived = self.peer_packets() - before
        return self._probe_result(argv, role, done, arrived)

    def probe_from_peer(
        self, proto: str, family: int, dst: str, port: int | None = None, timeout: float = 1.0
    ) -> ProbeResult:
        """One attempt by probe.py as root in the peer, towards the host (the
        host's input chain); ``arrived`` counts what the host sent back."""
        return self.probe_in(self.peer_ns, proto, family, dst, port, timeout)

    def probe_in(
        self,
        namespace: str,
        proto: str,
        family: int,
        dst: str,
        port: int | None = None,
        timeout: float = 1.0,
    ) -> ProbeResult:
        """One attempt by probe.py as root in `namespace`; ``arrived`` counts
        the packets the peer's lan0 received meanwhile."""
        argv = self._probe_argv(proto, family, dst, port, timeout)
        before = self.peer_packets()
        done = subprocess.run(
            [*netns_exec(namespace), *argv],
            capture_output=True, text=True, timeout=timeout + 30, check=False, env=command_env(),
        )  # fmt: skip
        arrived = self.peer_packets() - before
        return self._probe_result(argv, f"root in {namespace}", done, arrived)

    def _probe_argv(
        self, proto: str, family: int, dst: str, port: int | None, timeout: float
    ) -> list[str]:
        if proto not in PROTOS or family not in (4, 6):
            raise ValueError(f"probe of {proto!r} over IPv{family}: want one of {PROTOS}, 4|6")
        argv = [
            PYTHON,
            "-I",
            self.script("probe.py"),
            f"--proto={proto}",
            f"--family={family}",
            f"--dst={dst}",
            f"--timeout={timeout}",
        ]
        if port is not None:
            argv.append(f"--port={port}")
        return argv

    def _probe_result(
        self, argv: list[str], role: str, done: subprocess.CompletedProcess[str], arrived: int
    ) -> ProbeResult:
        try:
            report = json.loads(done.stdout.strip().splitlines()[-1])
            return ProbeResult(report["result"], float(report["ms"]), report["detail"], arrived)
        except (IndexError, ValueError, KeyError) as exc:
            raise LabError(
                f"probe {shlex.join(argv)} as {role} gave no report "
                f"(exit {done.returncode}): {done.stderr.strip() or done.stdout!r}"
            ) from exc
