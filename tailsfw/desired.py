"""The desired state, pure: what the policy and the facts ask of each effect.

`Desired(policy, facts)` is the whole of it: the ruleset, the interfaces'
IPv6 and forwarding settings, the application namespaces'
guest sides, the resolv files' text and the NFLOG group audited.  Each
part is made when an effect first asks for it, so that a change of
interfaces costs no compile; the ruleset is carried over from the previous
`Desired` while what the compiler reads of the facts (`ruleset_facts`) is
the same.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from functools import cached_property

from . import compiler, nsrules
from .facts import Facts
from .policy import Policy
from .resolv import ResolvTexts, resolv_texts


class Desired:
    """What every effect must hold for one policy and one set of facts."""

    def __init__(self, policy: Policy, facts: Facts, previous: Desired | None = None) -> None:
        self.policy = policy
        self.facts = facts
        self.ruleset_key = ruleset_facts(policy, facts)
        self._ruleset: compiler.Ruleset | None = None
        if (
            previous is not None
            and previous.policy is policy
            and previous.ruleset_key == self.ruleset_key
        ):
            self._ruleset = previous._ruleset

    @property
    def ruleset(self) -> compiler.Ruleset:
        if self._ruleset is None:
            self._ruleset = compiler.compile_policy(self.policy, self.facts)
        return self._ruleset

    @cached_property
    def interfaces(self) -> frozenset[tuple[int, str]]:
        """The interfaces, (index, name), whose IPv6 setting must be right."""
        return frozenset(self.facts.interfaces.items())

    @cached_property
    def files(self) -> ResolvTexts:
        return resolv_texts(self.facts.dns if self.facts.dns_known else None)

    @cached_property
    def guests(self) -> Mapping[str, nsrules.Guest]:
        """The policy's namespaces present in /run/netns, by name."""
        present = dict(self.facts.netns)
        return {
            ns.name: nsrules.Guest(ns, present[ns.name])
            for ns in self.policy.namespaces
            if ns.name in present
        }

    @cached_property
    def host_settings(self) -> tuple[nsrules.Setting, ...]:
        """The host's forwarding settings for the namespaces' veths present
        (none without namespaces in the policy: then they are not ours)."""
        if not self.policy.namespaces:
            return ()
        return nsrules.host_sysctls(self.policy.namespaces, set(self.facts.interfaces.values()))

    @property
    def log_group(self) -> int:
        """The NFLOG group whose refused packets are audited."""
        return self.policy.log.group


def ruleset_facts(policy: Policy, facts: Facts) -> Hashable:
    """What the compiler reads of the facts for `policy`: when it is the same,
    the ruleset is, and nothing need be compiled (an interface renamed, an
    account the policy does not name, costs no commit).  The DNS servers are
    read in `dns.clearnet = "nm"` mode only (a set-only change then), the
    on-link networks outside `lan.mode = "rfc1918"` only.
    tests/unit/test_desired.py checks that nothing else changes a ruleset."""
    uids = tuple((user.account, facts.uids.get(user.account)) for user in policy.users)
    connected = facts.connected if policy.lan.mode != "rfc1918" else frozenset()
    dns = facts.dns if policy.dns.clearnet == "nm" else ()
    return (connected, uids, dns)
