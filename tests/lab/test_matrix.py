"""The leak matrix and the fail-closed cases, with real packets (issue 2)."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from tailsfw import compiler, policy
from tailsfw.facts import Facts
from tests.lab import matrix, policies
from tests.lab.command import PYTHON, VENV_PYTHON
from tests.lab.policies import CTL, DEFAULT_POLICY, apply
from tests.lab.topology import (
    HOST_IF,
    HOST_INBOUND_PORT,
    HOST_V4,
    HOST_V6,
    PEER_IF,
    PEER_LAN_V4,
    PEER_LAN_V6,
    Lab,
)
from tests.lab.traffic import late_answer, leak_attempts


def lab_policy(lab: Lab, path: Path, **edits: Any) -> Path:
    def edit(data: dict[str, Any]) -> None:
        for key, value in edits.items():
            section, _, name = key.partition("__")
            data[section][name] = value

    return policies.lab_policy(lab, path, edit)


@pytest.fixture
def enforced(lab: Lab, tmp_path: Path) -> Path:
    path = lab_policy(lab, tmp_path / "policy.toml")
    done = apply(lab, path)
    assert done.returncode == 0, done.stderr
    return path


def assert_cases(lab: Lab, users: tuple[str, ...], names: set[str] | None = None) -> None:
    cases = [
        c for c in matrix.run(lab, users)
        if names is None or c.destination.name in names
    ]  # fmt: skip
    assert cases
    problems = [c for c in cases if c.problem]
    assert not problems, "\n" + matrix.table(cases)


@pytest.mark.parametrize("user", matrix.USERS)
def test_leak_matrix(lab: Lab, enforced: Path, user: str) -> None:
    """Each user against every destination: as the spec says, and not one
    packet reaches the peer when it should not."""
    assert_cases(lab, (user,))


def test_the_oracle_is_not_trivial() -> None:
    """The matrix must have both outcomes for most users, or it proves little."""
    for user in matrix.USERS:
        outcomes = {matrix.expected(user, d) for d in matrix.DESTINATIONS}
        assert outcomes == {"open", "refused"}, user


SAMPLE = {"internet tcp/443", "internet udp/53", "lan dns udp/53", "127.0.0.1 tcp/9050",
          "127.0.0.1 tcp/9062", "127.0.0.1 udp/53 (dns)", "::1 tcp/4101"}  # fmt: skip


def test_a_missing_user_costs_only_its_own_exceptions(lab: Lab, tmp_path: Path) -> None:
    path = lab_policy(lab, tmp_path / "p.toml", users__htp={"account": "tfwt-no-such-user"})
    done = apply(lab, path)
    assert done.returncode == 0, done.stderr
    assert "'htp'" in done.stderr and "left out" in done.stderr
    # htp's account is now just another user: its exceptions are gone...
    assert lab.probe("htp", "tcp", 4, "127.0.0.1", 9062).result == "refused"
    assert lab.probe("htp", "udp", 4, "127.0.0.1", 53).result == "refused"
    # ... and everything else is enforced as before.
    assert_cases(lab, ("amnesia", "debian-tor", "tails-upgrade-frontend"), SAMPLE)


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        ({"lan__networks": ["10.0.0.0/33"]}, "lan.networks[0]: bad IPv4 network"),
        ({"log__group": "zero"}, "log.group: must be an integer"),
        ({"tor": {"port": 1}}, "top level: unknown key 'tor'"),
    ],
)
def test_a_broken_policy_leaves_the_ruleset_in_force(
    lab: Lab, enforced: Path, tmp_path: Path, edits: dict[str, Any], message: str
) -> None:
    if "tor" in edits:
        path = tmp_path / "bad.toml"
        path.write_text(enforced.read_text() + "\n[tor]\nport = 1\n")
    else:
        path = lab_policy(lab, tmp_path / "bad.toml", **edits)
    done = apply(lab, path)
    assert done.returncode != 0
    assert message in done.stderr and "the ruleset in force is unchanged" in done.stderr
    assert_cases(lab, ("amnesia", "clearnet"), SAMPLE)


def test_a_ruleset_the_kernel_refuses_leaves_the_ruleset_in_force(
    lab: Lab, enforced: Path, tmp_path: Path
) -> None:
    """The transaction is all or nothing: a valid policy whose ruleset the
    kernel refuses (here: a chain left without its map) changes nothing."""
    script = textwrap.dedent(
        f"""
        from tailsfw import compiler, policy, users
        from tailsfw.facts import Facts
        from tailsfw.nft import Nft, NftError
        pol = policy.load({str(enforced)!r})
        rs = compiler.compile_policy(pol, Facts(uids=users.lookup_uids(pol)))
        broken = [o for o in rs.objects if o.get("map", {{}}).get("name") != "local_ports"]
        try:
            Nft().apply(compiler.Ruleset(tuple(broken), ()).document())
        except NftError as e:
            print("refused:", e)
        """
    )
    done = lab.host([VENV_PYTHON, "-c", script])
    assert done.stdout.startswith("refused:"), done.stdout + done.stderr
    # nft's own words, on one line: never the whole JSON document.
    assert done.stdout.count("\n") == 1 and "No such file or directory" in done.stdout
    assert len(done.stdout) < 300, done.stdout
    assert_cases(lab, ("amnesia", "debian-tor"), SAMPLE)


def test_reapplying_200_times_under_traffic_lets_nothing_through(lab: Lab, enforced: Path) -> None:
    reapply = textwrap.dedent(
        f"""
        from tailsfw import compiler, policy, users
        from tailsfw.facts import Facts
        from tailsfw.nft import Nft
        pol = policy.load({str(enforced)!r})
        nft = Nft()
        for _ in range(200):
            nft.apply(compiler.compile_policy(pol, Facts(uids=users.lookup_uids(pol))).document())
        print("done")
        """
    )
    before = lab.peer_packets()
    with leak_attempts(lab, 4) as tried:
        done = lab.host([VENV_PYTHON, "-c", reapply], timeout=120)
    assert done.stdout.strip() == "done"
    assert min(tried.attempts) > 50, tried.attempts
    assert tried.connected == [0, 0, 0]
    assert lab.peer_packets() - before == 0


SEND_FROM_PORT = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[2])))
    s.settimeout(1)
    try:
        s.sendto(b"query", (sys.argv[1], 53))
        print("answered" if s.recv(100) else "empty")
    except OSError as e:
        print(type(e).__name__)
    """
)


@pytest.mark.parametrize(
    ("owner", "dst"), [("clearnet", "198.51.100.10"), ("debian-tor", "192.168.77.1")]
)
def test_no_user_rides_a_direct_users_udp_flow(
    lab: Lab, enforced: Path, owner: str, dst: str
) -> None:
    """Once clearnet's DNS query is answered, conntrack holds an established
    flow; amnesia sending from the same port to the same server must not
    match it (UDP ports are free again as soon as the owner's socket closes)."""
    port = 40053 if owner == "clearnet" else 40054
    first = lab.run_as(owner, [PYTHON, "-c", SEND_FROM_PORT, dst, str(port)])
    assert first.stdout.strip() == "answered", first.stderr
    before = lab.peer_packets()
    rider = lab.run_as("amnesia", [PYTHON, "-c", SEND_FROM_PORT, dst, str(port)])
    assert rider.stdout.strip() == "PermissionError", rider.stdout + rider.stderr
    assert lab.peer_packets() - before == 0
    again = lab.run_as(owner, [PYTHON, "-c", SEND_FROM_PORT, dst, str(port)])
    assert again.stdout.strip() == "answered"  # the owner keeps its flow


def test_render_nft_is_text_that_nft_loads_back(lab: Lab, tmp_path: Path) -> None:
    path = lab_policy(lab, tmp_path / "p.toml")
    done = subprocess.run(
        [*CTL, "render", "--format", "nft", "--policy", str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "table ip tailsfw {" in done.stdout and "table ip6 tailsfw {" in done.stdout
    text = tmp_path / "ruleset.nft"
    text.write_text("flush ruleset\n" + done.stdout)
    lab.host(["nft", "--check", "-f", str(text)])  # raises with nft's message if not


def mac(lab: Lab, side: str, interface: str) -> str:
    run = lab.host if side == "host" else lab.peer
    address: str = json.loads(run(["ip", "-j", "link", "show", interface]).stdout)[0]["address"]
    return address


@pytest.fixture
def static_neighbours(lab: Lab) -> Iterator[None]:
    """The ruleset refuses IPv6 neighbour discovery off `lo` (new, not ours):
    static entries let an IPv6 packet reach the host's input chain and an
    answer leave, so that the input chain alone decides."""
    entries = [
        (lab.peer, HOST_V6, mac(lab, "host", HOST_IF), PEER_IF),
        (lab.host, PEER_LAN_V6, mac(lab, "peer", PEER_IF), HOST_IF),
    ]
    for run, address, lladdr, dev in entries:
        run(["ip", "-6", "neigh", "replace", address, "lladdr", lladdr, "dev", dev,
             "nud", "permanent"])  # fmt: skip
    yield
    for run, address, _, dev in entries:
        run(["ip", "-6", "neigh", "del", address, "dev", dev])


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("proto", ["tcp", "udp", "icmp"])
def test_nothing_new_comes_in(
    lab: Lab, enforced: Path, static_neighbours: None, proto: str, family: int
) -> None:
    """New inbound traffic to a listener on every address of the host is
    dropped, on both families, and nothing is sent back (test_lab.py shows
    the same probes answered when no ruleset is loaded)."""
    dst = HOST_V4 if family == 4 else HOST_V6
    probe = lab.probe_from_peer(proto, family, dst, HOST_INBOUND_PORT, timeout=0.5)
    assert probe.result in ("timeout", "sent"), probe
    assert probe.arrived == 0


def test_related_icmp_never_leaves_but_on_lo(lab: Lab, enforced: Path) -> None:
    """A late answer to a closed UDP socket: the host's ICMP port unreachable
    is RELATED to the flow, and RELATED is accepted only on `lo`."""
    assert late_answer(lab, "amnesia", PEER_LAN_V4, 5999, HOST_V4, 40124) == 0


def test_the_ruleset_loads_without_etc_protocols_and_services(tmp_path: Path) -> None:
    """Protocols and ports are numbers: nft needs neither file (a minimal
    /etc lacks them).  Loaded in a network namespace of its own, with empty
    files bind-mounted over both in a mount namespace of its own."""
    data = policy.load(DEFAULT_POLICY)
    pol = policy.Policy(data.source, data.log, data.users, data.local, data.direct, data.lan,
                        data.redirects, policy.Dns(clearnet="nm", stray="tor"))  # fmt: skip
    uids = MappingProxyType({u.account: 2000 + i for i, u in enumerate(data.users)})
    facts = Facts(uids=uids, dns=(ipaddress.IPv4Address(matrix.INTERNET),))
    document = tmp_path / "ruleset.json"
    document.write_text(compiler.compile_policy(pol, facts).to_json())
    empty = tmp_path / "empty"
    empty.write_text("")
    script = (
        f"mount --bind {empty} /etc/protocols && mount --bind {empty} /etc/services && "
        f"! getent protocols tcp && nft -j -f {document} && nft list ruleset"
    )
    done = subprocess.run(
        ["unshare", "--mount", "--net", "sh", "-c", script],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "meta l4proto 58" in done.stdout and "table ip6 tailsfw" in done.stdout
