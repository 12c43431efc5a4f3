"""desired and facts for the application namespaces: which are the policy's
and present, what the host's forwarding settings are; the sysctl effect
writes those only when they change."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import MappingProxyType

from tailsfw import policy
from tailsfw.desired import Desired
from tailsfw.events import NamespacesPresent, updated
from tailsfw.facts import Facts
from tailsfw.netnsfiles import NetnsId
from tailsfw.sysctl import Sysctl

SHIPPED = policy.load(Path(__file__).resolve().parents[2] / "etc" / "tailsfw" / "policy.toml")


def test_only_the_policys_namespaces_present_are_guests() -> None:
    event = NamespacesPresent(
        (("clearnet", NetnsId(4, 2)), ("notours", NetnsId(4, 3)), ("tbb", NetnsId(4, 1)))
    )
    facts = updated(Facts(), event)
    assert updated(facts, event) is facts
    guests = Desired(SHIPPED, facts).guests
    assert {n: g.identity for n, g in guests.items()} == {
        "clearnet": NetnsId(4, 2),
        "tbb": NetnsId(4, 1),
    }
    assert guests["tbb"].ns.name == "tbb"


def test_ip_forward_is_on_only_while_a_clearnet_veth_exists() -> None:
    def settings(*veths: str) -> dict[str, str]:
        facts = Facts(interfaces=MappingProxyType(dict(enumerate(("lo", *veths)))))
        return {".".join(k): v for k, v in Desired(SHIPPED, facts).host_settings}

    assert settings() == {"net.ipv4.ip_forward": "0"}
    assert settings("veth-tbb", "veth-clearnet") == {
        "net.ipv4.ip_forward": "1",
        "net.ipv4.conf.veth-clearnet.forwarding": "1",
        "net.ipv4.conf.veth-tbb.forwarding": "0",
    }
    # Without namespaces in the policy, forwarding is not ours to set.
    bare = dataclasses.replace(SHIPPED, namespaces=())
    assert Desired(bare, Facts()).host_settings == ()


def test_the_forwarding_settings_are_written_when_they_change(tmp_path: Path) -> None:
    for key in ("ip_forward", "conf/veth-clearnet/forwarding"):
        (tmp_path / "net/ipv4" / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "net/ipv4" / key).write_text("0\n")
    sysctl = Sysctl(tmp_path)
    on = ((("net", "ipv4", "ip_forward"), "1"),
          (("net", "ipv4", "conf", "veth-clearnet", "forwarding"), "1"))  # fmt: skip
    assert [s.ok for s in sysctl.converge_forwarding(on)] == [True, True]
    assert sysctl.converge_forwarding(on) == []
    off = ((("net", "ipv4", "ip_forward"), "0"),)
    assert [s.name for s in sysctl.converge_forwarding(off)] == ["net.ipv4.ip_forward"]
    assert (tmp_path / "net/ipv4/ip_forward").read_text() == "0\n"
    assert [s.name for s in sysctl.states] == ["net.ipv4.ip_forward"]  # the veth's is forgotten
    sysctl.forget()
    assert len(sysctl.converge_forwarding(off)) == 1
