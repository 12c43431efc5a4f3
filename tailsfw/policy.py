"""The policy: dataclasses, TOML loading and validation.

Loading either returns a fully valid `Policy` or raises `PolicyError` naming
the file, the key and what is wrong; nothing half-checked reaches the compiler.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

Family = Literal["ipv4", "ipv6"]
Protocol = Literal["tcp", "udp"]
TcpMode = Literal["any", "new", "none"]
LanMode = Literal["rfc1918", "connected"]

# nft's log prefix is limited to 127 bytes by the kernel (NF_LOG_PREFIXLEN).
MAX_LOG_PREFIX = 127
USER_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class PolicyError(ValueError):
    """The policy file is unreadable or invalid; the message says where and why."""


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
    prefix: str
    group: int


@dataclass(frozen=True)
class Policy:
    source: str
    log: Log
    users: tuple[User, ...]
    local: tuple[LocalRule, ...]
    direct: tuple[DirectRule, ...]
    lan: Lan
    redirects: tuple[Redirect, ...]


def load(path: str | Path) -> Policy:
    """Read and validate a policy file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise PolicyError(f"{path}: cannot read the policy: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"{path}: not valid TOML: {e}") from e
    return parse(data, str(path))


def parse(data: Mapping[str, Any], source: str) -> Policy:
    """Validate a decoded policy document; `source` names it in errors."""
    return _Parser(source).policy(data)


T = TypeVar("T")


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, what: str) -> PolicyError:
        return PolicyError(f"{self.source}: {where}: {what}")

    # -- primitive readers -------------------------------------------------

    def table(self, value: Any, where: str, keys: Iterable[str]) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"must be a table, not {_kind(value)}")
        unknown = sorted(set(value) - set(keys))
        if unknown:
            raise self.fail(where, f"unknown key {unknown[0]!r} (known: {', '.join(sorted(keys))})")
        return value

    def required(self, table: Mapping[str, Any], key: str, where: str) -> Any:
        if key not in table:
            raise self.fail(where, f"missing key {key!r}")
        return table[key]

    def string(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"must be a string, not {_kind(value)}")
        return value

    def integer(self, value: Any, where: str, low: int, high: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(where, f"must be an integer, not {_kind(value)}")
        if not low <= value <= high:
            raise self.fail(where, f"{value} is out of range {low}..{high}")
        return value

    def port(self, value: Any, where: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
            raise self.fail(where, f"bad port {value!r}: a port is an integer 1..65535")
        return value

    def choice(self, value: Any, where: str, choices: tuple[T, ...]) -> T:
        if value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise self.fail(where, f"unknown value {value!r} (allowed: {allowed})")
        return value  # type: ignore[no-any-return]

    def unique_list(self, value: Any, where: str, item: Callable[[Any, str], T]) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise self.fail(where, f"must be a list, not {_kind(value)}")
        items = tuple(item(v, f"{where}[{i}]") for i, v in enumerate(value))
        seen: set[T] = set()
        for v in items:
            if v in seen:
                raise self.fail(where, f"{v} is listed twice")
            seen.add(v)
        return items

    def ports(self, value: Any, where: str) -> tuple[int, ...]:
        return self.unique_list(value, where, self.port)

    def network(self, value: Any, where: str) -> ipaddress.IPv4Network:
        text = self.string(value, where)
        try:
            return ipaddress.IPv4Network(text)
        except ValueError as e:
            raise self.fail(where, f"bad IPv4 network {text!r}: {e}") from e

    # -- sections ----------------------------------------------------------

    def policy(self, data: Mapping[str, Any]) -> Policy:
        top = self.table(data, "top level", ("log", "users", "local", "direct", "lan", "redirect"))
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
        )
        self.check_local_reachable(policy.local)
        return policy

    def array(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(where, f"must be an array of tables ([[{where}]]), not {_kind(value)}")
        return value

    def log(self, value: Any) -> Log:
        t = self.table(value, "log", ("prefix", "group"))
        prefix = self.string(self.required(t, "prefix", "log"), "log.prefix")
        if len(prefix.encode()) > MAX_LOG_PREFIX:
            raise self.fail("log.prefix", f"longer than {MAX_LOG_PREFIX} bytes")
        group = self.integer(self.required(t, "group", "log"), "log.group", 0, 65535)
        return Log(prefix=prefix, group=group)

    def users(self, value: Any) -> tuple[User, ...]:
        if not isinstance(value, dict) or not value:
            raise self.fail("users", "must be a non-empty table of users")
        users = []
        accounts: dict[str, str] = {}
        for key, spec in value.items():
            where = f"users.{key}"
            if not USER_KEY.match(key):
                raise self.fail(where, "a user key is letters, digits, '_', '.' and '-'")
            t = self.table(spec, where, ("account", "fallback_uid"))
            account = self.string(self.required(t, "account", where), f"{where}.account")
            if not account:
                raise self.fail(f"{where}.account", "must not be empty")
            if account in accounts:
                raise self.fail(
                    f"{where}.account", f"account {account!r} is already users.{accounts[account]}"
                )
            accounts[account] = key
            fallback = t.get("fallback_uid")
            if fallback is not None:
                fallback = self.integer(fallback, f"{where}.fallback_uid", 0, 2**32 - 2)
            users.append(User(key=key, account=account, fallback_uid=fallback))
        return tuple(users)

    def user_refs(self, value: Any, where: str, known: set[str]) -> tuple[str, ...]:
        def ref(v: Any, w: str) -> str:
            key = self.string(v, w)
            if key not in known:
                raise self.fail(w, f"unknown user {key!r} (define it in [users])")
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
        loopback = t.get("loopback", False)
        if not isinstance(loopback, bool):
            raise self.fail(f"{where}.loopback", f"must be true or false, not {_kind(loopback)}")
        tcp: TcpMode = self.choice(t.get("tcp", "none"), f"{where}.tcp", ("any", "new", "none"))
        udp_ports = self.ports(t.get("udp_ports", []), f"{where}.udp_ports")
        return DirectRule(user=user, loopback=loopback, tcp=tcp, udp_ports=udp_ports)

    def lan(self, value: Any) -> Lan:
        t = self.table(value, "lan", ("networks", "reject_tcp_ports", "reject_udp_ports", "mode"))
        networks = self.unique_list(
            self.required(t, "networks", "lan"), "lan.networks", self.network
        )
        loopback = ipaddress.IPv4Network("127.0.0.0/8")
        for i, net in enumerate(networks):
            if net.overlaps(loopback):
                raise self.fail(f"lan.networks[{i}]", f"{net} overlaps the loopback network")
            for other in networks[:i]:
                if net.overlaps(other):
                    raise self.fail(f"lan.networks[{i}]", f"{net} overlaps {other}")
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


def _kind(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)
