"""nftables JSON, pure: the vocabulary, a builder of objects, and `Ruleset`.

Shared by the host ruleset (compiler.py), the application namespaces' host
rules and their guest rulesets (nsrules.py).  No I/O here.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

TABLE = "tailsfw"
FAMILIES = {"ipv4": "ip", "ipv6": "ip6"}
# IP protocol numbers (IANA).  The ruleset holds numbers, never names: nft
# resolves names through /etc/protocols, which a minimal system lacks.
PROTO = {"icmp": 1, "tcp": 6, "udp": 17, "dccp": 33, "ipv6-icmp": 58, "sctp": 132, "udplite": 136}
LOAD_ORDER = ("table", "chain", "set", "map", "rule")

Json = dict[str, Any]


@dataclass(frozen=True)
class Ruleset:
    """The nftables objects of both tables, in load order, and what was left out."""

    objects: tuple[Json, ...]
    warnings: tuple[str, ...]

    def commands(self) -> list[Json]:
        """Replace every tailsfw table, in one transaction.

        `add` then `delete` removes an existing table and cannot fail when
        there is none; the new objects are added in the same batch, so the
        kernel swaps the old ruleset for the new one atomically.
        """
        tables = [o["table"] for o in self.objects if "table" in o]
        replace: list[Json] = []
        for table in tables:
            replace += [{"add": {"table": table}}, {"delete": {"table": table}}]
        return replace + [{"add": o} for o in self.objects]

    def changes_since(self, old: Ruleset) -> list[Json] | None:
        """The commands that turn `old` into this ruleset by set elements alone.

        None when anything but elements differs (then replace the tables);
        an empty list when nothing differs (then commit nothing).
        """
        if [_shape(o) for o in old.objects] != [_shape(o) for o in self.objects]:
            return None
        commands: list[Json] = []
        for before, after in zip(old.objects, self.objects, strict=True):
            kind = next(iter(after))
            if kind in ("set", "map") and before != after:
                body = after[kind]
                name = {k: body[k] for k in ("family", "table", "name")}
                commands.append({"flush": {kind: name}})
                if body.get("elem"):
                    commands.append({"add": {"element": {**name, "elem": body["elem"]}}})
        return commands

    def document(self, commands: list[Json] | None = None) -> Json:
        """A JSON document for libnftables: by default, the full replacement."""
        if commands is None:
            commands = self.commands()
        return {"nftables": [{"metainfo": {"json_schema_version": 1}}, *commands]}

    def to_json(self) -> str:
        return json.dumps(self.document(), indent=1, sort_keys=True)

    def digest(self) -> str:
        # Compact: json's C encoder (an indented dump is the pure-Python one,
        # ~4 ms a ruleset, paid on the daemon's loop after every commit).
        text = json.dumps(self.document(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def _shape(obj: Json) -> Json:
    """An object without its elements: what a set-only update cannot change."""
    kind, body = next(iter(obj.items()))
    return {kind: {k: v for k, v in body.items() if k != "elem"}}


# -- nft JSON vocabulary -----------------------------------------------------


def meta(key: str) -> Json:
    return {"meta": {"key": key}}


def payload(protocol: str, field: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field}}


def match(left: Any, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def flags(mask: Any, value: Any, op: str = "==") -> Json:
    return match({"&": [payload("tcp", "flags"), mask]}, value, op)


def vmap(key: Any, data: Any) -> Json:
    return {"vmap": {"key": key, "data": data}}


def jump(chain: str) -> Json:
    return {"jump": {"target": chain}}


ACCEPT: Json = {"accept": None}
CT_STATE: Json = {"ct": {"key": "state"}}
RETURN: Json = {"return": None}
COUNTER: Json = {"counter": None}


def one_or_set(values: Sequence[int]) -> Any:
    return values[0] if len(values) == 1 else {"set": sorted(values)}


def l4proto(name: str) -> Json:
    return match(meta("l4proto"), PROTO[name])


def network(net: ipaddress.IPv4Network) -> Any:
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


class Builder:
    """nft objects, all in the current family's tailsfw table, in order."""

    def __init__(self) -> None:
        self.objects: list[Json] = []
        self.family = "ip"

    def _base(self) -> Json:
        return {"family": self.family, "table": TABLE}

    def table(self) -> None:
        self.objects.append({"table": {"family": self.family, "name": TABLE}})

    def chain(
        self,
        name: str,
        hook: str | None = None,
        kind: str = "filter",
        policy: str | None = None,
    ) -> None:
        chain: Json = {**self._base(), "name": name}
        if hook is not None:
            # Base chains drop what no rule accepts; nat only rewrites, at
            # its hook's usual priority (dstnat -100, srcnat 100).
            if kind == "nat":
                policy, prio = "accept", (100 if hook == "postrouting" else -100)
            else:
                prio = 200 if hook == "postrouting" else 0  # postrouting: after srcnat
            chain.update(type=kind, hook=hook, prio=prio, policy=policy or "drop")
        self.objects.append({"chain": chain})

    def rule(self, chain: str, *expr: Json, comment: str | None = None) -> None:
        rule: Json = {**self._base(), "chain": chain, "expr": list(expr)}
        if comment:
            rule["comment"] = comment
        self.objects.append({"rule": rule})

    def vmap_object(
        self,
        name: str,
        key_type: Any,
        elements: Iterable[tuple[Any, Json]],
        flags: Sequence[str] = (),
    ) -> None:
        elems = [[key(k), v] for k, v in elements]
        self.set_object(name, key_type, elems, flags, kind="map")

    def set_object(
        self,
        name: str,
        key_type: Any,
        elements: Iterable[Any],
        flags: Sequence[str] = (),
        kind: str = "set",
    ) -> None:
        body: Json = {**self._base(), "name": name, "type": key_type}
        if kind == "map":
            body["map"] = "verdict"
        if flags:
            body["flags"] = list(flags)
        elems = [key(e) for e in elements]
        if elems:
            body["elem"] = elems
        self.objects.append({kind: body})


def key(key: Any) -> Any:
    """Tuples are concatenations; anything else is already nft JSON."""
    return {"concat": list(key)} if isinstance(key, tuple) else key
