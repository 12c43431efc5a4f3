"""The policy loader: the shipped policy loads; every mistake is named."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import time
import tomllib
from collections.abc import Callable, Iterator
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


DELETE = object()


def index(section: str, **content: Any) -> int:
    """The position of the shipped policy's entry that has this content: tests
    name entries by what they say, so inserting one elsewhere breaks none."""
    (found,) = [
        i for i, entry in enumerate(default_data()[section])
        if all(entry.get(k) == v for k, v in content.items())
    ]  # fmt: skip
    return found


TOR_SOCKS = index("local", ports=[9050])
ONION_GRATER = index("local", ports=[951])
CLEARNET = index("direct", user="clearnet")
TOR = index("direct", user="debian-tor")
DNS_REDIRECT = index("redirect", to_port=5353)
AUTOMAP = index("redirect", to_port=9040)


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


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("colour",), "red", r"top level: unknown key 'colour'"),
        (("log", "level"), 3, r"log: unknown key 'level'"),
        (("log", "prefix"), "x" * 200, r"log\.prefix: longer than 127 bytes"),
        (("log", "prefix"), "a\x00b", r"log\.prefix: must not contain '\\x00'"),
        (("log", "prefix"), "drop\n", r"log\.prefix: must not contain '\\n'"),
        (("log", "prefix"), 'say "x"', r"log\.prefix: must not contain '\"'"),
        (("log", "group"), 70000, r"log\.group: 70000 is out of range"),
        (("log", "group"), "1", r"log\.group: must be an integer, not a string"),
        (("log", "group"), True, r"log\.group: must be an integer, not a boolean"),
        pytest.param(
            ("log", "group"), 2**20000, r"log\.group: an integer of 20001 bits is out of", id="huge"
        ),
        (("users",), DELETE, r"top level: missing key 'users'"),
        (("users", "htp", "uid"), 3, r"users\.htp: unknown key 'uid'"),
        (("users", "htp", "account"), "amnesia", r"users\.htp\.account: account 'amnesia' is"),
        (
            ("users", "htp", "account"),
            "ht\x00p",
            r"users\.htp\.account: bad account name 'ht\\x00p'",
        ),
        (("users", "htp", "account"), "", r"users\.htp\.account: bad account name ''"),
        (("users", "htp", "account"), "a:b", r"users\.htp\.account: bad account name 'a:b'"),
        (("users", "htp", "account"), "x" * 40, r"users\.htp\.account: bad account name 'xxx"),
        (("users", "bad key!"), {"account": "x"}, r"users\.'bad key!': a user key is"),
        (("users", "a\x00b"), {"account": "x"}, r"users\.'a\\x00b': a user key is"),
        (("users", "k" * 65), {"account": "x"}, r"users\.'kkk.*\.\.\.: a user key is"),
        # A fallback uid stands for a missing account: never root, never a
        # string, a fraction, a boolean or a negative number.
        (("users", "amnesia", "fallback_uid"), -1, r"users\.amnesia\.fallback_uid: -1 is out of"),
        (("users", "amnesia", "fallback_uid"), 0, r"users\.amnesia\.fallback_uid: 0 is out of"),
        (
            ("users", "amnesia", "fallback_uid"),
            "1000",
            r"users\.amnesia\.fallback_uid: must be an integer, not a s",
        ),
        (
            ("users", "amnesia", "fallback_uid"),
            1000.9,
            r"users\.amnesia\.fallback_uid: must be an integer, not a n",
        ),
        (
            ("users", "amnesia", "fallback_uid"),
            True,
            r"users\.amnesia\.fallback_uid: must be an integer, not a b",
        ),
        (
            ("users", "amnesia", "fallback_uid"),
            2**32 - 1,
            r"users\.amnesia\.fallback_uid: 4294967295 is out",
        ),
        (
            ("local", TOR_SOCKS, "ports"),
            [9050, 70000],
            rf"local\[{TOR_SOCKS}\]\.ports\[1\]: bad port 70000",
        ),
        (
            ("local", TOR_SOCKS, "ports"),
            [9050, 9050],
            rf"local\[{TOR_SOCKS}\]\.ports: 9050 is listed twice",
        ),
        (("local", TOR_SOCKS, "ports"), [], rf"local\[{TOR_SOCKS}\]\.ports: must list at least"),
        (("local", TOR_SOCKS, "ports"), "all", rf"local\[{TOR_SOCKS}\]\.ports: must be a list"),
        (
            ("local", TOR_SOCKS, "protocol"),
            "sctp",
            rf"local\[{TOR_SOCKS}\]\.protocol: unknown value 'sctp'",
        ),
        (
            ("local", TOR_SOCKS, "protocol"),
            ["tcp"],
            rf"local\[{TOR_SOCKS}\]\.protocol: unknown value a list",
        ),
        (("local", TOR_SOCKS, "family"), "ipx", rf"local\[{TOR_SOCKS}\]\.family: unknown value"),
        (
            ("local", TOR_SOCKS, "allow"),
            ["mallory"],
            rf"local\[{TOR_SOCKS}\]\.allow\[0\]: unknown user 'mallory'",
        ),
        (
            ("local", TOR_SOCKS, "reject"),
            ["_apt"],
            rf"local\[{TOR_SOCKS}\]: user '_apt' is both allowed and reje",
        ),
        (("local", ONION_GRATER, "allow"), [], DELETE),
        (
            ("direct", TOR, "user"),
            "clearnet",
            rf"direct\[{TOR}\]\.user: user 'clearnet' is listed tw",
        ),
        (("direct", CLEARNET, "tcp"), "all", rf"direct\[{CLEARNET}\]\.tcp: unknown value 'all'"),
        (
            ("direct", CLEARNET, "loopback"),
            "no",
            rf"direct\[{CLEARNET}\]\.loopback: must be true or false",
        ),
        (
            ("direct", CLEARNET, "udp_ports"),
            [53, 53.0],
            rf"direct\[{CLEARNET}\]\.udp_ports\[1\]: bad port 53\.0",
        ),
        (("lan", "networks"), ["10.0.0.0/33"], r"lan\.networks\[0\]: bad IPv4 network"),
        (("lan", "networks"), ["10.0.0.1/8"], r"lan\.networks\[0\]: bad IPv4 network"),
        (
            ("lan", "networks"),
            ["10.0.0.0/8", "10.0.0.0/8"],
            r"lan\.networks: 10\.0\.0\.0/8 is listed tw",
        ),
        (("lan", "networks"), [1], r"lan\.networks\[0\]: must be a string, not an integer"),
        (("lan", "reject_udp_ports"), [53, 53], r"lan\.reject_udp_ports: 53 is listed twice"),
        (("lan", "mode"), "all", r"lan\.mode: unknown value 'all'"),
        (
            ("redirect", DNS_REDIRECT, "to_port"),
            0,
            rf"redirect\[{DNS_REDIRECT}\]\.to_port: bad port 0",
        ),
        (
            ("redirect", DNS_REDIRECT, "to_port"),
            "5353",
            rf"redirect\[{DNS_REDIRECT}\]\.to_port: bad port '5353'",
        ),
        (
            ("redirect", DNS_REDIRECT, "port"),
            "53",
            rf"redirect\[{DNS_REDIRECT}\]\.port: bad port '53'",
        ),
        (("redirect", DNS_REDIRECT, "port"), 0, rf"redirect\[{DNS_REDIRECT}\]\.port: bad port 0"),
        (("redirect", DNS_REDIRECT, "port"), -1, rf"redirect\[{DNS_REDIRECT}\]\.port: bad port -1"),
        (
            ("redirect", DNS_REDIRECT, "port"),
            53.5,
            rf"redirect\[{DNS_REDIRECT}\]\.port: bad port 53\.5",
        ),
        (
            ("redirect", DNS_REDIRECT, "port"),
            True,
            rf"redirect\[{DNS_REDIRECT}\]\.port: bad port True",
        ),
        (
            ("redirect", AUTOMAP, "destination"),
            "onion",
            rf"redirect\[{AUTOMAP}\]\.destination: bad IPv4",
        ),
        (("redirect",), {"a": 1}, r"redirect: must be an array of tables"),
        (("dns",), {"clearnet": "dhcp"}, r"dns\.clearnet: unknown value 'dhcp'"),
        (("dns",), {"stray": "accept"}, r"dns\.stray: unknown value 'accept'"),
        (("dns",), {"tor_port": 0}, r"dns\.tor_port: bad port 0"),
        (("dns",), {"tor": 1}, r"dns: unknown key 'tor'"),
        (("dns",), "nm", r"dns: must be a table, not a string"),
    ],
)
def test_each_mistake_is_named(path: tuple[Any, ...], value: Any, message: Any) -> None:
    if message is DELETE:  # the value itself is the mistake: see the pattern below
        message = rf"local\[{path[1]}\]: names no user"
    with pytest.raises(policy.PolicyError, match=r"^test\.toml: " + message) as raised:
        policy.parse(mutate(path, value), "test.toml")
    assert "\n" not in str(raised.value) and len(str(raised.value)) < 300


@pytest.mark.parametrize(
    ("networks", "message"),
    [
        (["198.51.100.0/24"], r"\[0\]: 198\.51\.100\.0/24 is not private"),
        (["8.8.8.8/32"], r"\[0\]: 8\.8\.8\.8/32 is not private"),
        (["224.0.0.0/4"], r"\[0\]: 224\.0\.0\.0/4 is not private"),
        (["10.0.0.0/8", "0.0.0.0/1"], r"\[1\]: 0\.0\.0\.0/1 is not private"),
        (["127.0.0.0/16"], r"\[0\]: 127\.0\.0\.0/16 is not private"),
        (["10.0.0.0/7"], r"\[0\]: 10\.0\.0\.0/7 is not private"),  # also 11/8
        (["172.0.0.0/11"], r"\[0\]: 172\.0\.0\.0/11 is not private"),  # also 172.16/12
        (["10.0.0.0/8", "10.1.0.0/16"], r"\[1\]: 10\.1\.0\.0/16 overlaps lan\.networks\[0\]"),
        (
            ["10.1.0.0/16", "192.168.0.0/16", "10.0.0.0/8"],
            r"\[2\]: 10\.0\.0\.0/8 overlaps lan\.networks\[0\] 10\.1\.0\.0/16",
        ),
    ],
)
def test_lan_networks_lie_inside_rfc1918_and_never_overlap(
    networks: list[str], message: str
) -> None:
    with pytest.raises(policy.PolicyError, match=r"^test\.toml: lan\.networks" + message):
        policy.parse(mutate(("lan", "networks"), networks), "test.toml")


def test_every_private_block_and_its_parts_are_accepted() -> None:
    nets = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/24", "192.168.1.7/32"]
    assert [str(n) for n in policy.parse(mutate(("lan", "networks"), nets), "t").lan.networks] == [
        "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/24", "192.168.1.7/32"]  # fmt: skip


def test_user_keys_differing_only_by_punctuation_stay_distinct() -> None:
    data = default_data()
    data["users"]["debian_tor"] = {"account": "amnesia-other"}
    data["users"]["debian.tor"] = {"account": "amnesia-third"}
    keys = {u.key for u in policy.parse(data, "t").users}
    assert {"debian-tor", "debian_tor", "debian.tor"} <= keys


def test_dns_defaults_are_tails_behaviour() -> None:
    assert policy.load(DEFAULT).dns == policy.Dns(clearnet="any", stray="reject", tor_port=5353)
    p = policy.parse(mutate(("dns",), {"clearnet": "nm", "stray": "tor"}), "t")
    assert p.dns == policy.Dns(clearnet="nm", stray="tor", tor_port=5353)


def test_a_port_and_user_decided_twice_is_refused() -> None:
    data = default_data()
    data["local"].append({"protocol": "tcp", "ports": [9050], "allow": ["proxy"]})
    with pytest.raises(policy.PolicyError, match=r"tcp port 9050 for user 'proxy' is already"):
        policy.parse(data, "test.toml")


def test_a_port_after_any_port_for_the_same_user_is_unreachable() -> None:
    data = default_data()
    data["local"].append({"protocol": "tcp", "ports": [8080], "reject": ["amnesia"]})
    anyport = index("local", ports="any")
    with pytest.raises(policy.PolicyError, match=rf"already decided by local\[{anyport}\]"):
        policy.parse(data, "test.toml")


# -- the file itself --------------------------------------------------------


@contextlib.contextmanager
def hang_fails_in(seconds: int) -> Iterator[None]:
    """A blocking open or read (a FIFO with no writer) fails the test."""

    def hung(signum: int, frame: object) -> None:
        raise TimeoutError(f"policy.load still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: os.mkfifo(p), "not a regular file (a FIFO)"),
        (lambda p: p.mkdir(), "not a regular file (a directory)"),
        (lambda p: p.symlink_to("/dev/zero"), "not a regular file (a character device)"),
        (lambda p: p.write_bytes(b"#" * (policy.MAX_POLICY_BYTES + 1)), "a policy is at most"),
        (
            lambda p: p.write_bytes(b'[log]\nprefix = "\xff"\n'),
            "not UTF-8: line 2: byte 0xff at offset 16",
        ),
        (lambda p: p.write_bytes(b"a = " + b"[" * 100_000), "nested too deeply"),
        (lambda p: p.write_bytes(b"a = " + b"9" * 5000), "not valid TOML: Exceeds the limit"),
        (lambda p: p.write_bytes(b'a = "\x00"'), "not valid TOML"),
    ],
)
def test_the_file_is_a_bounded_regular_utf8_toml_file(
    tmp_path: Path, make: Callable[[Path], Any], message: str
) -> None:
    """Never a hang (a FIFO with no writer), never a flood (/dev/zero),
    never a traceback: one line naming the file."""
    path = tmp_path / "policy.toml"
    make(path)
    start = time.monotonic()
    with hang_fails_in(5), pytest.raises(policy.PolicyError) as raised:
        policy.load(path)
    assert time.monotonic() - start < 2
    text = str(raised.value)
    assert text.startswith(f"{path}: ") and message in text, text
    assert "\n" not in text and len(text) < 300


def test_ten_thousand_networks_ports_and_users_load_in_well_under_a_second() -> None:
    """No quadratic check: overlaps are found by sorting."""
    data = default_data()
    data["lan"]["networks"] = [f"10.{i // 256}.{i % 256}.0/24" for i in range(10_000)]
    data["lan"]["reject_udp_ports"] = list(range(1, 10_001))
    data["local"][TOR_SOCKS]["ports"] = list(range(20_000, 30_000))
    for i in range(10_000):
        data["users"][f"u{i}"] = {"account": f"acct{i}"}
    text = tomli_w.dumps(data).encode()
    start = time.perf_counter()
    p = policy.parse(policy.decode(text, "big.toml"), "big.toml")
    elapsed = time.perf_counter() - start
    assert len(p.lan.networks) == 10_000 and len(p.users) == 10_011
    assert elapsed < 1.0, elapsed
