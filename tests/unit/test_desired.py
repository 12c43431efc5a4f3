"""desired: facts that differ only where the compiler does not read give the
same ruleset; a Desired reuses its predecessor's ruleset only then."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path
from types import MappingProxyType

from hypothesis import given, settings
from hypothesis import strategies as st

from tailsfw import compiler, policy
from tailsfw.desired import Desired, ruleset_facts
from tailsfw.facts import Facts
from tailsfw.resolv import ResolvTexts

SHIPPED = policy.load(Path(__file__).resolve().parents[2] / "etc" / "tailsfw" / "policy.toml")
POLICIES = [
    SHIPPED,
    dataclasses.replace(SHIPPED, lan=dataclasses.replace(SHIPPED.lan, mode="connected")),
    # The compiler reads the DNS servers in this mode.
    dataclasses.replace(SHIPPED, dns=dataclasses.replace(SHIPPED.dns, clearnet="nm")),
]
ACCOUNTS = sorted({u.account for u in SHIPPED.users})

addresses = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
facts = st.builds(
    Facts,
    # Few uids, so that two accounts often share one; and accounts the policy
    # does not name.
    uids=st.dictionaries(
        st.sampled_from([*ACCOUNTS, "someone", "else"]), st.integers(999, 1003)
    ).map(MappingProxyType),
    connected=st.frozensets(
        st.builds(
            lambda a, n: ipaddress.IPv4Network((a, n), strict=False),
            st.sampled_from(["10.1.2.0", "192.168.5.0", "172.16.0.0", "8.8.8.0"]),
            st.integers(8, 30),
        ),
        max_size=4,
    ),
    dns=st.lists(addresses, max_size=3).map(tuple),
    dns_known=st.booleans(),
    interfaces=st.dictionaries(st.integers(1, 9), st.sampled_from(["lo", "eth0", "wlan0"])).map(
        MappingProxyType
    ),
)


@settings(max_examples=150, deadline=None)
@given(facts, facts)
def test_facts_the_same_for_the_ruleset_give_the_same_ruleset(a: Facts, b: Facts) -> None:
    """Each fact of `b` in turn replaced by `a`'s: when ruleset_facts says
    nothing changed, the compiled ruleset is the same."""
    for field in dataclasses.fields(Facts):
        changed = dataclasses.replace(b, **{field.name: getattr(a, field.name)})
        for pol in POLICIES:
            if ruleset_facts(pol, changed) != ruleset_facts(pol, b):
                continue
            assert compiler.compile_policy(pol, changed).document() == (
                compiler.compile_policy(pol, b).document()
            ), field.name


def test_the_ruleset_is_carried_over_only_while_its_facts_are_the_same() -> None:
    connected = dataclasses.replace(SHIPPED, lan=dataclasses.replace(SHIPPED.lan, mode="connected"))
    first = Desired(connected, Facts())
    ruleset = first.ruleset
    renamed = Desired(connected, Facts(interfaces=MappingProxyType({2: "eth1"})), first)
    assert renamed.ruleset is ruleset  # an interface renamed: not compiled again
    assert renamed.interfaces == {(2, "eth1")}
    on_link = Facts(connected=frozenset({ipaddress.IPv4Network("192.168.5.0/24")}))
    moved = Desired(connected, on_link, renamed)
    assert moved.ruleset is not ruleset
    assert moved.ruleset.document() == compiler.compile_policy(connected, on_link).document()
    assert Desired(SHIPPED, on_link, moved).ruleset is not moved.ruleset  # another policy


def test_the_files_text() -> None:
    assert Desired(SHIPPED, Facts()).files == ResolvTexts("nameserver 127.0.0.1\n", None)
    servers = (ipaddress.IPv4Address("10.0.0.53"), ipaddress.IPv4Address("127.0.0.1"))
    refused = Desired(SHIPPED, Facts(dns=servers, dns_known=True)).files
    assert refused.clearnet is None and "loopback" in refused.refused
    known = Desired(SHIPPED, Facts(dns=servers[:1], dns_known=True)).files
    assert known.clearnet == "nameserver 10.0.0.53\n"
