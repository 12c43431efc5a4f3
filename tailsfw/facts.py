"""Facts: what the world looks like at apply time, as one immutable value.

The compiler reads only the policy and these facts, so the same facts always
give the same ruleset.  Gathering them (passwd, netlink, NetworkManager) is
done by the adapters, not here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True)
class Facts:
    # account name -> uid, for the accounts that exist.
    uids: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    # IPv4 networks on-link on some interface (for `lan.mode = "connected"`).
    connected: frozenset[ipaddress.IPv4Network] = frozenset()
    # The clearnet DNS servers NetworkManager gave, in its order, checked.
    dns: tuple[ipaddress.IPv4Address, ...] = ()
