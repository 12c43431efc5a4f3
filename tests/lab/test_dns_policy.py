"""The [dns] options with real packets: clearnet DNS only to NetworkManager's
servers, and stray DNS sent to Tor's DNS port (issue 7, part 3).

The DNS servers are facts the daemon learns from NetworkManager; here the
ruleset is compiled with them and loaded in the lab host, the way
`tailsfwctl apply` loads a policy (the daemon wires NetworkManager in).
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.lab.command import REPO, VENV_PYTHON
from tests.lab.matrix import INTERNET, INTERNET2
from tests.lab.policies import lab_policy
from tests.lab.topology import Lab

# Applies the policy with these DNS servers; with a second list, then moves
# to it by the set-only changes and prints their kinds.
APPLY = textwrap.dedent(
    f"""
    import ipaddress, sys
    sys.path.insert(0, {str(REPO)!r})
    from tailsfw import compiler, policy, users
    from tailsfw.facts import Facts
    from tailsfw.nft import Nft
    pol = policy.load(sys.argv[1])
    uids = users.lookup_uids(pol)
    def ruleset(servers):
        dns = tuple(ipaddress.IPv4Address(a) for a in servers.split(",") if a)
        return compiler.compile_policy(pol, Facts(uids=uids, dns=dns))
    nft = Nft()
    first = ruleset(sys.argv[2])
    nft.apply(first.document())
    if len(sys.argv) > 3:
        changes = ruleset(sys.argv[3]).changes_since(first)
        nft.apply(first.document(changes))
        print(" ".join(next(iter(c)) + ":" + next(iter(next(iter(c.values())))) for c in changes))
    """
)


def with_dns(**dns: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        data["dns"] = dns

    return edit


def apply(lab: Lab, path: Path, servers: str, then: str | None = None) -> str:
    argv = [VENV_PYTHON, "-c", APPLY, str(path), servers, *([then] if then is not None else [])]
    return lab.host(argv).stdout.strip()


def reaches(lab: Lab, role: str, proto: str, dst: str, port: int) -> bool:
    """True when the peer answered and counted it; False when refused at
    once with nothing out.  Anything else fails the test."""
    probe = lab.probe(role, proto, 4, dst, port)
    if probe.result == "open" and probe.arrived:
        return True
    assert (probe.result, probe.arrived) == ("refused", 0), (role, proto, dst, port, probe)
    return False


@pytest.fixture
def nm_policy(lab: Lab, tmp_path: Path) -> Path:
    return lab_policy(lab, tmp_path / "nm.toml", with_dns(clearnet="nm"))


def test_clearnet_dns_nm_reaches_only_networkmanagers_server(lab: Lab, nm_policy: Path) -> None:
    apply(lab, nm_policy, INTERNET)
    for proto in ("udp", "tcp"):
        assert reaches(lab, "clearnet", proto, INTERNET, 53)
        assert not reaches(lab, "clearnet", proto, INTERNET2, 53)
    assert not reaches(lab, "debian-tor", "udp", INTERNET2, 53)
    assert reaches(lab, "debian-tor", "udp", INTERNET, 53)
    # Only DNS is narrowed: the rest of clearnet's rights stay.
    assert reaches(lab, "clearnet", "tcp", INTERNET2, 443)


def test_a_new_server_is_in_force_by_a_set_only_change(lab: Lab, nm_policy: Path) -> None:
    changes = apply(lab, nm_policy, INTERNET, INTERNET2)
    assert changes == "flush:set add:element"
    assert reaches(lab, "clearnet", "udp", INTERNET2, 53)
    assert not reaches(lab, "clearnet", "udp", INTERNET, 53)


def test_with_no_server_known_clearnet_dns_is_refused(lab: Lab, nm_policy: Path) -> None:
    apply(lab, nm_policy, "")
    for dst in (INTERNET, INTERNET2):
        assert not reaches(lab, "clearnet", "udp", dst, 53)
    assert reaches(lab, "clearnet", "tcp", INTERNET, 443)


@pytest.fixture
def stray_to_tor(lab: Lab, tmp_path: Path) -> Path:
    path = lab_policy(lab, tmp_path / "stray.toml", with_dns(stray="tor"))
    apply(lab, path, "")
    return path


@pytest.mark.parametrize("role", ["amnesia", "root"])
def test_stray_dns_goes_to_tors_dns_port(lab: Lab, stray_to_tor: Path, role: str) -> None:
    """A user allowed Tor's DNS port gets the answer of the host's 5353
    listener, and nothing reaches the peer."""
    for dst in (INTERNET, INTERNET2, "192.168.77.1"):
        probe = lab.probe(role, "udp", 4, dst, 53)
        assert (probe.result, probe.detail, probe.arrived) == ("open", "5353\n", 0), (dst, probe)


@pytest.mark.parametrize("role", ["_apt", "other", "proxy"])
def test_stray_dns_of_a_user_refused_tors_dns_gets_nothing_out(
    lab: Lab, stray_to_tor: Path, role: str
) -> None:
    for dst in (INTERNET, "192.168.77.1"):
        probe = lab.probe(role, "udp", 4, dst, 53)
        assert (probe.result, probe.arrived) == ("refused", 0), (dst, probe)


def test_stray_dns_leaves_the_direct_users_and_other_ports_alone(
    lab: Lab, stray_to_tor: Path
) -> None:
    probe = lab.probe("clearnet", "udp", 4, INTERNET, 53)
    assert (probe.result, probe.detail) == ("open", "53\n") and probe.arrived
    assert not reaches(lab, "amnesia", "udp", INTERNET, 5000)
    assert not reaches(lab, "amnesia", "tcp", INTERNET, 53)
