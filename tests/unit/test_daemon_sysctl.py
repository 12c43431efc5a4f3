"""Sysctls under a fake /proc/sys root: written, read back, remembered."""

from __future__ import annotations

from pathlib import Path

import pytest

from tailsfw.sysctl import BOOT_SETTINGS, CONNTRACK_HELPER, NO_AUTO_HELPER, Sysctl, sysctl_name

FILES = (
    "net/ipv4/tcp_mtu_probing",
    *(f"net/ipv6/conf/{i}/disable_ipv6" for i in ("all", "default", "lo", "eth0", "eth0.100")),
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for name in FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("0\n")
    return tmp_path


def test_boot_settings(root: Path) -> None:
    states = {s.name: s for s in Sysctl(root).apply_boot()}
    assert (root / "net/ipv4/tcp_mtu_probing").read_text() == "1\n"
    assert (root / "net/ipv6/conf/all/disable_ipv6").read_text() == "1\n"
    assert (root / "net/ipv6/conf/default/disable_ipv6").read_text() == "1\n"
    assert (root / "net/ipv6/conf/lo/disable_ipv6").read_text() == "0\n"
    assert all(s.ok for s in states.values())
    assert states["net.ipv6.conf.lo.disable_ipv6"].actual == "0"


def test_lo_comes_after_all(root: Path) -> None:
    """Writing `all` switches every interface, lo too: lo must be written after."""
    names = [s.name for s in Sysctl(root).apply_boot()]
    assert names.index("net.ipv6.conf.lo.disable_ipv6") > names.index(
        "net.ipv6.conf.all.disable_ipv6"
    )


def test_missing_conntrack_helper_is_recorded(root: Path) -> None:
    (state,) = [s for s in Sysctl(root).apply_boot() if "conntrack" in s.name]
    assert (state.wanted, state.actual, state.note) == (None, None, NO_AUTO_HELPER)
    assert state.ok


def test_present_conntrack_helper_is_switched_off(root: Path) -> None:
    helper = root / "net/netfilter/nf_conntrack_helper"
    helper.parent.mkdir(parents=True)
    helper.write_text("1\n")
    (state,) = [s for s in Sysctl(root).apply_boot() if "conntrack" in s.name]
    assert helper.read_text() == "0\n"
    assert (state.wanted, state.actual, state.note) == ("0", "0", "")


def test_interfaces(root: Path) -> None:
    sysctl = Sysctl(root)
    assert sysctl.interface("eth0").actual == "1"
    assert sysctl.interface("lo").actual == "0"
    # A dot in an interface name is a directory name, written "/" by sysctl(8).
    state = sysctl.interface("eth0.100")
    assert (root / "net/ipv6/conf/eth0.100/disable_ipv6").read_text() == "1\n"
    assert state.name == "net.ipv6.conf.eth0/100.disable_ipv6"


def test_converge_writes_new_interfaces_once_and_forgets_gone_ones(root: Path) -> None:
    sysctl = Sysctl(root)
    eth0 = root / "net/ipv6/conf/eth0/disable_ipv6"
    assert [s.name for s in sysctl.converge_interfaces({(1, "lo"), (2, "eth0")})] == [
        "net.ipv6.conf.lo.disable_ipv6",
        "net.ipv6.conf.eth0.disable_ipv6",
    ]
    assert eth0.read_text() == "1\n"
    eth0.write_text("0\n")  # changed behind our back: converge trusts what it did...
    assert sysctl.converge_interfaces({(1, "lo"), (2, "eth0")}) == []
    # ... but a new interface under an old name (new index) is written again,
    assert len(sysctl.converge_interfaces({(1, "lo"), (3, "eth0")})) == 1
    assert eth0.read_text() == "1\n"
    # and after forget() every one is.
    eth0.write_text("0\n")
    sysctl.forget()
    assert len(sysctl.converge_interfaces({(1, "lo"), (3, "eth0")})) == 2
    assert eth0.read_text() == "1\n"
    sysctl.converge_interfaces({(1, "lo")})
    assert [s.name for s in sysctl.states] == ["net.ipv6.conf.lo.disable_ipv6"]


def test_a_failed_write_is_recorded_not_raised(root: Path) -> None:
    state = Sysctl(root).interface("gone0")
    assert not state.ok
    assert state.actual is None and "cannot write" in state.note


def test_a_value_the_kernel_does_not_keep_is_reported(root: Path, tmp_path: Path) -> None:
    class Stubborn(Sysctl):
        def read(self, parts: tuple[str, ...]) -> str | None:
            return "0"

    state = Stubborn(root).interface("eth0")
    assert not state.ok and "reads back 0" in state.note


REPO = Path(__file__).parents[2]


def test_the_boot_files_say_what_the_daemon_does() -> None:
    """etc/sysctl.d and etc/modprobe.d must not drift from tailsfw/sysctl.py."""
    shipped = {}
    for line in (REPO / "etc/sysctl.d/50-tailsfw.conf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, value = (part.strip() for part in line.split("="))
            shipped[name] = value
    expected = {sysctl_name(parts): value for parts, value in BOOT_SETTINGS}
    expected["-" + sysctl_name(CONNTRACK_HELPER)] = "0"  # "-": absent on kernels >= 6.0
    assert shipped == expected
    assert list(shipped)[:4] == list(expected)[:4]  # `all` before `lo`
    modprobe = (REPO / "etc/modprobe.d/tailsfw.conf").read_text()
    assert "options nf_conntrack nf_conntrack_helper=0" in modprobe


def test_the_unit_never_removes_rules() -> None:
    unit: dict[str, list[str]] = {}
    for line in (REPO / "systemd/tailsfwd.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            unit.setdefault(key, []).append(value)
    assert unit["Type"] == ["notify"]
    assert unit["DefaultDependencies"] == ["no"]
    assert "network-pre.target" in unit["Before"][0].split()
    assert unit["Wants"] == ["network-pre.target"]
    assert unit["Restart"] == ["on-failure"]
    assert "WatchdogSec" in unit
    assert not {"ExecStop", "ExecStopPost"} & unit.keys()
    # /proc/sys/net must stay writable for the sysctls.
    assert "/proc/sys/net" in unit["ReadWritePaths"][0].split()
