"""Kernel settings under a /proc/sys root: write, read back, remember.

Every write is read back, and each setting's outcome is kept as a
`SysctlState` for `tailsfwctl status`.  A setting that cannot be written is
recorded, not fatal: the ruleset drops IPv6 whatever the sysctls say, so a
failed write loses a second line of defence, never the first.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

from .status import SysctlState

if TYPE_CHECKING:
    from .desired import Desired

log = logging.getLogger("tailsfwd")

DEFAULT_ROOT = Path("/proc/sys")
CONNTRACK_HELPER = ("net", "netfilter", "nf_conntrack_helper")
NO_AUTO_HELPER = "kernel has no automatic helper assignment"


def sysctl_name(parts: tuple[str, ...]) -> str:
    # sysctl(8) writes a dot inside a component (an interface "eth0.100") as "/".
    return ".".join(p.replace(".", "/") for p in parts)


def disable_ipv6_key(interface: str) -> tuple[str, ...]:
    return ("net", "ipv6", "conf", interface, "disable_ipv6")


def ipv6_wanted(interface: str) -> str:
    """IPv6 stays on for `lo` only (the accessibility daemon on ::1)."""
    return "0" if interface == "lo" else "1"


# The order matters: writing `all` also switches every existing interface,
# `lo` included, so `lo` comes after it.
BOOT_SETTINGS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("net", "ipv4", "tcp_mtu_probing"), "1"),
    (disable_ipv6_key("all"), "1"),
    (disable_ipv6_key("default"), "1"),
    (disable_ipv6_key("lo"), "0"),
)


class Sysctl:
    """Writes settings below `root` and keeps the state of each; as an effect,
    the interfaces' IPv6 settings."""

    name = "sysctls"

    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        self.root = root
        self._states: dict[str, SysctlState] = {}
        self._interfaces: set[tuple[int, str]] = set()  # (index, name) done
        self._forwarding: tuple[tuple[tuple[str, ...], str], ...] = ()  # written last

    @property
    def states(self) -> tuple[SysctlState, ...]:
        return tuple(self._states[name] for name in sorted(self._states))

    def path(self, parts: tuple[str, ...]) -> Path:
        return self.root.joinpath(*parts)

    def read(self, parts: tuple[str, ...]) -> str | None:
        try:
            return self.path(parts).read_text().strip()
        except OSError:
            return None

    def set(self, parts: tuple[str, ...], value: str) -> SysctlState:
        name = sysctl_name(parts)
        note = ""
        try:
            self.path(parts).write_text(value + "\n")
        except OSError as e:
            note = f"cannot write {self.path(parts)}: {e.strerror}"
        actual = self.read(parts)
        if not note and actual != value:
            note = f"wrote {value}, the kernel reads back {actual}"
        state = SysctlState(name, value, actual, note)
        self._states[name] = state
        return state

    def apply_boot(self) -> tuple[SysctlState, ...]:
        """The settings of a fresh start; returns their states (a failed one is logged)."""
        done = [self.set(parts, value) for parts, value in BOOT_SETTINGS]
        done.append(self._conntrack_helper())
        _warn(done)
        return tuple(done)

    def _conntrack_helper(self) -> SysctlState:
        # Kernels >= 6.0 removed the automatic helper assignment and the
        # setting with it: nothing to switch off then, but say so.
        if self.path(CONNTRACK_HELPER).exists():
            return self.set(CONNTRACK_HELPER, "0")
        name = sysctl_name(CONNTRACK_HELPER)
        state = SysctlState(name, None, None, NO_AUTO_HELPER)
        self._states[name] = state
        return state

    def interface(self, name: str) -> SysctlState:
        """Switch IPv6 off on a (new) interface, or keep it on for `lo`."""
        return self.set(disable_ipv6_key(name), ipv6_wanted(name))

    def converge_interfaces(self, interfaces: Collection[tuple[int, str]]) -> list[SysctlState]:
        """Set IPv6 on each (index, name) not done yet; forget the ones gone.

        By index and name: an interface deleted and made again under the
        same name between two snapshots is a new interface.  Returns the new
        states (a failed one carries its note).
        """
        for index, name in sorted(self._interfaces - set(interfaces)):
            self._interfaces.discard((index, name))
            if name not in {n for _, n in interfaces}:
                self._states.pop(sysctl_name(disable_ipv6_key(name)), None)
        new = []
        for index, name in sorted(set(interfaces) - self._interfaces):
            new.append(self.interface(name))
            self._interfaces.add((index, name))
        return new

    def converge_forwarding(
        self, settings: tuple[tuple[tuple[str, ...], str], ...]
    ) -> list[SysctlState]:
        """The host's forwarding settings (nsrules.host_sysctls), all in
        order when they changed; the ones of veths gone are forgotten."""
        if settings == self._forwarding:
            return []
        for parts, _ in self._forwarding:
            self._states.pop(sysctl_name(parts), None)
        self._forwarding = settings
        return [self.set(parts, value) for parts, value in settings]

    def converge(self, desired: Desired) -> bool:
        """Each interface's IPv6 setting and the forwarding ones; True if one
        was written.  A write that fails is recorded and logged, not raised:
        the ruleset drops IPv6 and forwards only what it allows."""
        new = self.converge_interfaces(desired.interfaces)
        new += self.converge_forwarding(desired.host_settings)
        _warn(new)
        return bool(new)

    def forget(self) -> None:
        """The next converge writes every setting again."""
        self._interfaces.clear()
        self._forwarding = ()


def _warn(states: list[SysctlState]) -> None:
    for state in states:
        if not state.ok:
            log.warning("sysctl %s: %s", state.name, state.note)
