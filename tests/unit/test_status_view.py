"""tailsfwctl status without a kernel or a bus: the verdict, the text, the D-Bus
properties, and telling a live daemon's status.json from a dead one's."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tailsfw import cli, service, summary
from tailsfw.status import Counters, DropCounters, Status, SysctlState

DIGEST = "0123456789ab" + "c" * 52
STATUS = Status(
    pid=99,
    state="enforcing",
    policy="/etc/tailsfw/policy.toml",
    ruleset=DIGEST,
    lan_mode="connected",
    connected=["192.168.77.0/24"],
    interfaces={1: "lo"},
    warnings=["user htp: no account"],
    last_error="",
    counters=Counters(commits=2),
    sysctls=[
        SysctlState("net.ipv4.tcp_mtu_probing", "1", "1"),
        SysctlState("net.ipv6.conf.all.disable_ipv6", "1", "0", "cannot write"),
    ],
    netlink_reads=1,
)


FULL = Status(
    **{
        **vars(STATUS),
        "running_since": 1_700_000_000.0,
        "last_apply": 1_700_000_060.5,
        "last_apply_cause": "links",
        "clearnet_dns": ["192.168.77.1"],
        "dns_refused": ["fe80::1: not IPv4"],
        "drops": DropCounters(drops=7, by_user={"amnesia": 7}, by_reason={"lan": 7}),
    }
)


def seen(
    daemon: dict[str, Any] | None = None,
    kernel: summary.Kernel | None = None,
    error: str = "",
    note: str = "compared",
) -> summary.Observation:
    return summary.Observation(
        policy_path="/etc/tailsfw/policy.toml",
        expected="" if error else DIGEST,
        policy_error=error,
        daemon=daemon,
        daemon_source="D-Bus" if daemon else "no /run/tailsfw/status.json",
        kernel=kernel,
        kernel_note=note,
    )


IN_FORCE = summary.Kernel(("ip", "ip6"), summary.POLICY)


def test_properties_from_a_status_and_the_drop_counters_to_come() -> None:
    today = service.properties(STATUS)
    assert today["RunningSince"] == 0 and today["ClearnetDns"] == []
    assert today["DropsByUser"] == {} and today["LastApplyCause"] == ""
    wrong = ["net.ipv6.conf.all.disable_ipv6", "1", "0", False, "cannot write"]
    assert today["Sysctls"][1] == wrong
    later = service.properties(FULL)
    assert later["RunningSince"] == 1_700_000_000_000_000
    assert later["LastApply"] == 1_700_000_060_500_000
    assert later["ClearnetDns"] == ["192.168.77.1"]
    assert later["DnsRefused"] == ["fe80::1: not IPv4"]
    assert later["DropsByReason"] == {"lan": 7}


@pytest.mark.parametrize(
    ("kernel", "daemon_state", "code", "first"),
    [
        (IN_FORCE, "enforcing", summary.OK, "on: the policy's ruleset is in force"),
        (summary.Kernel((), summary.NONE), None, summary.NOT_IN_FORCE, "off: no tailsfw"),
        (summary.Kernel(("ip", "ip6"), summary.LOCKDOWN), "lockdown", 3, "lockdown: only"),
        (summary.Kernel(("ip",), summary.OTHER), "enforcing", 3, "not the policy: the kernel"),
        (None, "enforcing", summary.OK, "on:"),
        (None, "lockdown", summary.NOT_IN_FORCE, "lockdown:"),
        (None, None, summary.NO_PERMISSION, "unknown: tailsfwd is not running"),
    ],
)
def test_verdict(
    kernel: summary.Kernel | None, daemon_state: str | None, code: int, first: str
) -> None:
    daemon = None
    if daemon_state:
        daemon = service.properties(dataclasses.replace(STATUS, state=daemon_state))
    got, answer = summary.verdict(seen(daemon, kernel))
    assert (got, answer[: len(first)]) == (code, first)


@pytest.mark.parametrize("state", ["starting", "tampered", "lockdown", "failed", "", "other"])
def test_a_daemon_that_does_not_enforce_is_never_on_even_with_the_policys_digest(
    state: str,
) -> None:
    reported = dataclasses.replace(STATUS, state=state, last_error="")
    daemon = service.properties(reported)
    assert daemon["RulesetDigest"] == DIGEST  # the policy's: only the state says no
    code, answer = summary.verdict(seen(daemon))
    assert code == summary.NOT_IN_FORCE
    text = summary.render(seen(daemon))
    assert "in force" not in reported.line()
    assert "in force" not in text.splitlines()[0] or "not in force" in text.splitlines()[0]
    assert "matches the policy" not in text
    assert text.splitlines()[0] == f"● tailsfw: {answer}"


def test_a_daemon_that_does_not_answer_is_named_in_the_verdict() -> None:
    silent = dataclasses.replace(seen(), daemon_source="tailsfwd does not answer on the bus (3 s)")
    assert summary.verdict(silent) == (
        summary.NO_PERMISSION,
        "unknown: tailsfwd does not answer and only root can read the kernel",
    )


def test_the_kernels_differences_are_shown() -> None:
    other = summary.Kernel(("inet", "ip", "ip6"), summary.OTHER,
                           tuple(f"difference {i}" for i in range(7)))  # fmt: skip
    text = summary.render(seen(None, other))
    assert "  Differs: difference 0\n" in text and "difference 4\n" in text
    assert "difference 5" not in text and "... 2 more (tailsfwctl verify)" in text


def test_a_daemon_with_another_digest_is_not_in_force() -> None:
    other = service.properties(dataclasses.replace(STATUS, ruleset="f" * 64))
    assert summary.verdict(seen(other))[0] == summary.NOT_IN_FORCE


def test_a_bad_policy_has_its_own_code_unless_nothing_is_in_force() -> None:
    assert summary.verdict(seen(kernel=IN_FORCE, error="policy.toml: bad"))[0] == 6
    none = summary.Kernel((), summary.NONE)
    assert summary.verdict(seen(kernel=none, error="policy.toml: bad"))[0] == 3


def test_render_in_order_enforcement_first() -> None:
    daemon = service.properties(FULL)
    text = summary.render(seen(daemon, IN_FORCE))
    lines = text.splitlines()
    assert lines[0] == "● tailsfw: on: the policy's ruleset is in force"
    labels = [line.split(":")[0].strip() for line in lines[1:]]
    assert labels[:5] == ["Daemon", "State", "Policy", "Ruleset", "Applied"]
    assert "running (pid 99, via D-Bus) since" in lines[1]
    assert "0123456789ab; kernel: ip tailsfw, ip6 tailsfw: the policy's ruleset" in text
    assert "DNS: 192.168.77.1; NetworkManager unknown\n" in text
    assert ": refused from NetworkManager: fe80::1: not IPv4\n" in text
    assert "Sysctls: 1 of 2 as wanted" in text
    assert "net.ipv6.conf.all.disable_ipv6: wanted 1, is 0 (cannot write)" in text
    assert "Drops: 7 refused; by user: amnesia 7; by reason: lan 7" in text
    assert "\x1b[" not in text
    assert summary.render(seen(daemon, IN_FORCE), color=True).startswith("\x1b[0;1;32m●")


def test_render_without_daemon_says_so() -> None:
    text = summary.render(seen(None, summary.Kernel((), summary.NONE)))
    assert text.splitlines()[1].strip() == ("Daemon: not running (no /run/tailsfw/status.json)")
    assert "DNS" not in text


def test_json_for_scripts() -> None:
    data = summary.to_json(seen(None, IN_FORCE))
    assert json.loads(json.dumps(data))["in_force"] is True
    assert data["kernel"] == {"tables": ["ip", "ip6"], "holds": "policy", "differences": []}


def test_ago() -> None:
    assert [summary.ago(s) for s in (5, 65, 3725, 90000)] == ["5s", "1min 5s", "1h 2min", "1d 1h"]


def test_apply_as_another_user_says_it_needs_root(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main(["apply", "--policy", "/nonexistent"]) == summary.NO_PERMISSION
    err = capsys.readouterr().err
    assert err == "tailsfwctl: apply needs root; the ruleset in force is unchanged\n"


def test_reload_without_a_bus_is_no_daemon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = f"unix:path={tmp_path}/none"
    assert cli.main(["reload", "--bus", address]) == summary.NO_DAEMON
    assert "tailsfwd is not on the bus" in capsys.readouterr().err


def test_without_daemon_the_ruleset_line_names_the_compiled_digest() -> None:
    text = summary.render(seen(None, IN_FORCE))
    assert "Ruleset: policy compiles to 0123456789ab; kernel: ip tailsfw, ip6 tailsfw" in text
