"""The loader's fuzz, in the lab: accepted mutants of the shipped policy,
loaded with `tailsfwctl apply`, let out nothing that the shipped policy
refuses (unless the mutant itself says so: tests/policy_mutants.py models
what a policy lets out); refused mutants leave the ruleset in force as it
was.  Bounded: 20 mutants, the same on every run."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tailsfw import policy
from tests import policy_mutants as mutants
from tests.lab.matrix import INTERNET, INTERNET2, INTERNET6, ROUTER
from tests.lab.names import temp_prefix
from tests.lab.policies import apply, lab_policy
from tests.lab.topology import Lab

# (role, proto, family, destination, port): all refused by the shipped policy.
FORBIDDEN = (
    ("amnesia", "tcp", 4, INTERNET, 443),
    ("amnesia", "udp", 4, INTERNET, 53),
    ("root", "tcp", 4, INTERNET2, 80),
    ("other", "udp", 4, INTERNET, 5000),
    ("_apt", "tcp", 4, INTERNET, 443),
    ("clearnet", "udp", 4, INTERNET, 123),
    ("clearnet", "sctp", 4, INTERNET, 53),
    ("debian-tor", "udp", 4, INTERNET, 5000),
    ("amnesia", "udp", 4, ROUTER, 53),
    ("other", "tcp", 4, ROUTER, 53),
    ("amnesia", "udplite", 4, ROUTER, 53),
    ("root", "udp", 4, ROUTER, 137),
    ("amnesia", "tcp", 6, INTERNET6, 443),
)
MUTANTS = 20


def ruleset(lab: Lab) -> Any:
    return json.loads(lab.host(["nft", "-j", "list", "ruleset"]).stdout)


def leaks(lab: Lab, path: Path) -> list[str]:
    """The forbidden probes that got out although the policy refuses them."""
    pol = policy.load(path)
    uids = mutants.resolve(pol)
    found = []
    for role, proto, family, dst, port in FORBIDDEN:
        if mutants.egress_allowed(pol, uids, lab.accounts[role].uid, proto, dst, port):
            continue  # the mutant says so itself
        probe = lab.probe(role, proto, family, dst, port, timeout=0.3)
        if probe.arrived:
            found.append(f"{role} {proto} {dst}:{port}: {probe}")
    return found


def test_the_model_refuses_what_the_shipped_policy_refuses(lab: Lab, tmp_path: Path) -> None:
    pol = policy.load(lab_policy(lab, tmp_path / "p.toml"))
    uids = mutants.resolve(pol)
    for role, proto, _, dst, port in FORBIDDEN:
        assert not mutants.egress_allowed(pol, uids, lab.accounts[role].uid, proto, dst, port)
    assert mutants.egress_allowed(pol, uids, lab.accounts["clearnet"].uid, "tcp", INTERNET, 443)
    assert mutants.egress_allowed(pol, uids, lab.accounts["other"].uid, "udp", ROUTER, 5000)


def test_accepted_mutants_let_out_nothing_the_shipped_policy_refuses(
    lab: Lab, tmp_path: Path
) -> None:
    outcomes: list[str] = []

    @settings(
        max_examples=MUTANTS,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def one(data: st.DataObject) -> None:
        with tempfile.TemporaryDirectory(prefix=temp_prefix("fuzz")) as tmp:

            def edit(tree: dict[str, Any]) -> None:
                mutant = mutants.semantic(data.draw, tree)
                tree.clear()
                tree.update(mutant)

            path = lab_policy(lab, Path(tmp) / "mutant.toml", edit)
            before = ruleset(lab)
            done = apply(lab, path)
            if done.returncode != 0:
                assert "Traceback" not in done.stderr, done.stderr
                assert ruleset(lab) == before, "a refused policy changed the ruleset in force"
                outcomes.append("refused")
                return
            found = leaks(lab, path)
            assert not found, "\n" + path.read_text() + "\n" + "\n".join(found)
            outcomes.append("accepted")

    assert apply(lab, lab_policy(lab, tmp_path / "shipped.toml")).returncode == 0
    one()
    assert outcomes.count("accepted") >= MUTANTS // 2, outcomes
