"""A stateful fake of the kernel's nftables tables, for unit tests.

Like the kernel, it applies a JSON document whole or refuses it whole (an
`NftError`, the tables untouched), resolves names as it reads (a jump to a
chain or a lookup in a set that does not exist yet is refused), can be
tampered with as another program would, and dumps what it holds, so that
tests assert the end state rather than a list of calls.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tailsfw.nft import NftError

Doc = dict[str, Any]


@dataclass
class Table:
    chains: dict[str, Doc] = field(default_factory=dict)
    rules: dict[str, list[Doc]] = field(default_factory=dict)  # chain -> rule bodies
    sets: dict[str, Doc] = field(default_factory=dict)  # sets and maps, with "elem"


Tables = dict[tuple[str, str], Table]  # (family, name) -> table


class FakeKernel:
    def __init__(self) -> None:
        self.tables: Tables = {}
        self.documents: list[Doc] = []  # every document applied, in order
        self.refused: list[Doc] = []
        # Refuses a document when it returns a message (a kernel that says no).
        self.refuse: Callable[[Doc], str | None] = lambda doc: None

    # -- libnftables' face (tailsfw.enforce.NftApi) ---------------------------

    def apply(self, document: Doc) -> None:
        why = self.refuse(document)
        work = copy.deepcopy(self.tables)
        try:
            if why is not None:
                raise NftError(why)
            for command in document["nftables"]:
                ((verb, body),) = command.items()
                if verb != "metainfo":
                    _run(work, verb, body)
        except NftError:
            self.refused.append(document)
            raise
        self.tables = work
        self.documents.append(document)

    def list_ruleset(self) -> list[Doc]:
        out: list[Doc] = []
        for (family, name), table in sorted(self.tables.items()):
            out.append({"table": {"family": family, "name": name}})
            out += [{"chain": c} for c in table.chains.values()]
            out += [{"map" if "map" in s else "set": s} for s in table.sets.values()]
            out += [{"rule": r} for rules in table.rules.values() for r in rules]
        return out

    # -- what a test looks at -------------------------------------------------

    def families(self) -> set[str]:
        return {family for family, _ in self.tables}

    def table(self, family: str, name: str = "tailsfw") -> Table:
        return self.tables[(family, name)]

    def elements(self, family: str, name: str) -> list[Any]:
        return list(self.table(family).sets[name].get("elem", []))

    def dump(self) -> Doc:
        """Everything held, comparable with `==`."""
        return {f"{f} {n}": vars(t) for (f, n), t in sorted(self.tables.items())}

    def holds(self, document: Doc) -> bool:
        """Whether the tables are exactly what `document` makes of an empty kernel."""
        other = FakeKernel()
        other.apply(document)
        return other.dump() == self.dump()

    # -- another program --------------------------------------------------------

    def tamper(self, *commands: Doc) -> None:
        self.apply({"nftables": list(commands)})


def _key(body: Doc) -> tuple[str, str]:
    return str(body["family"]), str(body.get("table", body.get("name", "")))


def _run(tables: Tables, verb: str, body: Doc) -> None:
    ((kind, obj),) = body.items()
    if kind == "ruleset" and verb == "flush":
        tables.clear()
        return
    key = (obj["family"], obj["name"]) if kind == "table" else _key(obj)
    if kind == "table":
        if verb == "add":
            tables.setdefault(key, Table())
        elif verb == "delete":
            _need(tables, key)
            del tables[key]
        elif verb == "flush":
            table = _need(tables, key)
            table.rules = {c: [] for c in table.rules}
        return
    table = _need(tables, key)
    name = obj.get("name", obj.get("chain", ""))
    if kind == "chain":
        if verb == "add":
            table.chains.setdefault(name, obj)
            table.rules.setdefault(name, [])
        elif verb == "flush":
            _need_in(table.rules, name, "chain")[:] = []
        elif verb == "delete":
            _need_in(table.chains, name, "chain")
            del table.chains[name], table.rules[name]
    elif kind in ("set", "map"):
        if verb == "add":
            table.sets.setdefault(name, copy.deepcopy(obj))
        elif verb == "flush":
            _need_in(table.sets, name, kind).pop("elem", None)
        elif verb == "delete":
            _need_in(table.sets, name, kind)
            del table.sets[name]
    elif kind == "element" and verb == "add":
        target = _need_in(table.sets, name, "set")
        target["elem"] = [*target.get("elem", []), *obj["elem"]]
    elif kind == "rule" and verb in ("add", "insert"):
        rules = _need_in(table.rules, obj["chain"], "chain")
        _resolve(table, obj["expr"])
        rule = {k: v for k, v in obj.items() if k not in ("handle", "index")}
        rules.insert(0 if verb == "insert" else len(rules), rule)
    else:
        raise NftError(f"the fake kernel does not know `{verb} {kind}`")


def _resolve(table: Table, expr: Any) -> None:
    """Names are resolved as the rule is read, as nft does."""
    if isinstance(expr, dict):
        for k, v in expr.items():
            if k in ("jump", "goto"):
                _need_in(table.chains, v["target"], "chain")
            elif isinstance(v, str) and v.startswith("@"):
                _need_in(table.sets, v[1:], "set")
            else:
                _resolve(table, v)
    elif isinstance(expr, list):
        for item in expr:
            _resolve(table, item)


def _need(tables: Tables, key: tuple[str, str]) -> Table:
    if key not in tables:
        raise NftError(f"Could not process rule: No such file or directory: table {key}")
    return tables[key]


def _need_in(objects: dict[str, Any], name: str, kind: str) -> Any:
    if name not in objects:
        raise NftError(f"Could not process rule: No such file or directory: {kind} {name}")
    return objects[name]
