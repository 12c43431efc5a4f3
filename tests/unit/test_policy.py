"""The policy loader: the shipped policy loads; every mistake is named."""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from tailsfw import policy

DEFAULT = Path(__file__).parents[2] / "etc" / "tailsfw" / "policy.toml"


def default_data() -> dict[str, Any]:
    with DEFAULT.open("rb") as f:
        return tomllib.load(f)


def test_default_policy_states_the_tails_filter() -> None:
    p = policy.load(DEFAULT)
    assert p.log.prefix == "Dropped outbound packet: "
    assert [u.fallback_uid for u in p.users if u.key == "amnesia"] == [1000]
    assert [d.user for d in p.direct] == ["clearnet", "debian-tor"]
    assert p.lan.networks == tuple(
        ipaddress.IPv4Network(n) for n in ("192.168.0.0/16", "10.0.0.0/8", "172.16.0.0/12")
    )
    assert p.lan.reject_udp_ports == (53, 137)
    assert [(r.protocol, str(r.destination), r.port, r.to_port) for r in p.redirects] == [
        ("tcp", "127.192.0.0/10", None, 9040),
        ("udp", "127.0.0.1/32", 53, 5353),
    ]
    ipv6 = [r for r in p.local if r.family == "ipv6"]
    assert [(r.ports, r.allow) for r in ipv6] == [((4101,), ("amnesia", "Debian-gdm"))]


def test_load_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(tomli_w.dumps(default_data()))
    assert policy.load(path).source == str(path)


def test_unreadable_and_malformed_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(policy.PolicyError, match=r"nope\.toml: cannot read"):
        policy.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[log\n")
    with pytest.raises(policy.PolicyError, match=r"bad\.toml: not valid TOML"):
        policy.load(bad)


def mutate(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    data = default_data()
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("colour",), "red", r"top level: unknown key 'colour'"),
        (("log", "level"), 3, r"log: unknown key 'level'"),
        (("log", "prefix"), "x" * 200, r"log\.prefix: longer than 127 bytes"),
        (("log", "group"), 70000, r"log\.group: 70000 is out of range"),
        (("log", "group"), "1", r"log\.group: must be an integer, not a string"),
        (("users",), DELETE, r"top level: missing key 'users'"),
        (("users", "htp", "uid"), 3, r"users\.htp: unknown key 'uid'"),
        (("users", "htp", "account"), "amnesia", r"users\.htp\.account: account 'amnesia' is"),
        (("users", "bad key!"), {"account": "x"}, r"users\.bad key!: a user key is"),
        (("local", 0, "ports"), [9050, 70000], r"local\[0\]\.ports\[1\]: bad port 70000"),
        (("local", 0, "ports"), [9050, 9050], r"local\[0\]\.ports: 9050 is listed twice"),
        (("local", 0, "ports"), [], r"local\[0\]\.ports: must list at least one port"),
        (("local", 0, "protocol"), "sctp", r"local\[0\]\.protocol: unknown value 'sctp'"),
        (("local", 0, "family"), "ipx", r"local\[0\]\.family: unknown value 'ipx'"),
        (("local", 0, "allow"), ["mallory"], r"local\[0\]\.allow\[0\]: unknown user 'mallory'"),
        (("local", 0, "reject"), ["_apt"], r"local\[0\]: user '_apt' is both allowed and reje"),
        (("local", 1, "allow"), [], r"local\[1\]: names no user"),
        (("direct", 1, "user"), "clearnet", r"direct\[1\]\.user: user 'clearnet' is listed tw"),
        (("direct", 0, "tcp"), "all", r"direct\[0\]\.tcp: unknown value 'all'"),
        (("direct", 0, "loopback"), "no", r"direct\[0\]\.loopback: must be true or false"),
        (("lan", "networks"), ["10.0.0.0/33"], r"lan\.networks\[0\]: bad IPv4 network"),
        (("lan", "networks"), ["10.0.0.1/8"], r"lan\.networks\[0\]: bad IPv4 network"),
        (
            ("lan", "networks"),
            ["127.0.0.0/16"],
            r"lan\.networks\[0\]: 127\.0\.0\.0/16 overlaps the loopback",
        ),
        (
            ("lan", "networks"),
            ["10.0.0.0/8", "10.1.0.0/16"],
            r"lan\.networks\[1\]: 10\.1\.0\.0/16 overlaps 10\.0",
        ),
        (("lan", "reject_udp_ports"), [53, 53], r"lan\.reject_udp_ports: 53 is listed twice"),
        (("lan", "mode"), "all", r"lan\.mode: unknown value 'all'"),
        (("redirect", 1, "to_port"), 0, r"redirect\[1\]\.to_port: bad port 0"),
        (("redirect", 0, "destination"), "onion", r"redirect\[0\]\.destination: bad IPv4"),
        (("redirect",), {"a": 1}, r"redirect: must be an array of tables"),
    ],
)
def test_each_mistake_is_named(path: tuple[Any, ...], value: Any, message: str) -> None:
    with pytest.raises(policy.PolicyError, match=r"^test\.toml: " + message):
        policy.parse(mutate(path, value), "test.toml")


def test_a_port_and_user_decided_twice_is_refused() -> None:
    data = default_data()
    data["local"].append({"protocol": "tcp", "ports": [9050], "allow": ["proxy"]})
    with pytest.raises(policy.PolicyError, match=r"tcp port 9050 for user 'proxy' is already"):
        policy.parse(data, "test.toml")


def test_a_port_after_any_port_for_the_same_user_is_unreachable() -> None:
    data = default_data()
    data["local"].append({"protocol": "tcp", "ports": [8080], "reject": ["amnesia"]})
    with pytest.raises(policy.PolicyError, match=r"already decided by local\[6\]"):
        policy.parse(data, "test.toml")
