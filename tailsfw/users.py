"""Resolve the policy's accounts to uids, from the account database file.

The same reading as the accounts source (tailsfw/accounts.py), so that the
start, a reload and a live change all agree (see docs/resolv.md for why the
file rather than NSS).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .accounts import PASSWD, read_uids
from .policy import Policy


def accounts_of(policy: Policy) -> list[str]:
    return [user.account for user in policy.users]


def lookup_uids(policy: Policy, passwd: Path = PASSWD) -> Mapping[str, int]:
    """Account name -> uid for every account of the policy that exists now.

    A missing account is left out (the compiler reports it, and uses the
    fallback uid if any); an unreadable database is an OSError.
    """
    return read_uids(accounts_of(policy), passwd)
