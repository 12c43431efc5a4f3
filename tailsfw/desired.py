"""The desired state, pure: what the policy and the facts ask of each effect."""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable
from dataclasses import dataclass

from . import compiler
from .facts import Facts
from .policy import Policy


@dataclass(frozen=True)
class Desired:
    ruleset: compiler.Ruleset
    # Interfaces, (index, name), whose IPv6 setting must be right.
    interfaces: frozenset[tuple[int, str]]
    # The clearnet DNS servers for /etc/resolv-over-clearnet.conf; None while
    # NetworkManager has not answered yet (the file is then left alone).
    clearnet_dns: tuple[ipaddress.IPv4Address, ...] | None


def desired(policy: Policy, facts: Facts) -> Desired:
    return Desired(
        ruleset=compiler.compile_policy(policy, facts),
        interfaces=frozenset(facts.interfaces.items()),
        clearnet_dns=facts.dns if facts.dns_known else None,
    )


def ruleset_facts(facts: Facts) -> Hashable:
    """What the compiler reads of the facts: when it is the same, the ruleset
    is, and nothing need be compiled (an interface renamed costs no commit).
    The DNS servers are read in `dns.clearnet = "nm"` mode (a set-only
    change then).  tests/unit/test_desired.py checks that nothing else
    changes a ruleset."""
    return (facts.connected, tuple(sorted(facts.uids.items())), facts.dns)
