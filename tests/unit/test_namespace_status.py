"""The application namespaces in the status (issue 15): the daemon's value,
published as namespaces come and go and get their guest side; the D-Bus
property and status.json; tailsfwctl status's lines, verdict and exit
status from the kernel (root) or the daemon's report.  No namespace is
entered here: `guests.put_in_force` is a fake; the lab enters real ones."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from tailsfw import guests, policy, service, statusfile, summary, verify
from tailsfw.desired import Desired
from tailsfw.events import NamespacesPresent, updated
from tailsfw.facts import Facts
from tailsfw.guests import GuestsEffect
from tailsfw.netnsfiles import NetnsId
from tailsfw.nsrules import Guest
from tailsfw.status import NamespaceState
from tests.unit.daemon_fakes import DEFAULT, drive, links, rig
from tests.unit.test_status_view import IN_FORCE, STATUS, seen

NAMES = ["tbb", "onioncircs", "tca", "onionshare", "clearnet"]  # the shipped policy's order


def namespaces(status: dict[str, Any]) -> dict[str, tuple[bool, bool, str]]:
    return {n["name"]: (n["present"], n["in_force"], n["note"]) for n in status["namespaces"]}


def test_the_published_status_follows_the_namespaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each change is published on its own (nothing else changes here): a
    namespace appearing and put in force, one failing and why, one gone."""
    refused = {"tca"}

    def put_in_force(path: Path, guest: Guest, follow: bool) -> None:
        assert path == tmp_path / "netns" / f"pre-{guest.ns.name}" and not follow
        if guest.ns.name in refused:
            raise OSError(1, "setns: Operation not permitted")

    monkeypatch.setattr(guests, "put_in_force", put_in_force)
    r = rig(tmp_path, links("192.168.1.2/24"), guests=GuestsEffect(tmp_path / "netns", "pre-"))
    published = r.daemon.settings.status_file
    seen_: list[dict[str, tuple[bool, bool, str]]] = []

    async def scenario() -> None:
        # Beyond report.PUBLISH_INTERVAL since READY: the namespace's
        # appearing is published at once, and its guest side then again.
        await asyncio.sleep(0.25)
        for present in (
            {"tbb": NetnsId(9, 1)},
            {"tbb": NetnsId(9, 1), "tca": NetnsId(9, 2), "notours": NetnsId(9, 3)},
            {"tca": NetnsId(9, 2)},
        ):
            await r.feed(NamespacesPresent(tuple(sorted(present.items()))), settle=0.25)
            seen_.append(namespaces(json.loads(published.read_text())))

    drive(r, scenario)
    absent = (False, False, "")
    tca_refused = (True, False, "[Errno 1] setns: Operation not permitted")
    assert list(seen_[0]) == NAMES
    assert seen_[0] == {n: (True, True, "") if n == "tbb" else absent for n in NAMES}
    assert seen_[1]["tbb"] == (True, True, "") and seen_[1]["tca"] == tca_refused
    assert seen_[2]["tbb"] == absent and seen_[2]["tca"] == tca_refused
    assert "notours" not in seen_[1]


def test_a_present_namespace_not_yet_done_is_being_set_up(tmp_path: Path) -> None:
    facts = updated(Facts(), NamespacesPresent((("tbb", NetnsId(1, 2)),)))
    (tbb, *_) = GuestsEffect(tmp_path).states(Desired(policy.load(DEFAULT), facts))
    assert tbb == NamespaceState("tbb", present=True, in_force=False, note=guests.SETTING_UP)


def test_the_namespaces_as_d_bus_and_status_json_carry_them() -> None:
    status = dataclasses.replace(
        STATUS,
        namespaces=[NamespaceState("tbb", True, True), NamespaceState("tca", True, False, "no")],
    )
    assert service.properties(status)["Namespaces"] == [
        ["tbb", True, True, ""],
        ["tca", True, False, "no"],
    ]
    back = statusfile.status_from_json(json.loads(json.dumps(dataclasses.asdict(status))))
    assert back.namespaces == status.namespaces
    assert service.properties(STATUS)["Namespaces"] == []


def daemon_with(*states: NamespaceState) -> dict[str, Any]:
    return service.properties(dataclasses.replace(STATUS, namespaces=list(states)))


TBB_DIFFERS = summary.Guest(
    "tbb", True, False, ("chain ip tailsfw output: rule 1 `accept` is not in the policy",)
)


@pytest.mark.parametrize(
    ("guests_", "daemon", "code", "first"),
    [
        # root: what was found inside each namespace decides
        ((summary.Guest("tbb", True, True), summary.Guest("tca", False, False)), None, 0, "on:"),
        ((TBB_DIFFERS,), None, summary.NOT_IN_FORCE, "not the policy: the guest rules of"),
        ((summary.Guest("tbb", True, False, note="cannot look inside: x"),), None, 3, "not the"),
        # root finding them right, whatever the daemon says
        ((summary.Guest("tbb", True, True),), daemon_with(NamespaceState("tbb", True)), 0, "on:"),
        # not root: the daemon's report decides
        (None, daemon_with(NamespaceState("tbb", True, True), NamespaceState("tca", False)), 0,
         "on:"),
        (None, daemon_with(NamespaceState("tbb", True, False, "being set up")), 3,
         "not the policy: the guest rules of namespace tbb are not in force"),
    ],
)  # fmt: skip
def test_a_present_namespace_not_in_force_is_not_on(
    guests_: tuple[summary.Guest, ...] | None, daemon: dict[str, Any] | None, code: int, first: str
) -> None:
    kernel = IN_FORCE if guests_ is not None else None
    obs = dataclasses.replace(seen(daemon, kernel), guests=guests_)
    got, answer = summary.verdict(obs)
    assert (got, answer[: len(first)]) == (code, first)
    assert summary.to_json(obs)["exit_status"] == code


def test_the_host_rulesets_verdict_comes_first() -> None:
    obs = dataclasses.replace(seen(None, summary.Kernel((), summary.NONE)), guests=(TBB_DIFFERS,))
    assert summary.verdict(obs)[1].startswith("off:")


def test_one_line_per_namespace_and_its_differences() -> None:
    obs = dataclasses.replace(
        seen(None, IN_FORCE),
        guests=(TBB_DIFFERS, summary.Guest("tca", False, False), summary.Guest("oc", True, True)),
    )
    lines = summary.render(obs).splitlines()
    rows = [line.strip() for line in lines if "Namespace:" in line or "tbb:" in line]
    assert rows == [
        "Namespace: tbb: present, guest rules not in force: 1 difference (checked inside it)",
        "Differs: tbb: chain ip tailsfw output: rule 1 `accept` is not in the policy",
        "Namespace: tca: absent",
        "Namespace: oc: present, guest rules in force (checked inside it)",
    ]
    reported = seen(daemon_with(NamespaceState("tbb", True, False, "setns: denied")))
    assert (
        "Namespace: tbb: present, guest rules not in force: setns: denied (as tailsfwd reports)"
        in summary.render(reported)
    )
    data = summary.to_json(obs)["namespaces"]
    assert data[0] == {
        "name": "tbb", "present": True, "in_force": False, "note": "",
        "differences": list(TBB_DIFFERS.differences), "source": "checked inside it",
    }  # fmt: skip


def test_settings_differences_name_the_setting_and_both_values() -> None:
    wanted = [("net.ipv4.ip_forward", "0"), ("net.ipv4.conf.all.route_localnet", "1")]
    assert verify.settings_differences(wanted, dict(wanted)) == []
    assert verify.settings_differences(wanted, {"net.ipv4.ip_forward": "1"}) == [
        "setting net.ipv4.ip_forward: is 1, the policy wants 0",
        "setting net.ipv4.conf.all.route_localnet: is missing, the policy wants 1",
    ]
