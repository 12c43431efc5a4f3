"""desired.ruleset_facts: facts that differ only elsewhere give the same ruleset."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path
from types import MappingProxyType

from hypothesis import given, settings
from hypothesis import strategies as st

from tailsfw import compiler, policy
from tailsfw.desired import ruleset_facts
from tailsfw.facts import Facts

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
    # Few uids, so that two accounts often share one.
    uids=st.dictionaries(st.sampled_from(ACCOUNTS), st.integers(999, 1003)).map(MappingProxyType),
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
        if ruleset_facts(changed) != ruleset_facts(b):
            continue
        for pol in POLICIES:
            assert compiler.compile_policy(pol, changed).document() == (
                compiler.compile_policy(pol, b).document()
            ), field.name
