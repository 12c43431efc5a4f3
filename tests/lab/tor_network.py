"""A private Tor network in the lab's peer namespace, and a Tails-like Tor
client in its host namespace (see docs/tor-lab.md).

::

    host namespace                          peer namespace ("the Internet")
    tor client (the policy's Tor user)      auth1..auth3  198.51.100.21-23  directory
      SocksPort 9050 9062 9063                            authorities, also relays
      TransPort 9040, DNSPort 5353          exit1         198.51.100.31     the same, exit
      ControlPort 9052 (cookie)             web server    203.0.113.80:80   logs clients
      only way out: eth0, through tailsfw   dnsmasq       203.0.113.53:53   the exit's DNS

Built as the Tor project's chutney does (``TestingTorNetwork``, our own
``DirAuthority`` lines, short voting intervals), with torrcs of our own. No
Tor process knows of any address outside the lab, and the watch's counters
prove it (``Watch``): on the peer, every packet from the host must be a TCP packet to
a relay's ORPort or DirPort, and whatever a peer process sends outside the
lab's networks is counted and rejected; on the host, every packet leaving by
eth0 with an owner must be the Tor user's.

Keys, data and logs live in one temporary directory; every process is
stopped by its pid, and every address, route and table removed, on exit.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.lab.command import COMMAND_PATH, PYTHON, LabError, command_env, netns_exec, run
from tests.lab.names import temp_prefix
from tests.lab.netns import netns_socket
from tests.lab.topology import (
    HERE,
    HOST_IF,
    HOST_V4,
    HOUSEKEEPING_ICMPV6,
    PEER_IF,
    Lab,
    stop_process,
)
from tests.lab.wait import wait_for

TOR = "tor"
TOR_GENCERT = "tor-gencert"
DNSMASQ = "dnsmasq"
CURL = "curl"
TOOLS = (TOR, TOR_GENCERT, DNSMASQ, CURL)

OR_PORT = 5100
DIR_PORT = 5101
WEB_V4 = "203.0.113.80"
WEB_PORT = 80
DNS_V4 = "203.0.113.53"
WEB_DOMAIN = "lab.example"  # the lab's DNS answers WEB_V4 for it and all below it
WEB_NAME = f"www.{WEB_DOMAIN}"
PAGE = "tailsfw tor lab: the page arrived\n"
# The networks of the lab: nothing of the Tor network may go anywhere else.
LAB_NETWORKS_V4 = ("198.51.100.0/24", "203.0.113.0/24", "192.168.77.0/24", "127.0.0.0/8")
# (and the link's own multicast: neighbour discovery, MLD)
LAB_NETWORKS_V6 = ("2001:db8::/32", "::1/128", "fe80::/10", "ff02::/16")

# Tor's client ports, as Tails' torrc has them (the policy's 9050/9062/9063
# SocksPorts, the TransPort, the DNSPort) and its ControlPort.
SOCKS_PORTS = (9050, 9062, 9063)
TRANS_PORT = 9040
DNS_PORT = 5353
CONTROL_PORT = 9052
AUTOMAP_NETWORK = "127.192.0.0/10"

WATCH_TABLE = "tfwtor"  # the counters' table, on the peer and on the host
BOOTSTRAP_TIMEOUT = 90.0


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool, path=COMMAND_PATH) is None]


@dataclass(frozen=True)
class Relay:
    nick: str
    address: str
    authority: bool = False
    exit: bool = False

    @property
    def endpoints(self) -> tuple[tuple[str, int], ...]:
        """Where a client may connect: the ORPort, and an authority's DirPort."""
        ports = (OR_PORT, DIR_PORT) if self.authority else (OR_PORT,)
        return tuple((self.address, port) for port in ports)


RELAYS = (
    Relay("auth1", "198.51.100.21", authority=True),
    Relay("auth2", "198.51.100.22", authority=True),
    Relay("auth3", "198.51.100.23", authority=True),
    # The exit is an authority too: a relay that is not asks the authorities
    # for the consensus as it starts, is answered 404 while there is none
    # yet, and backs off (exponentially, at random); an exit without a
    # consensus exits nothing, and once did so for over a minute. (The
    # client, which must ask, starts once there is one: see tor_client.)
    Relay("exit1", "198.51.100.31", authority=True, exit=True),
)
EXIT = next(r for r in RELAYS if r.exit)


@dataclass(frozen=True)
class Identity:
    """A relay's identity, and an authority's v3 identity (DirAuthority lines)."""

    relay: Relay
    fingerprint: str  # the relay's RSA identity
    v3ident: str  # an authority's v3 identity key ("" for other relays)


# -- torrcs (pure) ---------------------------------------------------------------

# Every node: a testing network that forms a consensus within seconds.
# (chutney's "rapid bootstrap" settings: relays are assumed reachable, a
# quarter of the paths are enough, every relay gets Guard, the exit Exit.)
COMMON = """\
TestingTorNetwork 1
AssumeReachable 1
PathsNeededToBuildCircuits 0.25
TestingDirAuthVoteExit *
TestingDirAuthVoteGuard *
TestingMinExitFlagThreshold 0
V3AuthNIntervalsValid 2
UseDefaultFallbackDirs 0
ClientUseIPv6 0
ShutdownWaitLength 0
SafeLogging 0
"""

# The first consensus comes after one short initial interval.
AUTHORITY = """\
AuthoritativeDirectory 1
V3AuthoritativeDirectory 1
TestingV3AuthInitialVotingInterval 5
TestingV3AuthInitialVoteDelay 2
TestingV3AuthInitialDistDelay 2
V3AuthVotingInterval 10
V3AuthVoteDelay 2
V3AuthDistDelay 2
"""


def dir_authority_lines(identities: Sequence[Identity]) -> str:
    return "".join(
        f"DirAuthority {i.relay.nick} orport={OR_PORT} no-v2 v3ident={i.v3ident} "
        f"{i.relay.address}:{DIR_PORT} {i.fingerprint}\n"
        for i in identities
        if i.relay.authority
    )


def relay_torrc(
    relay: Relay, datadir: Path, identities: Sequence[Identity], resolv_conf: Path
) -> str:
    lines = [
        COMMON,
        f"DataDirectory {datadir}\n",
        f"Log notice file {datadir / 'notice.log'}\n",
        f"Nickname {relay.nick}\n",
        f"ContactInfo {relay.nick}@lab.example\n",
        f"Address {relay.address}\n",
        # Each relay has its own address, so that the web server's log
        # and the counters can tell them apart (and from the peer's own).
        f"OutboundBindAddress {relay.address}\n",
        f"ORPort {relay.address}:{OR_PORT}\n",
        "SocksPort 0\n",
        dir_authority_lines(identities),
    ]
    if relay.authority:
        lines += [f"DirPort {relay.address}:{DIR_PORT}\n", AUTHORITY]
    if relay.exit:
        lines += [
            "ExitRelay 1\n",
            "IPv6Exit 0\n",
            # The microdescriptor's policy summary must admit the whole
            # Internet for clients to pick this exit; the peer namespace
            # has no way out of the lab anyway (and counts any attempt).
            "ExitPolicy accept *:*\n",
            # Names are resolved by the lab's DNS only, and never tested
            # against public names.
            f"ServerDNSResolvConfFile {resolv_conf}\n",
            "ServerDNSDetectHijacking 0\n",
        ]
    else:
        lines.append("ExitRelay 0\n")
    return "".join(lines)


def client_torrc(
    datadir: Path, identities: Sequence[Identity], namespace_hosts: Sequence[str] = ()
) -> str:
    """Tails' client settings, pointed at the lab's authorities.

    namespace_hosts: the host addresses of application namespaces where Tor
    also listens on 9050, as Tails' ``SocksPort 10.200.1.1:9050`` (Tor binds
    them at its start: the namespaces' veths must exist by then).
    """
    socks = [("127.0.0.1", port) for port in SOCKS_PORTS]
    socks += [(host, SOCKS_PORTS[0]) for host in namespace_hosts]
    return "".join(
        [
            COMMON,
            f"DataDirectory {datadir}\n",
            f"Log notice file {datadir / 'notice.log'}\n",
            *(f"SocksPort {host}:{port} IsolateDestAddr IsolateDestPort\n" for host, port in socks),
            f"TransPort 127.0.0.1:{TRANS_PORT}\n",
            f"DNSPort 127.0.0.1:{DNS_PORT}\n",
            "AutomapHostsOnResolve 1\n",
            "AutomapHostsSuffixes .exit,.onion\n",
            f"VirtualAddrNetworkIPv4 {AUTOMAP_NETWORK}\n",
            f"ControlPort 127.0.0.1:{CONTROL_PORT}\n",
            "CookieAuthentication 1\n",
            dir_authority_lines(identities),
        ]
    )


def parse_status(lines: Iterable[str]) -> dict[str, set[str]]:
    """Nickname -> flags, from a consensus's (or ``GETINFO ns/all``'s)
    ``r`` and ``s`` lines."""
    relays: dict[str, set[str]] = {}
    nick = ""
    for line in lines:
        if line.startswith("r "):
            nick = line.split()[1]
        elif line.startswith("s ") and nick:
            relays[nick] = set(line.split()[1:])
    return relays


def usable_status(relays: dict[str, set[str]]) -> bool:
    """Every relay listed, Running and Valid, and the exit an Exit: a client
    with this consensus can build its circuits at once."""
    return all({"Running", "Valid"} <= relays.get(r.nick, set()) for r in RELAYS) and (
        "Exit" in relays[EXIT.nick]
    )


def onion_address(key: bytes) -> str:
    """A well-formed v3 onion name for a 32-byte public key (rend-spec-v3)."""
    version = b"\x03"
    checksum = hashlib.sha3_256(b".onion checksum" + key + version).digest()[:2]
    return base64.b32encode(key + checksum + version).decode().lower() + ".onion"


# -- keys ------------------------------------------------------------------------


def parse_fingerprint(output: str) -> str:
    """``NICK ABCD EF01 ...`` (tor --list-fingerprint) -> 40 hex digits."""
    for line in output.splitlines():
        nick, _, rest = line.partition(" ")
        digits = rest.replace(" ", "")
        if nick and re.fullmatch(r"[0-9A-F]{40}", digits):
            return digits
    raise LabError(f"no fingerprint in tor --list-fingerprint output: {output!r}")


def parse_v3ident(certificate: str) -> str:
    match = re.search(r"^fingerprint ([0-9A-F]{40})$", certificate, re.MULTILINE)
    if match is None:
        raise LabError("no fingerprint line in the authority certificate")
    return match.group(1)


def relay_fingerprint(relay: Relay, datadir: Path) -> str:
    """Makes the relay's identity keys in datadir; its fingerprint."""
    argv = [
        TOR, "--quiet", "--ignore-missing-torrc", "--list-fingerprint",
        "--DataDirectory", str(datadir), "--Nickname", relay.nick, "--ORPort", "1",
        # a placeholder, so that tor reads no default authority
        "--DirAuthority", "x 127.0.0.1:1 " + "F" * 40,
    ]  # fmt: skip
    return parse_fingerprint(run(argv).stdout)


def make_identities(base: Path) -> list[Identity]:
    """Every relay's identity keys in base/NICK, and the authorities' v3 keys
    in base/NICK/keys (tor-gencert is slow: they are made side by side)."""
    gencerts: list[tuple[Relay, subprocess.Popen[str]]] = []
    try:
        for relay in RELAYS:
            keys = base / relay.nick / "keys"
            keys.mkdir(parents=True, mode=0o700)
            if relay.authority:
                argv = [
                    TOR_GENCERT, "--create-identity-key", "--passphrase-fd", "0", "-m", "12",
                    "-a", f"{relay.address}:{DIR_PORT}",
                    "-i", str(keys / "authority_identity_key"),
                    "-s", str(keys / "authority_signing_key"),
                    "-c", str(keys / "authority_certificate"),
                ]  # fmt: skip
                # An empty passphrase: the key file is in a temporary directory.
                process = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, text=True, env=command_env(), cwd=keys,
                )  # fmt: skip
                gencerts.append((relay, process))
        fingerprints = {relay.nick: relay_fingerprint(relay, base / relay.nick) for relay in RELAYS}
        v3idents: dict[str, str] = {}
        for relay, process in gencerts:
            output, _ = process.communicate(timeout=60)
            if process.returncode != 0:
                raise LabError(f"tor-gencert for {relay.nick} failed: {output.strip()}")
            certificate = base / relay.nick / "keys" / "authority_certificate"
            v3idents[relay.nick] = parse_v3ident(certificate.read_text())
    finally:
        for _, process in gencerts:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return [Identity(r, fingerprints[r.nick], v3idents.get(r.nick, "")) for r in RELAYS]


# -- the watch -------------------------------------------------------------------


@dataclass(frozen=True)
class Leaks:
    """Packets that left the host but not from Tor to a relay, and peer
    processes' attempts to reach outside the lab."""

    from_host: int  # on the peer's lan0, not to a relay endpoint
    not_tor_user: int  # leaving the host's eth0 owned by another user
    forwarded: int  # leaving the host's eth0 forwarded (from a namespace, say)
    outside_lab: int  # sent by a peer process to an address outside the lab
    tor: int  # Tor's own packets to relays, for the record

    @property
    def any(self) -> bool:
        return bool(self.from_host or self.not_tor_user or self.forwarded or self.outside_lab)


def peer_watch_ruleset(relays: Sequence[Relay]) -> str:
    endpoints = ", ".join(f"{a} . {p}" for r in relays for a, p in r.endpoints)
    return f"""
table netdev {WATCH_TABLE} {{
    counter tor {{ }}
    counter other {{ }}
    chain ingress {{
        type filter hook ingress device "{PEER_IF}" priority 10; policy accept;
        ip saddr {HOST_V4} ip daddr . tcp dport {{ {endpoints} }} counter name "tor" accept
        meta protocol arp accept
        icmpv6 type {{ {HOUSEKEEPING_ICMPV6} }} accept
        counter name "other"
    }}
}}
table inet {WATCH_TABLE} {{
    counter outside {{ }}
    set outside4 {{ type ipv4_addr . inet_proto; flags dynamic; }}
    set outside6 {{ type ipv6_addr . inet_proto; flags dynamic; }}
    chain output {{
        type filter hook output priority 0; policy accept;
        ip daddr != {{ {", ".join(LAB_NETWORKS_V4)} }} counter name "outside" \
            add @outside4 {{ ip daddr . meta l4proto }} reject
        ip6 daddr != {{ {", ".join(LAB_NETWORKS_V6)} }} counter name "outside" \
            add @outside6 {{ ip6 daddr . meta l4proto }} reject
    }}
}}
"""


def host_watch_ruleset(tor_uid: int) -> str:
    # A packet without a socket (a kernel reset) has no owner and is not
    # counted: `meta skuid` does not match then. Nor has a forwarded one:
    # counted apart, in forward after tailsfw's filter (priority 0) let it
    # through.
    return f"""
table inet {WATCH_TABLE} {{
    counter other {{ }}
    counter forwarded {{ }}
    chain postrouting {{
        type filter hook postrouting priority 100; policy accept;
        oifname "{HOST_IF}" meta skuid != {tor_uid} counter name "other"
    }}
    chain forward {{
        type filter hook forward priority 100; policy accept;
        oifname "{HOST_IF}" counter name "forwarded"
    }}
}}
"""


def read_counter(run_in: Lab, where: str, family: str, table: str, name: str) -> int:
    argv = ["nft", "-j", "list", "counter", family, table, name]
    done = run_in.peer(argv) if where == "peer" else run_in.host(argv)
    for item in json.loads(done.stdout)["nftables"]:
        if "counter" in item:
            return int(item["counter"]["packets"])
    raise LabError(f"no counter {family} {table} {name} in the {where}")


@dataclass
class Watch:
    """The counters that tell Tor's packets from any other (see module doc)."""

    lab: Lab
    tor_uid: int

    def install(self) -> None:
        self.lab.peer(["nft", "-f", "-"], input=peer_watch_ruleset(RELAYS))
        self.lab.host(["nft", "-f", "-"], input=host_watch_ruleset(self.tor_uid))

    def remove(self) -> None:
        for family in ("netdev", "inet"):
            self.lab.peer(["nft", "delete", "table", family, WATCH_TABLE])
        self.lab.host(["nft", "delete", "table", "inet", WATCH_TABLE])

    def totals(self) -> Leaks:
        return Leaks(
            from_host=read_counter(self.lab, "peer", "netdev", WATCH_TABLE, "other"),
            not_tor_user=read_counter(self.lab, "host", "inet", WATCH_TABLE, "other"),
            forwarded=read_counter(self.lab, "host", "inet", WATCH_TABLE, "forwarded"),
            outside_lab=read_counter(self.lab, "peer", "inet", WATCH_TABLE, "outside"),
            tor=read_counter(self.lab, "peer", "netdev", WATCH_TABLE, "tor"),
        )

    def since(self, before: Leaks) -> Leaks:
        now = self.totals()
        return Leaks(
            now.from_host - before.from_host,
            now.not_tor_user - before.not_tor_user,
            now.forwarded - before.forwarded,
            now.outside_lab - before.outside_lab,
            now.tor - before.tor,
        )


# -- processes -------------------------------------------------------------------


def start(
    argv: Sequence[str], stack: ExitStack, log: Path, cwd: Path | None = None
) -> subprocess.Popen[str]:
    """A long-running lab process (``ip netns exec`` execs, so the pid is its
    own), stopped by that pid when the stack closes; output goes to log."""
    with log.open("w") as out:
        process = subprocess.Popen(
            list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, env=command_env(), cwd=cwd,
        )  # fmt: skip
    stack.callback(stop_process, process)
    return process


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({exc})"


# -- the network -----------------------------------------------------------------


@dataclass
class TorNetwork:
    """The authorities, the exit, the web server and the DNS server in the
    lab's peer namespace, and their counters (made by ``tor_network``)."""

    lab: Lab
    base: Path  # the temporary directory: keys, data, logs
    identities: list[Identity]
    watch: Watch
    relays: dict[str, subprocess.Popen[str]]
    web_log: Path
    dns_log: Path
    started: float = field(default_factory=time.monotonic)
    # From the start (keys included) until a first client was ready.
    bootstrap_seconds: float | None = None

    def check_running(self) -> None:
        for nick, process in self.relays.items():
            if process.poll() is not None:
                log = self.base / "relays" / nick / "notice.log"
                raise LabError(f"tor {nick} exited with {process.returncode}:\n{tail(log)}")

    def consensus_complete(self) -> bool:
        """Every authority holds a consensus that a client can use at once:
        every relay in it, Running and Valid, and the exit an Exit.

        (The first consensus may lack a relay whose descriptor or
        reachability test came after the first vote, the more so on a
        loaded machine; a client that fetched it waits for its next fetch,
        almost two voting intervals later. Read from each authority's cache,
        which Tor replaces by a rename.)
        """
        self.check_running()
        for nick in self.relays:
            cache = self.base / "relays" / nick / "cached-microdesc-consensus"
            try:
                relays = parse_status(cache.read_text(errors="replace").splitlines())
            except FileNotFoundError:
                return False
            if not usable_status(relays):
                return False
        return True

    def logs(self) -> str:
        """The end of every relay's log, for a failure's message."""
        return "\n".join(
            f"--- {r.nick}:\n{tail(self.base / 'relays' / r.nick / 'notice.log', 8)}"
            for r in RELAYS
        )

    def web_clients(self) -> list[str]:
        """The client address of every request the web server logged."""
        lines = self.web_log.read_text().splitlines()
        return [line.split()[0] for line in lines if '"GET ' in line]

    def dns_queries(self) -> list[tuple[str, str]]:
        """(name, client address) of every query the lab's DNS logged."""
        found = re.findall(r"query\[A\] (\S+) from (\S+)$", self.dns_log.read_text(), re.M)
        return [(name.lower(), client) for name, client in found]


@contextmanager
def tor_network(lab: Lab) -> Iterator[TorNetwork]:
    """The network, running until the block ends; then every process, file,
    address, route and table of it is gone (also when a step fails).

    The lab's host must not run its stand-in listeners on Tor's ports (see
    ``Lab.without_host_listeners``), for ``tor_client`` to bind them.
    """
    started = time.monotonic()
    with ExitStack() as stack:
        base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=temp_prefix("tor"))))
        base.chmod(0o755)  # the client's data directory below is the Tor user's
        add_peer_addresses(lab, stack)
        watch = Watch(lab, lab.account("debian-tor").uid)
        watch.install()
        stack.callback(watch.remove)
        web_log, dns_log = start_internet(lab, base, stack)
        identities = make_identities(base / "relays")
        resolv_conf = base / "resolv.conf"
        resolv_conf.write_text(f"nameserver {DNS_V4}\n")
        network = TorNetwork(lab, base, identities, watch, {}, web_log, dns_log, started)
        for relay in RELAYS:
            datadir = base / "relays" / relay.nick
            torrc = datadir / "torrc"
            torrc.write_text(relay_torrc(relay, datadir, identities, resolv_conf))
            network.relays[relay.nick] = start(
                [*netns_exec(lab.peer_ns), TOR, "-f", str(torrc)], stack, datadir / "stdout.log"
            )
        yield network


def add_peer_addresses(lab: Lab, stack: ExitStack) -> None:
    """The relays', web server's and DNS server's addresses, and a dead end."""
    addresses = [r.address for r in RELAYS] + [WEB_V4, DNS_V4]
    batch = ["ip", "-n", lab.peer_ns, "-batch", "-"]
    commands = [f"addr add {a}/24 dev inet0" for a in addresses] + [
        # A way "out" that leads nowhere, so that any attempt to leave the
        # lab becomes a packet that the watch counts (and rejects) rather
        # than an unseen "network unreachable".
        "route add default dev inet0",
        "route add ::/0 dev inet0",
    ]
    run(batch, input="\n".join(commands) + "\n")
    undo = [c.replace(" add ", " del ", 1) for c in reversed(commands)]
    stack.callback(run, batch, input="\n".join(undo) + "\n")


def start_internet(lab: Lab, base: Path, stack: ExitStack) -> tuple[Path, Path]:
    """The web server and dnsmasq; their logs."""
    www = base / "www"
    www.mkdir()
    (www / "index.html").write_text(PAGE)
    web_log, dns_log = base / "web.log", base / "dnsmasq.log"
    start(
        [*netns_exec(lab.peer_ns), PYTHON, "-I", str(HERE / "webserver.py"),
         WEB_V4, str(WEB_PORT), str(www)],
        stack, web_log,
    )  # fmt: skip
    start(
        [*netns_exec(lab.peer_ns), DNSMASQ, "--keep-in-foreground",
         "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--bind-interfaces",
         f"--listen-address={DNS_V4}", "--port=53", "--pid-file=", "--log-queries",
         "--log-facility=-", f"--address=/{WEB_DOMAIN}/{WEB_V4}"],
        stack, dns_log,
    )  # fmt: skip
    return web_log, dns_log


# -- the client ------------------------------------------------------------------


class ControlError(LabError):
    pass


@dataclass
class Control:
    """A minimal Tor control-port client, as root in the host namespace."""

    namespace: str
    cookie: Path
    sock: socket.socket = field(init=False)
    _buffer: bytes = field(init=False, default=b"")

    def __enter__(self) -> Control:
        self.sock = netns_socket(self.namespace, socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(10)
            self.sock.connect(("127.0.0.1", CONTROL_PORT))
            self.command(f"AUTHENTICATE {self.cookie.read_bytes().hex()}")
        except BaseException:
            self.sock.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def _line(self) -> str:
        while b"\r\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ControlError("the control port closed the connection")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line.decode()

    def command(self, text: str) -> list[str]:
        """Sends a command; the reply's lines (data lines included)."""
        self.sock.sendall(text.encode() + b"\r\n")
        lines: list[str] = []
        while True:
            line = self._line()
            status, kind, rest = line[:3], line[3:4], line[4:]
            if not status.startswith("2"):
                raise ControlError(f"{text.split()[0]}: {line}")
            if kind == "+":  # a data block, up to a lone "."
                lines.append(rest)
                while (data := self._line()) != ".":
                    lines.append(data)
            else:
                lines.append(rest)
            if kind == " ":
                return lines

    def getinfo(self, key: str) -> list[str]:
        lines = self.command(f"GETINFO {key}")
        first = lines[0].removeprefix(f"{key}=")
        return [x for x in [first, *lines[1:-1]] if x]


def bootstrap_progress(control: Control) -> int:
    phase = control.getinfo("status/bootstrap-phase")[0]
    match = re.search(r"PROGRESS=(\d+)", phase)
    return int(match.group(1)) if match else 0


def consensus_relays(control: Control) -> dict[str, set[str]]:
    """Nickname -> flags, for every relay in the client's consensus."""
    return parse_status(control.getinfo("ns/all"))


def has_microdescriptor(control: Control, nick: str) -> bool:
    try:
        return bool(control.getinfo(f"md/name/{nick}"))
    except ControlError:
        return False  # "552 ... not found"


def built_circuits(control: Control) -> list[list[str]]:
    """The relays' nicknames of every built general-purpose circuit."""
    circuits = []
    for line in control.getinfo("circuit-status"):
        parts = line.split()
        if len(parts) > 2 and parts[1] == "BUILT" and "PURPOSE=GENERAL" in parts:
            circuits.append([hop.split("~")[-1] for hop in parts[2].split(",")])
    return circuits


@dataclass
class TorClient:
    """Tor as the policy's Tor user in the lab host, configured as Tails'
    (made by ``tor_client``)."""

    network: TorNetwork
    datadir: Path
    process: subprocess.Popen[str]
    bootstrap_seconds: float = 0.0

    def control(self) -> Control:
        return Control(self.network.lab.host_ns, self.datadir / "control_auth_cookie")

    def log(self) -> str:
        return tail(self.datadir / "notice.log")

    def ready(self) -> bool:
        """Bootstrapped, with every relay and its microdescriptor at hand.

        (Not waiting for the relays' own "Bootstrapped 100%": that is their
        own client side building a circuit, which a relay needs no more to
        carry or exit traffic than an authority needs it to vote; with four
        relays each one's own circuits need all three others, and on a
        loaded machine the exit's once took over a minute, while this client
        was long ready and fetching through it.)
        """
        self.network.check_running()
        if self.process.poll() is not None:
            raise LabError(f"the Tor client exited with {self.process.returncode}:\n{self.log()}")
        if not (self.datadir / "control_auth_cookie").exists():
            return False
        wanted = {r.nick for r in RELAYS}
        try:
            with self.control() as control:
                if bootstrap_progress(control) < 100:
                    return False
                return usable_status(consensus_relays(control)) and all(
                    has_microdescriptor(control, nick) for nick in wanted
                )
        except OSError:
            return False  # not listening yet


@contextmanager
def tor_client(
    network: TorNetwork, role: str = "debian-tor", namespace_hosts: Sequence[str] = ()
) -> Iterator[TorClient]:
    """The client, once ready (within BOOTSTRAP_TIMEOUT), until the block
    ends; also listening on 9050 at namespace_hosts (see client_torrc)."""
    lab = network.lab
    account = lab.account(role)
    # Not before there is a usable consensus: asked too early, the
    # authorities answer 404, and Tor backs off (once for over a minute);
    # given an incomplete one, it waits for its next fetch.
    wait_for(network.consensus_complete, BOOTSTRAP_TIMEOUT, 0.2, what="a complete consensus",
             why=network.logs)  # fmt: skip
    with ExitStack() as stack:
        datadir = Path(tempfile.mkdtemp(prefix="client-", dir=network.base))
        stack.callback(shutil.rmtree, datadir, ignore_errors=True)
        os.chown(datadir, account.uid, account.gid)
        datadir.chmod(0o700)
        torrc = network.base / f"{datadir.name}.torrc"
        torrc.write_text(client_torrc(datadir, network.identities, namespace_hosts))
        process = start(
            [*netns_exec(lab.host_ns), *lab.setpriv(role), TOR, "-f", str(torrc)],
            stack,
            network.base / f"{datadir.name}.stdout",
        )
        client = TorClient(network, datadir, process)
        client.bootstrap_seconds = wait_for(
            client.ready, BOOTSTRAP_TIMEOUT, 0.2, what="Tor client bootstrap", why=client.log
        )
        if network.bootstrap_seconds is None:
            network.bootstrap_seconds = time.monotonic() - network.started
        yield client


# -- using it --------------------------------------------------------------------


def curl(
    lab: Lab, role: str, url: str, *options: str, namespace: str | None = None
) -> tuple[int, str, float]:
    """curl as the role (in the lab host, or in `namespace`): its exit code,
    the page (or its error), and the seconds the transfer took by curl's own
    clock (not counting the start of the process, which a loaded machine
    makes slow)."""
    argv = [CURL, "-sS", "--max-time", "30", "--write-out", "\n%{time_total}", *options, url]
    done = lab.run_as(role, argv, timeout=40, namespace=namespace)
    page, _, seconds = done.stdout.rpartition("\n")
    try:
        took = float(seconds)
    except ValueError:
        raise LabError(f"curl as {role} gave no time: {done.stdout!r} {done.stderr!r}") from None
    return done.returncode, page if done.returncode == 0 else done.stderr, took


def through_tor(
    lab: Lab, role: str, url: str, namespace: str | None = None
) -> tuple[int, str, float]:
    """curl through Tor's SocksPort at 127.0.0.1:9050, the name resolved at
    the exit (in an application namespace, the DNAT takes it to the host)."""
    socks = f"127.0.0.1:{SOCKS_PORTS[0]}"
    return curl(lab, role, url, "--socks5-hostname", socks, namespace=namespace)


def dns_query(lab: Lab, role: str, server: str, port: int, name: str) -> dict[str, object]:
    """dnsquery.py's report of one query as the role."""
    argv = [PYTHON, "-I", lab.script("dnsquery.py"), server, str(port), name]
    done = lab.run_as(role, argv)
    try:
        report: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError) as exc:
        raise LabError(f"dnsquery.py as {role} gave no report: {done.stderr.strip()}") from exc
    return report


def refused_packets(lab: Lab) -> int:
    """What the ruleset's refuse chain counted so far (IPv4)."""
    argv = ["nft", "-j", "list", "chain", "ip", "tailsfw", "refuse"]
    listing = json.loads(lab.host(argv).stdout)
    return sum(
        int(expr["counter"]["packets"])
        for item in listing["nftables"]
        if "rule" in item
        for expr in item["rule"]["expr"]
        if "counter" in expr
    )


@contextmanager
def tor_lab(lab: Lab) -> Iterator[TorNetwork]:
    """The lab without its stand-in listeners on the host, and the network."""
    with lab.without_host_listeners(), tor_network(lab) as network:
        yield network
