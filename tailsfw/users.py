"""Resolve the policy's accounts to uids through the system's user database."""

from __future__ import annotations

import pwd
from collections.abc import Mapping
from types import MappingProxyType

from .policy import Policy


def lookup_uids(policy: Policy) -> Mapping[str, int]:
    """Account name -> uid for every account of the policy that exists now."""
    uids = {}
    for user in policy.users:
        try:
            uids[user.account] = pwd.getpwnam(user.account).pw_uid
        except KeyError:
            continue  # the compiler reports it, and uses the fallback uid if any
    return MappingProxyType(uids)
