"""The policy: dataclasses, TOML loading and validation.

Loading either returns a fully valid `Policy` or raises `PolicyError`: one
line naming the file, the key and what is wrong; nothing half-checked reaches
the compiler, and no input (bytes, nesting, sizes, a FIFO) gives a traceback
or a hang.  Nothing the loader accepts can widen the policy beyond what its
keys say: LAN networks lie inside RFC 1918, every name the ruleset derives
from a key is distinct, and numbers are checked for type and range.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from . import nspolicy, safefile
from .nspolicy import Namespace, Transparent
from .policyread import RFC1918, Reader, one_line, show
from .policyread import PolicyError as PolicyError  # the loader's one error

Family = Literal["ipv4", "ipv6"]
Protocol = Literal["tcp", "udp"]
TcpMode = Literal["any", "new", "none"]
LanMode = Literal["rfc1918", "connected"]
ClearnetDns = Literal["any", "nm"]
StrayDns = Literal["reject", "tor"]

# nft's log prefix is limited to 127 bytes by the kernel (NF_LOG_PREFIXLEN).
MAX_LOG_PREFIX = 127
# A policy of 10,000 LAN networks, ports or users is ~0.5 MB; anything much
# larger is a mistake (or /dev/zero), refused before it is read.
MAX_POLICY_BYTES = 4 * 1024 * 1024
# nft chain names are at most 255 bytes; "direct_" + key must fit.
MAX_USER_KEY = 64
# A user key becomes part of a chain name as it is ("direct_" + key), so the
# names are distinct exactly when the keys are; nft accepts these characters.
USER_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# A system account name (useradd's rules, and at most 32 bytes, as utmp).
ACCOUNT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,30}\$?")


@dataclass(frozen=True)
class User:
    """A user the rules name: the key rules use, the account, an optional fallback."""

    key: str
    account: str
    fallback_uid: int | None = None


@dataclass(frozen=True)
class LocalRule:
    """New connections to the loopback address: who may, who may not.

    `ports` is None for "any port".
    """

    family: Family
    protocol: Protocol
    ports: tuple[int, ...] | None
    allow: tuple[str, ...]
    reject: tuple[str, ...]


@dataclass(frozen=True)
class DirectRule:
    """A user allowed to reach the network itself (not through Tor)."""

    user: str
    loopback: bool
    tcp: TcpMode
    udp_ports: tuple[int, ...]


@dataclass(frozen=True)
class Lan:
    """[lan]: the local networks, the ports refused on them, and how they are found."""

    networks: tuple[ipaddress.IPv4Network, ...]
    reject_tcp_ports: tuple[int, ...]
    reject_udp_ports: tuple[int, ...]
    mode: LanMode = "rfc1918"


@dataclass(frozen=True)
class Redirect:
    """nat output: `protocol` to `destination` (and `port`) goes to 127.0.0.1:`to_port`."""

    protocol: Protocol
    destination: ipaddress.IPv4Network
    port: int | None
    to_port: int


@dataclass(frozen=True)
class Log:
    """[log]: the prefix and NFLOG group of refused packets."""

    prefix: str
    group: int


@dataclass(frozen=True)
class Dns:
    """DNS beside the [[redirect]]s: whom the direct users may ask, and where
    other users' DNS datagrams to outside addresses go.

    `clearnet`: "any" (Tails) or "nm": the direct users' DNS (port 53) goes
    only to the servers NetworkManager gave (`Facts.dns`; none: refused).
    `stray`: "reject" (Tails) or "tor": other users' UDP 53 to any address
    outside 127.0.0.0/8 is redirected to 127.0.0.1:`tor_port`, where the
    [[local]] allowlist decides as for any local DNS.
    """

    clearnet: ClearnetDns = "any"
    stray: StrayDns = "reject"
    tor_port: int = 5353


@dataclass(frozen=True)
class Policy:
    """A whole policy file, checked: what the compiler reads besides the facts."""

    source: str
    log: Log
    users: tuple[User, ...]
    local: tuple[LocalRule, ...]
    direct: tuple[DirectRule, ...]
    lan: Lan
    redirects: tuple[Redirect, ...]
    dns: Dns = field(default_factory=Dns)
    namespaces: tuple[Namespace, ...] = ()
    transparent: Transparent = field(default_factory=Transparent)


def load(path: str | Path) -> Policy:
    """Read and validate a policy file."""
    return parse(decode(read(path), str(path)), str(path))


def read(path: str | Path) -> bytes:
    """The bytes of a regular file of bounded size; never blocks, never floods.

    Opened non-blocking and checked with fstat before any read: a FIFO, a
    device (/dev/zero), a directory or a huge file is refused at once.
    """
    try:
        return safefile.read_regular(path, MAX_POLICY_BYTES)
    except safefile.TooLarge:
        raise PolicyError(f"{path}: a policy is at most {MAX_POLICY_BYTES} bytes") from None
    except safefile.Refused as e:
        raise PolicyError(f"{path}: {e.strerror}") from None
    except OSError as e:
        raise PolicyError(f"{path}: cannot read the policy: {e.strerror}") from e


def decode(data: bytes, source: str) -> dict[str, Any]:
    """TOML bytes to a document; every fault is one line naming `source`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise PolicyError(
            f"{source}: not UTF-8: line {line}: byte {data[e.start]:#04x} at offset {e.start}"
        ) from e
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"{source}: not valid TOML: {one_line(str(e))}") from e
    except RecursionError as e:
        raise PolicyError(f"{source}: not valid TOML: nested too deeply") from e
    except ValueError as e:  # e.g. an integer of more than 4,300 digits
        raise PolicyError(f"{source}: not valid TOML: {one_line(str(e))}") from e


def parse(data: Mapping[str, Any], source: str) -> Policy:
    """Validate a decoded policy document; `source` names it in errors."""
    return _Parser(source).policy(data)


class _Parser(Reader):
    """The policy's own sections, read with the typed primitives of `Reader`."""

    # -- sections ----------------------------------------------------------

    def policy(self, data: Mapping[str, Any]) -> Policy:
        top = self.table(
            data,
            "top level",
            ("log", "users", "local", "direct", "lan", "redirect", "dns", "namespace",
             "transparent"),
        )  # fmt: skip
        users = self.users(self.required(top, "users", "top level"))
        known = {u.key for u in users}
        policy = Policy(
            source=self.source,
            log=self.log(self.required(top, "log", "top level")),
            users=users,
            local=tuple(
                self.local(v, f"local[{i}]", known)
                for i, v in enumerate(self.array(top.get("local", []), "local"))
            ),
            direct=self.directs(top.get("direct", []), known),
            lan=self.lan(self.required(top, "lan", "top level")),
            redirects=tuple(
                self.redirect(v, f"redirect[{i}]")
                for i, v in enumerate(self.array(top.get("redirect", []), "redirect"))
            ),
            dns=self.dns(top.get("dns", {})),
            namespaces=nspolicy.namespaces(self, top.get("namespace", [])),
        )
        self.check_local_reachable(policy.local)
        transparent = self.transparent(
            top.get("transparent", {}), known, [d.user for d in policy.direct], policy.local
        )
        return replace(policy, transparent=transparent)

    def transparent(
        self, value: Any, known: set[str], direct: Sequence[str], local: Sequence[LocalRule]
    ) -> Transparent:
        """`[transparent]`: its users exist, none is a [[direct]] user (its own
        traffic would loop into Tor), and no [[local]] entry rejects them at the
        TransPort (the redirect would then refuse all their TCP)."""
        t = self.table(value, "transparent", ("users", "to_port"))
        users = self.user_refs(t.get("users", []), "transparent.users", known)
        to_port = self.port(t.get("to_port", Transparent.to_port), "transparent.to_port")
        for i, user in enumerate(users):
            if user in direct:
                raise self.fail(
                    f"transparent.users[{i}]",
                    f"{user!r} is a [[direct]] user: its own connections cannot go through Tor",
                )
            for j, rule in enumerate(local):
                if (
                    rule.family == "ipv4"
                    and rule.protocol == "tcp"
                    and user in rule.reject
                    and (rule.ports is None or to_port in rule.ports)
                ):
                    raise self.fail(
                        f"transparent.users[{i}]",
                        f"local[{j}] rejects {user!r} at TCP port {to_port}, the transparent proxy",
                    )
        return Transparent(users=users, to_port=to_port)

    def log(self, value: Any) -> Log:
        t = self.table(value, "log", ("prefix", "group"))
        prefix = self.string(self.required(t, "prefix", "log"), "log.prefix")
        if len(prefix.encode()) > MAX_LOG_PREFIX:
            raise self.fail("log.prefix", f"longer than {MAX_LOG_PREFIX} bytes")
        # Printed in journal lines and nft listings: no control characters,
        # no quote or backslash that a listing would have to escape.
        bad = next((c for c in prefix if not c.isprintable() or c in '"\\'), None)
        if bad is not None:
            raise self.fail("log.prefix", f"must not contain {bad!r}")
        group = self.integer(self.required(t, "group", "log"), "log.group", 0, 65535)
        return Log(prefix=prefix, group=group)

    def users(self, value: Any) -> tuple[User, ...]:
        if not isinstance(value, dict) or not value:
            raise self.fail("users", "must be a non-empty table of users")
        users = []
        accounts: dict[str, str] = {}
        for key, spec in value.items():
            where = f"users.{_key(key)}"
            if not USER_KEY.fullmatch(key) or len(key) > MAX_USER_KEY:
                raise self.fail(
                    where,
                    f"a user key is letters, digits, '_', '.' and '-' (at most {MAX_USER_KEY})",
                )
            t = self.table(spec, where, ("account", "fallback_uid"))
            account = self.name(
                self.required(t, "account", where), f"{where}.account", ACCOUNT, "account name"
            )
            if account in accounts:
                raise self.fail(
                    f"{where}.account", f"account {account!r} is already users.{accounts[account]}"
                )
            accounts[account] = key
            fallback = t.get("fallback_uid")
            if fallback is not None:
                # Never root's uid (0), never -1 or nobody's 4294967295 sentinel.
                fallback = self.integer(fallback, f"{where}.fallback_uid", 1, 2**32 - 2)
            users.append(User(key=key, account=account, fallback_uid=fallback))
        return tuple(users)

    def user_refs(self, value: Any, where: str, known: set[str]) -> tuple[str, ...]:
        def ref(v: Any, w: str) -> str:
            key = self.string(v, w)
            if key not in known:
                raise self.fail(w, f"unknown user {show(key)} (define it in [users])")
            return key

        return self.unique_list(value, where, ref)

    def local(self, value: Any, where: str, known: set[str]) -> LocalRule:
        t = self.table(value, where, ("family", "protocol", "ports", "allow", "reject"))
        family: Family = self.choice(t.get("family", "ipv4"), f"{where}.family", ("ipv4", "ipv6"))
        protocol: Protocol = self.choice(
            self.required(t, "protocol", where), f"{where}.protocol", ("tcp", "udp")
        )
        raw_ports = self.required(t, "ports", where)
        ports = None if raw_ports == "any" else self.ports(raw_ports, f"{where}.ports")
        if ports == ():
            raise self.fail(f"{where}.ports", 'must list at least one port, or be "any"')
        allow = self.user_refs(t.get("allow", []), f"{where}.allow", known)
        reject = self.user_refs(t.get("reject", []), f"{where}.reject", known)
        both = sorted(set(allow) & set(reject))
        if both:
            raise self.fail(where, f"user {both[0]!r} is both allowed and rejected")
        if not allow and not reject:
            raise self.fail(where, "names no user in allow or reject")
        return LocalRule(family, protocol, ports, allow, reject)

    def check_local_reachable(self, rules: tuple[LocalRule, ...]) -> None:
        """First match wins: a (port, user) pair decided twice is a mistake."""
        decided: dict[tuple[Family, Protocol, int | None, str], int] = {}
        for i, rule in enumerate(rules):
            for user in rule.allow + rule.reject:
                for port in rule.ports or (None,):
                    key = (rule.family, rule.protocol, port, user)
                    earlier = decided.get(key) or decided.get((*key[:2], None, user))
                    if earlier is not None:
                        what = "any port" if port is None else f"port {port}"
                        raise self.fail(
                            f"local[{i}]",
                            f"{rule.protocol} {what} for user {user!r} is already "
                            f"decided by local[{earlier - 1}]",
                        )
                    decided[key] = i + 1

    def directs(self, value: Any, known: set[str]) -> tuple[DirectRule, ...]:
        rules = tuple(
            self.direct(v, f"direct[{i}]", known) for i, v in enumerate(self.array(value, "direct"))
        )
        seen: set[str] = set()
        for i, rule in enumerate(rules):
            if rule.user in seen:
                raise self.fail(f"direct[{i}].user", f"user {rule.user!r} is listed twice")
            seen.add(rule.user)
        return rules

    def direct(self, value: Any, where: str, known: set[str]) -> DirectRule:
        t = self.table(value, where, ("user", "loopback", "tcp", "udp_ports"))
        (user,) = self.user_refs([self.required(t, "user", where)], f"{where}.user", known)
        loopback = self.boolean(t.get("loopback", False), f"{where}.loopback")
        tcp: TcpMode = self.choice(t.get("tcp", "none"), f"{where}.tcp", ("any", "new", "none"))
        udp_ports = self.ports(t.get("udp_ports", []), f"{where}.udp_ports")
        return DirectRule(user=user, loopback=loopback, tcp=tcp, udp_ports=udp_ports)

    def lan(self, value: Any) -> Lan:
        t = self.table(value, "lan", ("networks", "reject_tcp_ports", "reject_udp_ports", "mode"))
        where = "lan.networks"
        networks = self.unique_list(self.required(t, "networks", "lan"), where, self.network)
        spans = [_span(net) for net in networks]
        private = [_span(net) for net in RFC1918]
        for i, (start, end) in enumerate(spans):
            if not any(low <= start and end <= high for low, high in private):
                raise self.fail(
                    f"{where}[{i}]",
                    f"{networks[i]} is not private: a LAN network lies inside RFC 1918 "
                    "(10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16)",
                )
        overlap = _first_overlap(spans)
        if overlap is not None:
            i, j = overlap
            raise self.fail(f"{where}[{i}]", f"{networks[i]} overlaps {where}[{j}] {networks[j]}")
        return Lan(
            networks=networks,
            reject_tcp_ports=self.ports(t.get("reject_tcp_ports", []), "lan.reject_tcp_ports"),
            reject_udp_ports=self.ports(t.get("reject_udp_ports", []), "lan.reject_udp_ports"),
            mode=self.choice(t.get("mode", "rfc1918"), "lan.mode", ("rfc1918", "connected")),
        )

    def redirect(self, value: Any, where: str) -> Redirect:
        t = self.table(value, where, ("protocol", "destination", "port", "to_port"))
        port = t.get("port")
        return Redirect(
            protocol=self.choice(
                self.required(t, "protocol", where), f"{where}.protocol", ("tcp", "udp")
            ),
            destination=self.network(
                self.required(t, "destination", where), f"{where}.destination"
            ),
            port=None if port is None else self.port(port, f"{where}.port"),
            to_port=self.port(self.required(t, "to_port", where), f"{where}.to_port"),
        )

    def dns(self, value: Any) -> Dns:
        t = self.table(value, "dns", ("clearnet", "stray", "tor_port"))
        default = Dns()
        return Dns(
            clearnet=self.choice(
                t.get("clearnet", default.clearnet), "dns.clearnet", ("any", "nm")
            ),
            stray=self.choice(t.get("stray", default.stray), "dns.stray", ("reject", "tor")),
            tor_port=self.port(t.get("tor_port", default.tor_port), "dns.tor_port"),
        )


def _span(net: ipaddress.IPv4Network) -> tuple[int, int]:
    """First and last address, as integers."""
    start = int(net.network_address)
    return start, start + (1 << (32 - net.prefixlen)) - 1


def _first_overlap(spans: list[tuple[int, int]]) -> tuple[int, int] | None:
    """(i, j), j < i: a network that overlaps an earlier one, the first such
    in the policy's order.

    Sorted by start, a CIDR block overlaps an earlier-starting one only if it
    starts before the furthest end seen so far: one pass, O(n log n).
    """
    found: list[tuple[int, int]] = []
    furthest: int | None = None  # the index of the block that ends last so far
    for i in sorted(range(len(spans)), key=lambda i: spans[i]):
        if furthest is not None and spans[i][0] <= spans[furthest][1]:
            found.append((max(i, furthest), min(i, furthest)))
        elif furthest is None or spans[i][1] > spans[furthest][1]:
            furthest = i
    return min(found) if found else None


def _key(key: str) -> str:
    """A table key in a path: as it is when plain, else quoted and escaped."""
    return key if USER_KEY.fullmatch(key) and len(key) <= MAX_USER_KEY else show(key)
