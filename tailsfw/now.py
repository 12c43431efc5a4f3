"""The policy compiled with the facts of now: what tailsfwctl compares and loads.

The daemon follows the facts as they change; a command reads them once, the
same way for every command: the accounts from the account database, the
on-link networks from netlink (read only in "connected" mode), and the
clearnet DNS servers the running daemon reports (none without a daemon).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from pathlib import Path

from . import compiler, policy, users
from .facts import Facts


def facts(pol: policy.Policy, dns: Sequence[str] = ()) -> Facts:
    """The facts of now for `pol`; `dns`: the servers the daemon reports."""
    connected: frozenset[ipaddress.IPv4Network] = frozenset()
    if pol.lan.mode == "connected":
        from .netlink import read_snapshot  # netlink's socket code only when it is needed

        connected = read_snapshot().connected
    return Facts(
        uids=users.lookup_uids(pol),
        connected=connected,
        dns=tuple(ipaddress.IPv4Address(a) for a in dns),
    )


def compile_now(path: Path, dns: Sequence[str] = ()) -> compiler.Ruleset:
    """The policy at `path` compiled with the facts of now; PolicyError if it is broken."""
    pol = policy.load(path)
    return compiler.compile_policy(pol, facts(pol, dns))
