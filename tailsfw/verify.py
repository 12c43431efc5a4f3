"""The kernel's truth: does it hold the tailsfw tables we compiled?

Pure: compares the kernel's listing (`nft -j list ruleset`, as
`Nft.list_ruleset` returns it) with a compiled `Ruleset`, rule by rule.
Both sides are first brought to one canonical form, which drops what the
kernel adds or rewrites and does not change what a rule does:

- handles, counters' values, the listing's metainfo;
- the order of a set's elements, and of an anonymous set's;
- a one-element anonymous set (listed as its element), a /32 or /128
  prefix (listed as the address), flag lists (`a | b` or `[a, b]`);
- `reject` without arguments (listed with the family's default);
- a `meta l4proto` match that a later statement implies (`meta l4proto
  udp th dport 53` is listed as `udp dport 53`);
- an empty comment;
- a protocol number where the kernel lists its name (`meta l4proto 6` is
  listed as `tcp`, and so are the keys of `inet_proto` maps).

Only the families the compiler writes (`ip`, `ip6`) are compared rule by
rule.  Anything else named `tailsfw` (a table in another family, a chain,
set or map of that name in another table) is named as a difference: the
policy has none, and a person reading "tailsfw" must not be misled.  The
daemon, `tailsfwctl status` and `tailsfwctl verify` all judge the kernel
with this one comparison.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .nftjson import FAMILIES, PROTO, TABLE, Ruleset

Json = dict[str, Any]
OUR_FAMILIES = frozenset(FAMILIES.values())
# What the kernel lists for a bare `reject`, per family.
DEFAULT_REJECT = {
    "ip": {"type": "icmp", "expr": "port-unreachable"},
    "ip6": {"type": "icmpv6", "expr": "port-unreachable"},
    "inet": {"type": "icmpx", "expr": "port-unreachable"},
}
FULL_PREFIX = {"ip": 32, "ip6": 128}
KINDS = ("table", "chain", "set", "map")
DORMANT = "a dormant table filters nothing"
TRANSPORTS = ("tcp", "udp", "udplite", "sctp", "dccp")
# The compiler writes protocol numbers; the kernel lists their names.
PROTO_NAMES = {number: name for name, number in PROTO.items()}


@dataclass(frozen=True)
class Tables:
    """The tailsfw tables in canonical form.

    `objects`: (kind, family, name) -> the object without its identity;
    `rules`: (family, chain) -> the chain's rules, in order;
    `foreign`: what else is named tailsfw ("table inet tailsfw"), sorted.
    """

    objects: dict[tuple[str, str, str], Json]
    rules: dict[tuple[str, str], list[Json]]
    foreign: tuple[str, ...] = ()

    def key(self) -> str:
        """One string for the whole: equal tables, equal strings."""
        objects = sorted((list(k), v) for k, v in self.objects.items())
        rules = sorted((list(k), v) for k, v in self.rules.items())
        whole = [objects, rules, list(self.foreign)]
        return json.dumps(whole, sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        return hashlib.sha256(self.key().encode()).hexdigest()


def canonical(objects: Iterable[Json]) -> Tables:
    """The tailsfw tables among `objects` (a listing, or a compiled ruleset's)."""
    found: dict[tuple[str, str, str], Json] = {}
    rules: dict[tuple[str, str], list[Json]] = {}
    foreign: set[str] = set()
    for obj in objects:
        if not isinstance(obj, dict) or len(obj) != 1:
            continue
        kind, body = next(iter(obj.items()))
        if not isinstance(body, dict):
            continue
        family = _name(body.get("family"))
        table = body.get("name") if kind == "table" else body.get("table")
        if family not in OUR_FAMILIES or table != TABLE:
            if table == TABLE:  # another family's tailsfw table, or what is in it
                foreign.add(f"table {family} {TABLE}")
            elif kind != "table" and body.get("name") == TABLE:
                foreign.add(f"{kind} {family} {_name(table)} {TABLE}")
            continue
        if kind == "rule":
            expr = body.get("expr", [])
            rule: Json = {"expr": _expr(expr if isinstance(expr, list) else [expr], family)}
            if body.get("comment"):
                rule["comment"] = _value(body["comment"], family)
            rules.setdefault((family, _name(body.get("chain"))), []).append(rule)
        elif kind in KINDS:
            name = "" if kind == "table" else _name(body.get("name"))
            drop = {"family", "table", "name", "handle"}
            rest = {k: _value(v, family) for k, v in body.items() if k not in drop}
            if isinstance(rest.get("elem"), list):
                if isinstance(rest.get("type"), list) and rest["type"][:1] == ["inet_proto"]:
                    rest["elem"] = [_named_key(e) for e in rest["elem"]]
                rest["elem"] = _sorted(rest["elem"])
            if isinstance(rest.get("flags"), list):
                rest["flags"] = _sorted(rest["flags"])
            found[(kind, family, name)] = rest
    for kind, family, name in found:
        if kind == "chain":
            rules.setdefault((family, name), [])
    return Tables(found, rules, tuple(sorted(foreign)))


def _name(value: Any) -> str:
    """An object's name or family: a string whatever the listing holds."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _sorted(items: Sequence[Any]) -> list[Any]:
    return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))


def _expr(statements: Sequence[Any], family: str) -> list[Any]:
    out: list[Any] = []
    dependency: int | None = None  # where the last `meta l4proto <name>` stands in out
    for statement in statements:
        if isinstance(statement, dict) and len(statement) == 1:
            (name, arg), = statement.items()  # fmt: skip
            if name == "counter" and (arg is None or isinstance(arg, dict)):
                statement = {"counter": None}  # its values move; a named counter stays
            elif name == "reject" and arg is None and family in DEFAULT_REJECT:
                statement = {"reject": DEFAULT_REJECT[family]}
        statement = _named_l4proto(_value(statement, family))
        proto = _l4proto(statement)
        if dependency is not None and (upper := _upper_layer(statement, out[dependency])):
            # nft lists `meta l4proto udp th dport 53` as `udp dport 53`, and
            # drops `meta l4proto tcp` before `reject with tcp reset`.
            del out[dependency]
            statement, dependency = upper, None
        elif proto is not None:
            dependency = len(out)
        out.append(statement)
    return out


def _named_l4proto(statement: Any) -> Any:
    """`meta l4proto 6` as the kernel lists it: `meta l4proto tcp`."""
    match = statement.get("match") if isinstance(statement, dict) else None
    if isinstance(match, dict) and match.get("left") == {"meta": {"key": "l4proto"}}:
        right = match.get("right")
        if isinstance(right, int) and right in PROTO_NAMES:
            return {"match": {**match, "right": PROTO_NAMES[right]}}
    return statement


def _named_key(element: Any) -> Any:
    """A map element `[concat [6, ...], verdict]` with the protocol's name."""
    if not (isinstance(element, list) and element and isinstance(element[0], dict)):
        return element
    parts = element[0].get("concat")
    if isinstance(parts, list) and parts and isinstance(parts[0], int):
        named = [PROTO_NAMES.get(parts[0], parts[0]), *parts[1:]]
        return [{"concat": named}, *element[1:]]
    return element


def _l4proto(statement: Any) -> str | None:
    """P when the statement is `meta l4proto P` (P a transport with ports)."""
    match = statement.get("match") if isinstance(statement, dict) else None
    if not isinstance(match, dict) or match.get("op") != "==":
        return None
    if match.get("left") == {"meta": {"key": "l4proto"}} and match.get("right") in TRANSPORTS:
        return str(match["right"])
    return None


def _upper_layer(statement: Any, dependency: Any) -> Any:
    """The statement as nft lists it once the dependency is implied, or None."""
    proto = _l4proto(dependency)
    if statement == {"reject": {"type": "tcp reset"}} and proto == "tcp":
        return statement
    match = statement.get("match") if isinstance(statement, dict) else None
    if not isinstance(match, dict):
        return None
    left = match.get("left")
    payload = left.get("payload") if isinstance(left, dict) else None
    if isinstance(payload, dict) and payload.get("protocol") == "th":
        return {"match": {**match, "left": {"payload": {**payload, "protocol": proto}}}}
    return None


def _value(value: Any, family: str) -> Any:
    """An expression or value in canonical form (see the module's docstring)."""
    if isinstance(value, list):
        items = [_value(v, family) for v in value]
        # A list of names is a list of flags (ct state, tcp flags): no order.
        return sorted(items) if all(isinstance(v, str) for v in items) else items
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (name, arg), = value.items()  # fmt: skip
        if name in ("range", "concat") and isinstance(arg, list):
            return {name: [_value(v, family) for v in arg]}
        if name == "set" and isinstance(arg, list):
            items = _sorted([_value(v, family) for v in arg])
            return items[0] if len(items) == 1 else {"set": items}
        if name == "|" and isinstance(arg, list):
            return _sorted([_value(v, family) for v in arg])
        if name == "prefix" and isinstance(arg, dict) and arg.get("len") == FULL_PREFIX.get(family):
            return arg.get("addr")
    return {k: _value(v, family) for k, v in value.items()}


def kernel_digest(listing: Iterable[Json]) -> str:
    """The digest of the tailsfw tables the kernel holds (canonical form)."""
    return canonical(listing).digest()


def expected_digest(ruleset: Ruleset) -> str:
    """The digest `kernel_digest` gives when the kernel holds `ruleset`."""
    return canonical(ruleset.objects).digest()


def matches(listing: Iterable[Json], ruleset: Ruleset) -> bool:
    """Whether the kernel holds exactly the compiled ruleset's tables."""
    return canonical(listing).key() == canonical(ruleset.objects).key()


def differences(listing: Iterable[Json], ruleset: Ruleset) -> list[str]:
    """What differs between the kernel and the ruleset, readably; [] when equal."""
    return tables_differences(canonical(listing), canonical(ruleset.objects))


def settings_differences(wanted: Iterable[tuple[str, str]], found: Mapping[str, str]) -> list[str]:
    """Kernel settings (sysctl name, value wanted) that `found` holds otherwise."""
    return [
        f"setting {name}: is {found.get(name, 'missing')}, the policy wants {value}"
        for name, value in wanted
        if found.get(name) != value
    ]


def tables_differences(kernel: Tables, wanted: Tables) -> list[str]:
    """`differences` of tables already in canonical form (a listing that is
    compared with more than one ruleset is brought to it once)."""
    found = [f"{label}: in the kernel, not in the policy" for label in kernel.foreign]
    order = {kind: i for i, kind in enumerate(KINDS)}
    keys = sorted(kernel.objects.keys() | wanted.objects.keys(), key=lambda k: (order[k[0]], k))
    # A table on one side only is one difference, not one per object in it.
    lone = {f for kind, f, _ in keys if kind == "table"} - (
        {f for kind, f, _ in kernel.objects if kind == "table"}
        & {f for kind, f, _ in wanted.objects if kind == "table"}
    )
    for key in keys:
        if key[0] == "table" or key[1] not in lone:
            found += _object_difference(key, kernel.objects.get(key), wanted.objects.get(key))
    for family, chain in sorted(kernel.rules.keys() | wanted.rules.keys()):
        if ("chain", family, chain) not in kernel.objects.keys() & wanted.objects.keys():
            continue  # already named: a chain (or its table) on one side only
        found += _rule_differences(
            f"chain {family} {TABLE} {chain}",
            kernel.rules.get((family, chain), []),
            wanted.rules.get((family, chain), []),
        )
    return found


def _object_difference(
    key: tuple[str, str, str], has: Json | None, wants: Json | None
) -> list[str]:
    kind, family, name = key
    label = f"{kind} {family} {TABLE}" + (f" {name}" if name else "")
    if has is None:
        return [f"{label}: missing from the kernel"]
    if wants is None:
        return [f"{label}: in the kernel, not in the policy"]
    if has == wants:
        return []
    found = []
    for field in sorted(has.keys() | wants.keys()):
        if field == "elem":
            continue
        if kind == "table" and field == "flags" and not wants.get(field):
            # nft 1.0.6 lists a table's flags wrongly (another string): say what matters.
            found.append(f"{label}: has flags, the policy sets none ({DORMANT})")
        elif has.get(field) != wants.get(field):
            found.append(
                f"{label}: {field} is {_text(has.get(field))}, the policy wants "
                f"{_text(wants.get(field))}"
            )
    elements = has.get("elem", []), wants.get("elem", [])
    if not all(isinstance(e, list) for e in elements):
        return [*found, f"{label}: elements are {_text(elements[0])}"]
    extra, lacking = _elements(*elements)
    if extra:
        found.append(f"{label}: elements not in the policy: {extra}")
    if lacking:
        found.append(f"{label}: elements missing from the kernel: {lacking}")
    return found


def _elements(has: list[Any], wants: list[Any]) -> tuple[str, str]:
    has_keys = {json.dumps(e, sort_keys=True): e for e in has}
    wants_keys = {json.dumps(e, sort_keys=True): e for e in wants}
    extra = [_render_element(has_keys[k]) for k in sorted(has_keys.keys() - wants_keys.keys())]
    lacking = [_render_element(wants_keys[k]) for k in sorted(wants_keys.keys() - has_keys.keys())]
    return ", ".join(extra), ", ".join(lacking)


def _rule_differences(chain: str, has: list[Json], wants: list[Json]) -> list[str]:
    """Rules inserted, removed or changed, by their position (1 = first)."""
    if has == wants:
        return []
    import difflib  # only when tables differ: tailsfwctl status starts faster

    a = [json.dumps(r, sort_keys=True) for r in has]
    b = [json.dumps(r, sort_keys=True) for r in wants]
    found = []
    matcher = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            continue
        pairs = min(i2 - i1, j2 - j1) if op == "replace" else 0
        for k in range(pairs):
            found.append(
                f"{chain}: rule {i1 + k + 1} is `{render_rule(has[i1 + k])}`, "
                f"the policy wants `{render_rule(wants[j1 + k])}`"
            )
        for i in range(i1 + pairs, i2):
            found.append(f"{chain}: rule {i + 1} `{render_rule(has[i])}` is not in the policy")
        for j in range(j1 + pairs, j2):
            found.append(
                f"{chain}: rule `{render_rule(wants[j])}` (rule {j + 1} of the policy) "
                "is missing from the kernel"
            )
    return found


def _text(value: Any) -> str:
    return "absent" if value is None else render(value)


# -- a short nft-like rendering, for people --------------------------------


def render_rule(rule: Json) -> str:
    text = " ".join(render(s) for s in rule.get("expr", []))
    if rule.get("comment"):
        text += f' comment "{rule["comment"]}"'
    return text


VERDICTS = ("accept", "drop", "return", "continue")


def render(value: Any) -> str:
    """An expression, statement or value, about as `nft list` shows it."""
    if value is None:
        return "none"
    if isinstance(value, list):
        return ",".join(render(v) for v in value)
    if not isinstance(value, dict):
        return str(value)
    if len(value) != 1:
        return json.dumps(value, sort_keys=True)
    (name, arg), = value.items()  # fmt: skip
    if name in VERDICTS and arg is None:
        return str(name)
    simple = _render_simple(name, arg)
    return simple if simple is not None else json.dumps(value, sort_keys=True)


# How each expression with a dict argument reads (nft's own words where it has them).
DICT_FORMS: dict[str, Callable[[str, Json], str]] = {
    "match": lambda _, a: (
        f"{render(a.get('left'))} "
        + ("" if a.get("op") in ("==", "in") else f"{a.get('op')} ")
        + render(a.get("right"))
    ),
    "meta": lambda n, a: f"{n} {a.get('key')}",
    "ct": lambda n, a: f"{n} {a.get('key')}",
    "payload": lambda _, a: f"{a.get('protocol')} {a.get('field')}",
    "prefix": lambda _, a: f"{a.get('addr')}/{a.get('len')}",
    "jump": lambda n, a: f"{n} {a.get('target')}",
    "goto": lambda n, a: f"{n} {a.get('target')}",
    "vmap": lambda _, a: f"{render(a.get('key'))} vmap {render(a.get('data'))}",
    "mangle": lambda _, a: f"{render(a.get('key'))} set {render(a.get('value'))}",
    "redirect": lambda _, a: f"redirect to :{a.get('port')}",
    "log": lambda _, a: "log " + " ".join(f"{k} {json.dumps(v)}" for k, v in sorted(a.items())),
    "reject": lambda _, a: "reject with " + " ".join(str(v) for v in a.values()),
    "elem": lambda _, a: render(a.get("val")),
}
# And each with a list argument: the separator between its items.
LIST_FORMS = {"concat": " . ", "range": "-", "&": " & ", "|": " | ", "^": " ^ "}


def _render_simple(name: str, arg: Any) -> str | None:
    if isinstance(arg, dict) and name in DICT_FORMS:
        return DICT_FORMS[name](name, arg)
    if isinstance(arg, list) and name == "set":
        return "{ " + ", ".join(_render_element(v) for v in arg) + " }"
    if isinstance(arg, list) and name in LIST_FORMS:
        return LIST_FORMS[name].join(render(v) for v in arg)
    if name in ("counter", "reject") and arg is None:
        return name
    return None


def _render_element(value: Any) -> str:
    if isinstance(value, list) and len(value) == 2:
        return f"{render(value[0])} : {render(value[1])}"  # a map's key and verdict
    return render(value)
