"""Mutants of the shipped policy for the loader's fuzz, and an egress model.

Shared by the unit fuzz (never a traceback, never a hang, every accepted
mutant compiles) and the lab fuzz (accepted mutants let nothing out that the
shipped policy refuses, unless the mutant itself says so).

`egress_allowed` is the model the lab compares with: written from
docs/policy.md, independently of the compiler, for the few packets the lab
fuzz sends.
"""

from __future__ import annotations

import copy
import datetime
import ipaddress
import pwd
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from tailsfw.policy import Policy

SHIPPED = Path(__file__).resolve().parents[1] / "etc" / "tailsfw" / "policy.toml"
Tree = dict[str, Any]
Path_ = tuple[Any, ...]
Draw = Callable[[st.SearchStrategy[Any]], Any]

# Words the policy uses: mutants made of them often load, and so reach the
# compiler, not only the loader's first checks.
TOKENS = st.sampled_from(
    ["any", "tcp", "udp", "ipv4", "ipv6", "new", "none", "nm", "tor", "reject", "rfc1918",
     "connected", "amnesia", "clearnet", "debian-tor", "debian_tor", "root", "_apt", "nobody",
     "10.0.0.0/8", "192.168.0.0/24", "172.16.0.0/12", "0.0.0.0/0", "8.8.8.8", "127.0.0.1",
     "224.0.0.0/4", "198.51.100.0/24", "", " ", "a:b", "x\x00y", "\n", '"', "\\"]
)  # fmt: skip
SCALARS = st.one_of(
    TOKENS,
    st.integers(min_value=-2, max_value=70000),
    st.integers(),
    st.sampled_from([0, 1, 53, 137, 5353, 65535, 65536, 2**32 - 1, 2**32, 2**64, 10**4000]),
    st.floats(),
    st.booleans(),
    st.text(max_size=20),
    st.dates(min_value=datetime.date(1, 1, 1)),
)
VALUES: st.SearchStrategy[Any] = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
KEYS = st.one_of(TOKENS, st.text(max_size=12))
# Names that must never reach pwd, nft or a log line as they are.
NASTY_NAMES = st.one_of(
    st.sampled_from(["x\x00y", "a\nb", "", "a:b", "-x", "x" * 40, "\x7f", "é", "a b", "a/b"]),
    st.text(max_size=12),
)
# Values written straight into the TOML text after a `key = `.
VALUE_BYTES = st.sampled_from(
    [b"[" * 2000, b"9" * 5000, b"-" + b"9" * 5000, b'"\\u0000"', b'"x\x00"', b"\xff\xfe",
     b"{ a = { b = { c = 1 } } }", b"-1", b"0", b"1e400", b"nan", b"true", b'"a\\nb"', b"[]",
     b'"' + b"x" * 300 + b'"', b"1000.9", b'"1000"', b"2020-01-01"]
)  # fmt: skip
BYTES = st.one_of(
    st.binary(min_size=1, max_size=6),
    st.sampled_from(
        [
            b"[",
            b"]",
            b"{",
            b"}",
            b'"',
            b"'",
            b"=",
            b"\n",
            b"\x00",
            b"\xff",
            b"\xc3",
            b"[[",
            b"#",
            b",",
            b"9" * 5000,
            b"[" * 2000,
        ]
    ),
)


def shipped() -> Tree:
    with SHIPPED.open("rb") as f:
        return tomllib.load(f)


def paths(tree: Any, prefix: Path_ = ()) -> list[Path_]:
    """Every path below the root, in a stable order."""
    out: list[Path_] = []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for key, value in items:
        out.append((*prefix, key))
        if isinstance(value, (dict, list)):
            out += paths(value, (*prefix, key))
    return out


def containers(tree: Tree) -> list[Path_]:
    return [()] + [p for p in paths(tree) if isinstance(get(tree, p), (dict, list))]


def get(tree: Any, path: Path_) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def structural(draw: Draw, tree: Tree, ops: int) -> Tree:
    """`ops` random edits: set a value, delete, insert, duplicate or rename."""
    tree = copy.deepcopy(tree)
    for _ in range(ops):
        op = draw(st.sampled_from(["set", "delete", "insert", "duplicate", "rename"]))
        everything = paths(tree)
        if op in ("set", "delete") and everything:
            path = draw(st.sampled_from(everything))
            parent = get(tree, path[:-1])
            if op == "set":
                parent[path[-1]] = draw(VALUES)
            else:
                del parent[path[-1]]
            continue
        where = get(tree, draw(st.sampled_from(containers(tree))))
        if op == "insert" and isinstance(where, dict):
            where[draw(KEYS)] = draw(VALUES)
        elif op == "insert":
            where.insert(draw(st.integers(0, len(where))), draw(VALUES))
        elif op == "duplicate" and isinstance(where, list) and where:
            where.append(copy.deepcopy(draw(st.sampled_from(where))))
        elif op == "rename" and isinstance(where, dict) and where:
            old = draw(st.sampled_from(sorted(where)))
            where[draw(KEYS)] = where.pop(old)
    return tree


def byte_level(draw: Draw, data: bytes, ops: int) -> bytes:
    """`ops` random edits of the bytes: flip, insert, delete, duplicate, truncate."""
    for _ in range(ops):
        op = draw(st.sampled_from(["flip", "insert", "delete", "duplicate", "truncate", "value"]))
        i = draw(st.integers(0, len(data)))
        j = draw(st.integers(i, min(len(data), i + 64)))
        if op == "flip" and i < len(data):
            data = data[:i] + bytes([data[i] ^ (1 << draw(st.integers(0, 7)))]) + data[i + 1 :]
        elif op == "insert":
            data = data[:i] + draw(BYTES) + data[i:]
        elif op == "delete":
            data = data[:i] + data[j:]
        elif op == "duplicate":
            data = data[:j] + data[i:j] + data[j:]
        elif op == "truncate":
            data = data[:i]
        elif op == "value":  # the value after one `key = `, whole to the line's end
            starts = [k + 3 for k in range(len(data)) if data[k : k + 3] == b" = "]
            if starts:
                start = draw(st.sampled_from(starts))
                end = data.find(b"\n", start)
                data = data[:start] + draw(VALUE_BYTES) + (data[end:] if end >= 0 else b"")
    return data


def semantic(draw: Draw, tree: Tree) -> Tree:
    """An edit a person could make on purpose; most of these load."""
    tree = copy.deepcopy(tree)
    users = sorted(tree["users"])
    op = draw(st.sampled_from(
        ["swap", "drop_local", "drop_direct", "port", "lan", "mode", "dns", "new_user",
         "direct", "refused_ports", "log", "rename", "account", "names", "junk"]
    ))  # fmt: skip
    port = st.integers(1, 65535)
    if op == "swap":
        section = draw(st.sampled_from(["local", "direct", "redirect"]))
        entries = tree[section]
        i, j = draw(st.integers(0, len(entries) - 1)), draw(st.integers(0, len(entries) - 1))
        entries[i], entries[j] = entries[j], entries[i]
    elif op == "drop_local":
        del tree["local"][draw(st.integers(0, len(tree["local"]) - 1))]
    elif op == "drop_direct":
        del tree["direct"][draw(st.integers(0, len(tree["direct"]) - 1))]
    elif op == "port":
        entry = tree["local"][draw(st.integers(0, len(tree["local"]) - 1))]
        if isinstance(entry["ports"], list):
            entry["ports"][0] = draw(port)
    elif op == "lan":
        tree["lan"]["networks"] = draw(st.lists(private_network(), min_size=1, max_size=4))
    elif op == "mode":
        tree["lan"]["mode"] = draw(st.sampled_from(["rfc1918", "connected"]))
    elif op == "dns":
        tree["dns"] = {"clearnet": draw(st.sampled_from(["any", "nm"])),
                       "stray": draw(st.sampled_from(["reject", "tor"]))}  # fmt: skip
    elif op == "new_user":
        key = draw(st.from_regex(r"[a-z][a-z0-9_.-]{0,10}", fullmatch=True))
        tree["users"][key] = {"account": draw(st.from_regex(r"[a-z][a-z0-9-]{0,10}",
                                                            fullmatch=True))}  # fmt: skip
        if draw(st.booleans()):
            tree["users"][key]["fallback_uid"] = draw(st.integers(1, 70000))
    elif op == "direct":
        entry = tree["direct"][draw(st.integers(0, len(tree["direct"]) - 1))]
        entry["tcp"] = draw(st.sampled_from(["any", "new", "none"]))
        entry["udp_ports"] = draw(st.lists(port, max_size=3, unique=True))
        entry["loopback"] = draw(st.booleans())
    elif op == "refused_ports":
        kind = draw(st.sampled_from(["reject_tcp_ports", "reject_udp_ports"]))
        tree["lan"][kind] = draw(st.lists(port, max_size=4, unique=True))
    elif op == "log":
        tree["log"] = {"prefix": draw(st.text(max_size=30)), "group": draw(st.integers(-1, 70000))}
    elif op == "rename":
        old = draw(st.sampled_from(users))
        new = draw(st.sampled_from([old.replace("-", "_"), old.replace("-", "."), old + "2"]))
        rename_user(tree, old, new)
    elif op == "account":
        a, b = draw(st.sampled_from(users)), draw(st.sampled_from(users))
        tree["users"][a]["account"], tree["users"][b]["account"] = (
            tree["users"][b]["account"], tree["users"][a]["account"])  # fmt: skip
    elif op == "names":
        user = draw(st.sampled_from(users))
        field = draw(st.sampled_from(["account", "key", "prefix"]))
        name = draw(NASTY_NAMES)
        if field == "account":
            tree["users"][user]["account"] = name
        elif field == "key":
            rename_user(tree, user, name)
        else:
            tree["log"]["prefix"] = name
    else:
        tree = structural(draw, tree, 1)
    return tree


def rename_user(tree: Tree, old: str, new: str) -> None:
    """A user key renamed everywhere the policy names it."""
    if new in tree["users"]:
        return
    tree["users"][new] = tree["users"].pop(old)
    for entry in tree.get("local", []):
        for side in ("allow", "reject"):
            entry[side] = [new if u == old else u for u in entry.get(side, [])]
    for entry in tree.get("direct", []):
        if entry["user"] == old:
            entry["user"] = new


def private_network() -> st.SearchStrategy[str]:
    blocks = [ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")]

    def inside(block: ipaddress.IPv4Network, length: int, offset: int) -> str:
        length = max(length, block.prefixlen)
        size = 1 << (32 - length)
        start = int(block.network_address) + (offset % (block.num_addresses // size)) * size
        return f"{ipaddress.IPv4Address(start)}/{length}"

    return st.builds(inside, st.sampled_from(blocks), st.integers(8, 32), st.integers(0, 2**24))


# -- what a policy says may leave the host ------------------------------------

PORTED = ("tcp", "udp", "udplite", "sctp", "dccp")


def resolve(pol: Policy) -> dict[str, int]:
    """User key -> uid, as docs/policy.md says: the account's uid, else the
    fallback uid unless another user's account has it."""
    accounts: dict[str, int] = {}
    for user in pol.users:
        try:
            accounts[user.key] = pwd.getpwnam(user.account).pw_uid
        except KeyError:
            continue
    taken = set(accounts.values())
    for user in pol.users:
        if user.key not in accounts and user.fallback_uid not in (None, *taken):
            assert user.fallback_uid is not None
            accounts[user.key] = user.fallback_uid
    return accounts


def egress_allowed(
    pol: Policy, uids: Mapping[str, int], uid: int, proto: str, dst: str, port: int | None
) -> bool:
    """Whether `pol` lets this new packet from `uid` leave the host, loaded
    with no DNS servers and no on-link networks known (as `tailsfwctl apply`)."""
    addr = ipaddress.ip_address(dst)
    if addr.version == 6:
        return False
    for r in pol.redirects:  # nat first: these go to 127.0.0.1
        if addr in r.destination and proto == r.protocol and r.port in (None, port):
            return False
    direct = [d for d in pol.direct if d.user in uids]
    if (pol.dns.stray == "tor" and proto == "udp" and port == 53 and not addr.is_loopback
            and uid not in {uids[d.user] for d in direct}):  # fmt: skip
        return False
    dns_anywhere = pol.dns.clearnet == "any"  # "nm" with no server known: none
    for d in direct:
        if uids[d.user] != uid or (port == 53 and not dns_anywhere):
            continue
        if (proto == "tcp" and d.tcp != "none") or (proto == "udp" and port in d.udp_ports):
            return True
    if pol.lan.mode == "rfc1918" and any(addr in net for net in pol.lan.networks):
        tcp, udp = set(pol.lan.reject_tcp_ports), set(pol.lan.reject_udp_ports)
        refused = {"tcp": tcp, "udp": udp}.get(proto, tcp | udp if proto in PORTED else set())
        return port not in refused
    return False
