"""Resolve the policy's accounts to uids, from the account database file,
for the commands that compile a policy once (tailsfwctl).

The same reading as the accounts source (tailsfw/accounts.py), so that the
CLI and the daemon agree (see docs/resolv.md for why the file rather than
NSS).  The daemon itself never looks accounts up: they are facts.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from .accounts import PASSWD, read_uids
from .policy import Policy


def accounts_of(policy: Policy) -> list[str]:
    return [user.account for user in policy.users]


def lookup_uids(policy: Policy, passwd: Path = PASSWD) -> Mapping[str, int]:
    """Account name -> uid for every account of the policy that exists now.

    A missing account is left out (the compiler reports it, and uses the
    fallback uid if any); an unreadable database is an OSError.
    """
    uids = read_uids(passwd)
    return MappingProxyType({a: uids[a] for a in accounts_of(policy) if a in uids})
