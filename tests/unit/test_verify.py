"""verify: the kernel's listing against a compiled ruleset (no kernel here:
the listing is made the way the kernel lists our JSON, as the lab found)."""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tailsfw import cli, compiler, policy, summary, verify
from tailsfw.facts import Facts
from tailsfw.nft import Nft, NftError

DEFAULT = Path(__file__).parents[2] / "etc" / "tailsfw" / "policy.toml"
Json = dict[str, Any]


def compiled(mode: str = "rfc1918") -> compiler.Ruleset:
    pol = policy.load(DEFAULT)
    pol = dataclasses.replace(pol, lan=dataclasses.replace(pol.lan, mode=mode))  # type: ignore[arg-type]
    uids = {u.account: 2000 + i for i, u in enumerate(pol.users)}
    lan = frozenset(ipaddress.IPv4Network(n) for n in ("192.168.77.0/24", "10.1.0.0/16"))
    return compiler.compile_policy(pol, Facts(uids=uids, connected=lan))


def as_listed(ruleset: compiler.Ruleset) -> list[Json]:
    """The listing `nft -j list ruleset` gives for the ruleset (see verify's docstring)."""
    listing: list[Json] = [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}]
    for handle, obj in enumerate(copy.deepcopy(list(ruleset.objects)), start=1):
        kind, body = next(iter(obj.items()))
        body["handle"] = handle
        if "elem" in body:
            body["elem"].reverse()  # a hash set lists in its own order
        if kind == "rule":
            body["expr"] = _listed_expr(body["expr"], body["family"])
        listing.append({kind: body})
    # Another table, with a chain of another name, is not ours to judge.
    listing.append({"table": {"family": "inet", "name": "other", "handle": 99}})
    listing.append({"chain": {"family": "inet", "table": "other", "name": "c", "handle": 98}})
    return listing


# The kernel lists protocol numbers by name (the compiler writes numbers).
LISTED_PROTO = {1: "icmp", 6: "tcp", 17: "udp", 33: "dccp", 58: "ipv6-icmp", 132: "sctp",
                136: "udplite"}  # fmt: skip


def _listed_expr(expr: list[Json], family: str) -> list[Json]:
    out: list[Json] = []
    for statement in expr:
        right = statement.get("match", {}).get("right")
        if _is_l4(statement, None) and isinstance(right, int) and right in LISTED_PROTO:
            name = LISTED_PROTO[right]
            statement = {"match": {**statement["match"], "right": name}}
        if statement == {"counter": None}:
            statement = {"counter": {"packets": 12, "bytes": 3456}}
        elif statement == {"reject": None}:
            statement = {"reject": {"type": "icmp", "expr": "port-unreachable"}}
        elif statement == {"reject": {"type": "tcp reset"}} and out and _is_l4(out[-1], "tcp"):
            out.pop()
        else:
            match = statement.get("match", {})
            payload = match.get("left", {}).get("payload", {}) if isinstance(match, dict) else {}
            if payload.get("protocol") == "th" and out and _is_l4(out[-1], None):
                proto = out.pop()["match"]["right"]
                left = {"payload": {**payload, "protocol": proto}}
                statement = {"match": {**match, "left": left}}
        out.append(statement)
    return out


def _is_l4(statement: Json, proto: str | None) -> bool:
    match = statement.get("match", {})
    return match.get("left") == {"meta": {"key": "l4proto"}} and proto in (None, match["right"])


def rules_of(listing: list[Json], family: str, chain: str) -> list[Json]:
    return [
        o["rule"] for o in listing
        if "rule" in o and o["rule"]["family"] == family and o["rule"]["chain"] == chain
        and o["rule"]["table"] == "tailsfw"
    ]  # fmt: skip


@pytest.mark.parametrize("mode", ["rfc1918", "connected"])
def test_the_ruleset_as_the_kernel_lists_it_is_equal(mode: str) -> None:
    ruleset = compiled(mode)
    listing = as_listed(ruleset)
    assert verify.differences(listing, ruleset) == []
    assert verify.matches(listing, ruleset)
    assert verify.kernel_digest(listing) == verify.expected_digest(ruleset)


def test_digests_differ_with_the_ruleset() -> None:
    rfc1918, connected = compiled("rfc1918"), compiled("connected")
    assert verify.expected_digest(rfc1918) != verify.expected_digest(connected)


def test_an_inserted_rule_is_named_with_its_position() -> None:
    ruleset = compiled()
    listing = as_listed(ruleset)
    first = listing.index({"rule": rules_of(listing, "ip", "output")[0]})
    accept = {"family": "ip", "table": "tailsfw", "chain": "output", "expr": [{"accept": None}]}
    listing.insert(first, {"rule": accept})
    assert verify.differences(listing, ruleset) == [
        "chain ip tailsfw output: rule 1 `accept` is not in the policy"
    ]
    assert not verify.matches(listing, ruleset)


def test_a_removed_rule_is_named() -> None:
    ruleset = compiled()
    listing = as_listed(ruleset)
    listing.remove({"rule": rules_of(listing, "ip", "output")[1]})
    assert verify.differences(listing, ruleset) == [
        'chain ip tailsfw output: rule `ip daddr 127.0.0.1 jump local comment "Tails rule 2"` '
        "(rule 2 of the policy) is missing from the kernel"
    ]


def test_a_changed_rule_shows_both_sides() -> None:
    ruleset = compiled()
    listing = as_listed(ruleset)
    rule = rules_of(listing, "ip", "lan")[0]
    rule["expr"][0]["match"]["right"] = 54
    assert verify.differences(listing, ruleset) == [
        "chain ip tailsfw lan: rule 1 is `tcp dport 54 jump lan_refused`, "
        "the policy wants `tcp dport 53 jump lan_refused`"
    ]


def test_an_operator_change_is_a_difference() -> None:
    ruleset = compiled()
    listing = as_listed(ruleset)
    rules_of(listing, "ip", "local")[0]["expr"][0]["match"]["op"] = "=="
    (found,) = verify.differences(listing, ruleset)
    assert found.startswith(
        "chain ip tailsfw local: rule 1 is `meta oif lo ct status ! dnat return`"
    )


def test_a_chain_policy_and_an_extra_chain_are_named() -> None:
    ruleset = compiled()
    listing = as_listed(ruleset)
    for obj in listing:
        if obj.get("chain", {}).get("name") == "output" and obj["chain"]["family"] == "ip6":
            obj["chain"]["policy"] = "accept"
    listing.append({"chain": {"family": "ip", "table": "tailsfw", "name": "evil", "handle": 1}})
    assert verify.differences(listing, ruleset) == [
        "chain ip tailsfw evil: in the kernel, not in the policy",
        "chain ip6 tailsfw output: policy is accept, the policy wants drop",
    ]


def test_set_elements_added_and_removed_are_named() -> None:
    ruleset = compiled("connected")
    listing = as_listed(ruleset)
    lan = next(o["set"] for o in listing if o.get("set", {}).get("name") == "lan")
    lan["elem"].remove({"prefix": {"addr": "10.1.0.0", "len": 16}})
    lan["elem"].append("8.8.8.8")
    local = next(o["map"] for o in listing if o.get("map", {}).get("name") == "local_any")
    local["elem"].append([{"concat": ["tcp", 2001]}, {"accept": None}])
    assert verify.differences(listing, ruleset) == [
        "set ip tailsfw lan: elements not in the policy: 8.8.8.8",
        "set ip tailsfw lan: elements missing from the kernel: 10.1.0.0/16",
        "map ip tailsfw local_any: elements not in the policy: tcp . 2001 : accept",
    ]


def test_an_element_added_to_a_verdict_map_of_many_is_a_difference() -> None:
    """One more uid in lan_refused's skuid vmap would grant it clearnet's rights."""
    ruleset = compiled()
    listing = as_listed(ruleset)
    rule = next(r for r in rules_of(listing, "ip", "lan_refused") if "vmap" in r["expr"][0])
    position = rules_of(listing, "ip", "lan_refused").index(rule) + 1
    rule["expr"] = copy.deepcopy(rule["expr"])  # the output chain's rule shares the vmap
    data = rule["expr"][0]["vmap"]["data"]
    assert len(data["set"]) > 1
    data["set"].append([65000, {"jump": {"target": "direct_clearnet"}}])  # sorts last
    (found,) = verify.differences(listing, ruleset)
    assert found.startswith(f"chain ip tailsfw lan_refused: rule {position} is `meta skuid vmap {{")
    assert "65000 : jump direct_clearnet" in found
    assert verify.kernel_digest(listing) != verify.expected_digest(ruleset)
    data["set"].pop()
    data["set"][-1] = [65001, data["set"][-1][1]]  # the last of many changed
    assert len(verify.differences(listing, ruleset)) == 1


def test_counters_are_ignored_whatever_they_counted() -> None:
    ruleset = compiled()
    listing = as_listed(ruleset)
    for rule in (o["rule"] for o in listing if "rule" in o):
        for statement in rule["expr"]:
            if "counter" in statement:
                statement["counter"] = {"packets": 99999, "bytes": 123456789}
    assert verify.differences(listing, ruleset) == []
    assert verify.kernel_digest(listing) == verify.expected_digest(ruleset)


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"table": {"family": "inet", "name": "tailsfw"}}, "table inet tailsfw"),
        ({"table": {"family": "bridge", "name": "tailsfw"}}, "table bridge tailsfw"),
        ({"chain": {"family": "inet", "table": "filter", "name": "tailsfw"}},
         "chain inet filter tailsfw"),
        ({"set": {"family": "ip", "table": "nat", "name": "tailsfw", "type": "ipv4_addr"}},
         "set ip nat tailsfw"),
    ],
)  # fmt: skip
def test_anything_else_named_tailsfw_is_a_difference(extra: Json, named: str) -> None:
    ruleset = compiled()
    listing = [*as_listed(ruleset), extra]
    assert verify.differences(listing, ruleset) == [f"{named}: in the kernel, not in the policy"]
    assert not verify.matches(listing, ruleset)
    assert verify.kernel_digest(listing) != verify.expected_digest(ruleset)


def test_a_missing_table_is_one_difference() -> None:
    ruleset = compiled()
    listing = [o for o in as_listed(ruleset) if next(iter(o.values())).get("family") != "ip6"]
    assert verify.differences(listing, ruleset) == ["table ip6 tailsfw: missing from the kernel"]
    assert verify.differences([], ruleset) == [
        "table ip tailsfw: missing from the kernel",
        "table ip6 tailsfw: missing from the kernel",
    ]


def test_a_table_the_policy_does_not_have_is_one_difference() -> None:
    ruleset = compiled()
    lockdown = compiler.lockdown()
    assert verify.differences(as_listed(lockdown), lockdown) == []
    assert len(verify.differences(as_listed(ruleset), lockdown)) > 0


def test_flag_lists_and_one_element_sets_compare_as_the_kernel_lists_them() -> None:
    def ruleset(right: Any, op: str = "==") -> compiler.Ruleset:
        match = {"match": {"op": op, "left": {"ct": {"key": "state"}}, "right": right}}
        rule = {"family": "ip", "table": "tailsfw", "chain": "c", "expr": [match, {"accept": None}]}
        objects = (
            {"table": {"family": "ip", "name": "tailsfw"}},
            {"chain": {"family": "ip", "table": "tailsfw", "name": "c"}},
            {"rule": rule},
        )
        return compiler.Ruleset(objects, ())

    wanted = ruleset(["established", "related"])
    assert verify.matches(ruleset({"|": ["related", "established"]}).objects, wanted)
    assert not verify.matches(ruleset(["established", "related"], "in").objects, wanted)
    assert verify.matches(ruleset({"set": ["new"]}).objects, ruleset("new"))
    prefix = {"prefix": {"addr": "10.0.0.1", "len": 32}}
    assert verify.matches(ruleset(prefix).objects, ruleset("10.0.0.1"))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
RULESET = compiled("connected")
LISTED = as_listed(RULESET)


@settings(max_examples=100)
@given(st.integers(min_value=0), st.integers(min_value=0), JSON)
def test_odd_listings_never_raise(which: int, field: int, value: Any) -> None:
    """nft 1.0.6 lists a dormant table's flags as a random string: expect anything."""
    listing = copy.deepcopy(LISTED)
    _, body = next(iter(listing[1 + which % (len(listing) - 1)].items()))
    keys = sorted(body)
    body[keys[field % len(keys)]] = value
    found = verify.differences(listing, RULESET)
    assert verify.matches(listing, RULESET) == (found == [])


def test_verify_names_a_bad_policy_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "policy.toml"
    bad.write_bytes(b"[log\n")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    # Refused before the kernel is read.
    assert cli.main(["verify", "--policy", str(bad)]) == summary.BAD_POLICY
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "policy.toml: not valid TOML" in err


def test_verify_needs_root(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main(["verify", "--policy", str(DEFAULT)]) == summary.NO_PERMISSION
    assert "verify needs root" in capsys.readouterr().err


def test_verify_cannot_tell_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refused(self: object) -> list[Any]:
        raise NftError("Operation not permitted")

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(Nft, "list_ruleset", refused)
    assert cli.main(["verify", "--policy", str(DEFAULT)]) == cli.CANNOT_TELL
    assert capsys.readouterr().err == (
        "tailsfwctl: cannot verify: NftError: Operation not permitted\n"
    )
