"""Facts: what the world looks like at apply time, as one immutable value.

The compiler reads only the policy and these facts, so the same facts always
give the same ruleset.  Gathering them (passwd, netlink, NetworkManager) is
done by the sources; `events.updated` folds one source's event in, purely
(there, so that the compiler and tailsfwctl import no event classes).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # an annotation: the compiler does not load what enters namespaces
    from .netnsfiles import NetnsId


@dataclass(frozen=True)
class Facts:
    """The world the compiler needs besides the policy."""

    # account name -> uid, for every account of the account database (the
    # compiler looks up the policy's).
    uids: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    # IPv4 networks on-link on some interface (for `lan.mode = "connected"`).
    connected: frozenset[ipaddress.IPv4Network] = frozenset()
    # The clearnet DNS servers NetworkManager gave, in its order, checked.
    dns: tuple[ipaddress.IPv4Address, ...] = ()
    # False until NetworkManager has answered once: the clearnet file is
    # left as it is until then (a restart must not empty it).
    dns_known: bool = False
    # The interfaces, by index (each gets its IPv6 setting).
    interfaces: Mapping[int, str] = field(default_factory=lambda: MappingProxyType({}))
    # The network namespaces in /run/netns: (name, identity), by name.
    netns: tuple[tuple[str, NetnsId], ...] = ()

    @cached_property
    def user_names(self) -> Mapping[int, str]:
        """uid -> account name, the first account of the database with that
        uid (as getpwuid answers), made once per account database."""
        names: dict[int, str] = {}
        for name, uid in self.uids.items():
            names.setdefault(uid, name)
        return MappingProxyType(names)
