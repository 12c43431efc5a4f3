"""Reading a policy document's values: each checked for type and range,
each fault one `PolicyError` naming the source, the key and what is wrong.

The primitives every section of a policy uses (policy.py, nspolicy.py),
apart from what the sections mean.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

# What the LAN may be: private space (RFC 1918), never anything routed.
RFC1918 = tuple(ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
# A plain dotted quad with an optional prefix length, no leading zeros: read
# without ipaddress's string parser (10,000 networks: 0.2 s less).
_DOTTED = re.compile(r"(0|[1-9]\d{0,2})\.(0|[1-9]\d{0,2})\.(0|[1-9]\d{0,2})\.(0|[1-9]\d{0,2})"
                     r"(?:/(0|[1-9]\d?))?")  # fmt: skip

T = TypeVar("T")


class PolicyError(ValueError):
    """The policy file is unreadable or invalid; the message says where and why."""


class Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, what: str) -> PolicyError:
        return PolicyError(f"{self.source}: {where}: {what}")

    def table(self, value: Any, where: str, keys: Iterable[str]) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"must be a table, not {kind(value)}")
        unknown = sorted(set(value) - set(keys))
        if unknown:
            raise self.fail(
                where, f"unknown key {show(unknown[0])} (known: {', '.join(sorted(keys))})"
            )
        return value

    def required(self, table: Mapping[str, Any], key: str, where: str) -> Any:
        if key not in table:
            raise self.fail(where, f"missing key {key!r}")
        return table[key]

    def string(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"must be a string, not {kind(value)}")
        return value

    def name(self, value: Any, where: str, pattern: re.Pattern[str], what: str) -> str:
        text = self.string(value, where)
        if not pattern.fullmatch(text):
            raise self.fail(where, f"bad {what} {show(text)}")
        return text

    def integer(self, value: Any, where: str, low: int, high: int) -> int:
        # bool is an int to Python, never to a policy.
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(where, f"must be an integer, not {kind(value)} ({show(value)})")
        if not low <= value <= high:
            raise self.fail(where, f"{show(value)} is out of range {low}..{high}")
        return value

    def port(self, value: Any, where: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
            raise self.fail(where, f"bad port {show(value)}: a port is an integer 1..65535")
        return value

    def choice(self, value: Any, where: str, choices: tuple[T, ...]) -> T:
        if not isinstance(value, str) or value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise self.fail(where, f"unknown value {show(value)} (allowed: {allowed})")
        return value

    def boolean(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(where, f"must be true or false, not {kind(value)}")
        return value

    def unique_list(self, value: Any, where: str, item: Callable[[Any, str], T]) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise self.fail(where, f"must be a list, not {kind(value)}")
        items = tuple(item(v, f"{where}[{i}]") for i, v in enumerate(value))
        seen: set[T] = set()
        for v in items:
            if v in seen:
                shown = show(v) if isinstance(v, str) else str(v)
                raise self.fail(where, f"{shown} is listed twice")
            seen.add(v)
        return items

    def ports(self, value: Any, where: str) -> tuple[int, ...]:
        return self.unique_list(value, where, self.port)

    def network(self, value: Any, where: str) -> ipaddress.IPv4Network:
        text = self.string(value, where)
        spec: str | tuple[int, int] = text
        quad = _DOTTED.fullmatch(text)
        if quad:
            *octets, length = (int(g) for g in quad.groups(32))
            if max(octets) <= 255 and length <= 32:
                spec = (int.from_bytes(bytes(octets), "big"), length)
        try:
            return ipaddress.IPv4Network(spec)
        except ValueError as e:
            raise self.fail(where, f"bad IPv4 network {show(text)}: {one_line(str(e))}") from e

    def array(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(where, f"must be an array of tables ([[{where}]]), not {kind(value)}")
        return value


def kind(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def show(value: Any, limit: int = 40) -> str:
    """A value for an error message: one line, bounded, control characters escaped."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        # str() of a huge integer is slow, or refused past 4,300 digits.
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, (dict, list)):
        return kind(value)
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(text: str) -> str:
    return " ".join(text.split())
