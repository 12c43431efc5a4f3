"""The policy's application namespaces and transparent proxying: data and checks.

Tails confines some applications in network namespaces joined to the host
by a veth pair (`veth-NAME` on the host, `veth0` inside), each with a /30.
The loader refuses whatever would widen what a namespace may reach: its two
addresses lie in one private /30 that no other namespace overlaps, its veth
name fits the kernel's 15 characters (a longer one would be cut and could
name another link), it is exposed only Tor's client ports, and only one
namespace is forwarded to the network unless the policy says so twice.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Literal

from .policyread import RFC1918, Reader

NamespaceKind = Literal["services", "clearnet"]

# Interface names are at most 15 bytes (IFNAMSIZ 16 with the NUL).
MAX_IFNAME = 15
HOST_VETH_PREFIX = "veth-"
GUEST_VETH = "veth0"
# A namespace name is a file in /run/netns and part of an interface name:
# no "/", ".", ":" or space.
NAMESPACE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
# What a namespace may be exposed: Tor's SocksPorts (9050, 9062, 9063), its
# TransPort (9040) and the control port filter (951).  Never the raw
# ControlPort (9052), DNS, CUPS or the accessibility daemon.
EXPOSABLE = (951, 9040, 9050, 9062, 9063)
NAMESPACE_KEYS = ("name", "network", "host", "guest", "expose", "kind", "another_clearnet")


@dataclass(frozen=True)
class Namespace:
    """One application namespace: `veth` on the host holds `host`, `veth0`
    inside holds `guest`; `expose` are the host's TCP ports it may reach (as
    127.0.0.1:PORT inside); a "clearnet" one is forwarded to the network."""

    name: str
    host: ipaddress.IPv4Address
    guest: ipaddress.IPv4Address
    expose: tuple[int, ...] = ()
    kind: NamespaceKind = "services"

    @property
    def veth(self) -> str:
        return HOST_VETH_PREFIX + self.name

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"{self.host}/30", strict=False)

    @property
    def clearnet(self) -> bool:
        return self.kind == "clearnet"


@dataclass(frozen=True)
class Transparent:
    """Tails 7.9's transparent proxying: these users' TCP to anything but
    RFC 1918 and loopback goes to 127.0.0.1:`to_port` (Tor's TransPort).
    No user (the default) switches it off."""

    users: tuple[str, ...] = ()
    to_port: int = 9040


def namespaces(p: Reader, value: Any) -> tuple[Namespace, ...]:
    """The `[[namespace]]` entries, checked alone and against each other."""
    if not isinstance(value, list):
        raise p.fail("namespace", "must be an array of tables ([[namespace]])")
    found = [_namespace(p, v, f"namespace[{i}]") for i, v in enumerate(value)]
    result = tuple(ns for ns, _ in found)
    names: dict[str, int] = {}
    clearnet: int | None = None
    for i, (ns, another) in enumerate(found):
        where = f"namespace[{i}]"
        if ns.name in names:
            raise p.fail(f"{where}.name", f"{ns.name!r} is already namespace[{names[ns.name]}]")
        names[ns.name] = i
        for j, other in enumerate(result[:i]):
            if ns.network.overlaps(other.network):
                raise p.fail(where, f"{ns.network} overlaps namespace[{j}] {other.network}")
        if ns.clearnet and clearnet is not None and not another:
            raise p.fail(
                f"{where}.kind",
                f"a second clearnet namespace (namespace[{clearnet}] is one): set "
                "another_clearnet = true on it if it is meant",
            )
        if ns.clearnet and clearnet is None:
            clearnet = i
    return result


def _namespace(p: Reader, value: Any, where: str) -> tuple[Namespace, bool]:
    t = p.table(value, where, NAMESPACE_KEYS)
    name = p.name(p.required(t, "name", where), f"{where}.name", NAMESPACE_NAME, "namespace name")
    veth = HOST_VETH_PREFIX + name
    if len(veth.encode()) > MAX_IFNAME:
        raise p.fail(
            f"{where}.name",
            f"{name!r} is too long: its veth {veth!r} has {len(veth)} characters, "
            f"an interface name at most {MAX_IFNAME}",
        )
    host, guest = _addresses(p, t, where)
    kinds: tuple[NamespaceKind, ...] = ("services", "clearnet")
    kind: NamespaceKind = p.choice(t.get("kind", "services"), f"{where}.kind", kinds)
    expose = p.ports(t.get("expose", []), f"{where}.expose")
    for i, port in enumerate(expose):
        if port not in EXPOSABLE:
            raise p.fail(
                f"{where}.expose[{i}]",
                f"port {port} is not one of Tor's client ports ({', '.join(map(str, EXPOSABLE))})",
            )
    if kind == "clearnet" and expose:
        raise p.fail(f"{where}.expose", "a clearnet namespace is exposed no host port")
    another = p.boolean(t.get("another_clearnet", False), f"{where}.another_clearnet")
    if another and kind != "clearnet":
        raise p.fail(f"{where}.another_clearnet", 'only for kind = "clearnet"')
    return Namespace(name, host, guest, tuple(sorted(expose)), kind), another


def _addresses(
    p: Reader, t: Any, where: str
) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """(host, guest): from `network` (its first and second address) or given
    as `host` and `guest`, both usable addresses of one private /30."""
    if "network" in t:
        if "host" in t or "guest" in t:
            raise p.fail(where, "give either network or host and guest, not both")
        net = p.network(t["network"], f"{where}.network")
        if net.prefixlen != 30:
            raise p.fail(f"{where}.network", f"{net} is not a /30")
        host, guest = net.network_address + 1, net.network_address + 2
    elif "host" in t and "guest" in t:
        host = _address(p, t["host"], f"{where}.host")
        guest = _address(p, t["guest"], f"{where}.guest")
        net = ipaddress.IPv4Network(f"{host}/30", strict=False)
        usable = (net.network_address + 1, net.network_address + 2)
        if host not in usable or guest not in usable or host == guest:
            raise p.fail(
                where,
                f"host {host} and guest {guest} must be the two usable addresses of one /30",
            )
    else:
        raise p.fail(where, "missing key 'network' (or 'host' and 'guest')")

    if not any(net.subnet_of(private) for private in RFC1918):
        raise p.fail(where, f"{net} is not private: a namespace's /30 lies inside RFC 1918")
    return host, guest


def _address(p: Reader, value: Any, where: str) -> ipaddress.IPv4Address:
    net = p.network(value, where)
    if net.prefixlen != 32:
        raise p.fail(where, f"{net} is not one address")
    return net.network_address
