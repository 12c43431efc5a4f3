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


def desired(policy: Policy, facts: Facts) -> Desired:
    """What the ruleset effect must hold.  The cheaper effects have their own
    functions below: an interface or a DNS change need not compile."""
    return Desired(ruleset=compiler.compile_policy(policy, facts))


def desired_interfaces(facts: Facts) -> frozenset[tuple[int, str]]:
    """The interfaces, (index, name), whose IPv6 setting must be right."""
    return frozenset(facts.interfaces.items())


def desired_clearnet_dns(facts: Facts) -> tuple[ipaddress.IPv4Address, ...] | None:
    """The servers for /etc/resolv-over-clearnet.conf; None while NetworkManager
    has not answered yet (the file is then left alone)."""
    return facts.dns if facts.dns_known else None


def ruleset_facts(facts: Facts) -> Hashable:
    """What the compiler reads of the facts: when it is the same, the ruleset
    is, and nothing need be compiled (an interface renamed costs no commit).
    The DNS servers are read in `dns.clearnet = "nm"` mode (a set-only
    change then).  tests/unit/test_desired.py checks that nothing else
    changes a ruleset."""
    return (facts.connected, tuple(sorted(facts.uids.items())), facts.dns)
