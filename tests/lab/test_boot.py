"""tailsfwd booted by a real systemd (systemd-nspawn, its own network namespace).

One container serves the tests of a working install, in order (the
watchdog test, which changes the unit, last); a second one boots a broken
install.  A probe unit ordered after network-pre.target lists the ruleset
the moment it starts: what a network service would meet.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tailsfw import nsrules, policy, summary, verify
from tailsfw.droplog import DROP_MESSAGE_ID
from tailsfw.nspolicy import Namespace
from tailsfw.sysctl import sysctl_name
from tests.lab.appns import make_namespace, wait_guest
from tests.lab.boot import (
    INSTALLED,
    PROBE_FILE,
    PROBE_UNIT,
    Container,
    Watch,
    active,
    booted,
    installed_units,
    main_pid,
    restarted,
)
from tests.lab.command import REPO, netns_exec

TARGET = "tfwboot.target"
TEST_UNITS = {
    TARGET: """[Unit]
Description=tailsfw boot test
Wants=systemd-journald.socket systemd-journald.service tailsfwd.service tfwboot-probe.service
""",
    "tfwboot-probe.service": PROBE_UNIT,
}
UNAVAILABLE = [tool for tool in ("systemd-nspawn", "nsenter") if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(bool(UNAVAILABLE), reason=f"missing {UNAVAILABLE}")


@pytest.fixture(scope="module")
def container() -> Iterator[Container]:
    with booted({**installed_units(), **TEST_UNITS}, TARGET) as running:
        running.wait("tailsfwd active", lambda: active(running))
        running.wait("probe done", lambda: running.run("test", "-e", PROBE_FILE, check=False)
                     .returncode == 0)  # fmt: skip
        yield running


def tailsfwctl_status(c: Container) -> tuple[int, dict[str, Any]]:
    done = c.run(
        "env", f"PYTHONPATH={INSTALLED}", f"{INSTALLED}/.venv/bin/python", "-m", "tailsfw.cli",
        "status", "--json",
        check=False,
    )  # fmt: skip
    assert done.stderr == "", done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    return done.returncode, data


def test_the_full_ruleset_is_in_force_when_network_pre_is_reached(container: Container) -> None:
    at_network_pre = json.loads(container.run("cat", PROBE_FILE).stdout)["nftables"]
    assert "lockdown" not in json.dumps(at_network_pre)
    # The very ruleset in force now, which status finds to be the policy's.
    assert verify.canonical(at_network_pre) == verify.canonical(container.ruleset())
    code, data = tailsfwctl_status(container)
    assert code == summary.OK, data
    assert data["daemon"]["running"] is True
    assert data["kernel"]["holds"] == "policy"


def test_systemctl_status_shows_it_active_with_its_status_line(container: Container) -> None:
    out = container.run("systemctl", "status", "--no-pager", "tailsfwd.service").stdout
    assert "Active: active (running)" in out
    status = json.loads(container.run("cat", "/run/tailsfw/status.json").stdout)
    assert f'Status: "ruleset {status["ruleset"][:12]} in force;' in out
    # ProtectKernelTunables=yes, and ReadWritePaths=/proc/sys/net opens what it sets.
    wanted = [s for s in status["sysctls"] if s["wanted"] is not None]
    assert wanted and all(s["actual"] == s["wanted"] for s in wanted), wanted


def test_the_daemons_log_lines_are_in_the_journal(container: Container) -> None:
    entries = container.journal("SYSLOG_IDENTIFIER=tailsfwd")
    messages = [e["MESSAGE"] for e in entries]
    assert any("in force (/etc/tailsfw/policy.toml)" in m for m in messages), messages
    # Its own commits are its own, also with the task ids outside the container.
    assert not [m for m in messages if "another process" in m], messages
    starts = container.journal("-u", "tailsfwd.service", "SYSLOG_IDENTIFIER=fail-closed")
    assert any("lockdown ruleset loaded" in e["MESSAGE"] for e in starts)


def test_drops_believes_tailsfwds_entries_and_not_a_users(container: Container) -> None:
    """Under a real systemd, journald sets _UID=0 and _SYSTEMD_UNIT=tailsfwd.service on
    tailsfwd's entries (the match docs/drops.md gives); a user's forged drop entry has
    neither, and `tailsfwctl drops` leaves it out and counts it."""
    match = ("_UID=0", "_SYSTEMD_UNIT=tailsfwd.service", "SYSLOG_IDENTIFIER=tailsfwd")
    own = container.journal(*match)
    assert any("in force" in e["MESSAGE"] for e in own), own
    forged = "\n".join([
        "MESSAGE=forged", f"MESSAGE_ID={DROP_MESSAGE_ID}", "SYSLOG_IDENTIFIER=tailsfwd",
        "TAILSFW_KIND=drop", "TAILSFW_REASON=Dropped outbound packet", "TAILSFW_FAMILY=ipv4",
        "TAILSFW_SRC=10.0.0.1", "TAILSFW_DST=198.51.100.250", "TAILSFW_PROTO=UDP", "",
    ])  # fmt: skip
    user = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")  # no /etc/passwd there
    container.run(*user, "logger", "--journald", input=forged)
    container.wait("the forged entry", lambda: bool(container.journal("MESSAGE=forged")))
    done = container.run(
        "env", f"PYTHONPATH={INSTALLED}", f"{INSTALLED}/.venv/bin/python", "-m", "tailsfw.cli",
        "drops", "--json", check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "198.51.100.250" not in done.stdout
    assert "ignored 1 entry with tailsfwd's MESSAGE_IDs not written by tailsfwd" in done.stderr


def test_systemctl_reload_reloads(container: Container) -> None:
    container.run("systemctl", "reload", "tailsfwd.service")
    container.wait(
        "reload counted",
        lambda: (
            json.loads(container.run("cat", "/run/tailsfw/status.json").stdout)["counters"][
                "reloads"
            ]
            == 1
        ),
    )
    messages = [e["MESSAGE"] for e in container.journal("SYSLOG_IDENTIFIER=tailsfwd")]
    assert any("policy reloaded: ruleset" in m for m in messages), messages
    assert active(container)


def test_application_namespaces_made_after_boot_get_their_rules(container: Container) -> None:
    """Made as tails-create-netns makes them, after tailsfwd started, each of
    the shipped policy's namespaces gets its guest ruleset and settings from
    tailsfwd under the shipped unit: its mount namespace sees the new
    /run/netns mounts, it may setns() into them (CAP_SYS_ADMIN,
    RestrictNamespaces=net), and /proc/sys/net written from inside shows the
    guest's settings.  The host gets its forwarding settings; a namespace
    deleted is not kept alive by tailsfwd and, made again, gets its rules
    again, also from a tailsfwd restarted after it was made."""
    c = container
    namespaces = policy.load(REPO / "etc" / "tailsfw" / "policy.toml").namespaces

    def sysctl(key: str, *where: str) -> str:
        return c.run(*where, "sysctl", "-n", key).stdout.strip()

    def failing() -> str:
        return str(json.loads(c.run("cat", "/run/tailsfw/status.json").stdout)["failing"])

    def rules_in_force(ns: Namespace) -> None:
        wait_guest(ns, [*c.way_in, *netns_exec(ns.name)], timeout=10, why=failing)
        for parts, value in nsrules.GUEST_SETTINGS:
            assert sysctl(sysctl_name(parts), *netns_exec(ns.name)) == value, (ns.name, parts)

    try:
        for ns in namespaces:
            make_namespace(ns, ns.name, via=c.way_in)
        for ns in namespaces:
            rules_in_force(ns)
        present = {ns.veth for ns in namespaces}
        host = {sysctl_name(parts): v for parts, v in nsrules.host_sysctls(namespaces, present)}
        c.wait(f"the host's {host}", lambda: {key: sysctl(key) for key in host} == host)
        # The guests' writes went to the guests, not to the host.
        assert sysctl("net.ipv4.conf.all.route_localnet") == "0"
        code, data = tailsfwctl_status(c)
        assert code == summary.OK and data["daemon"]["properties"]["Failing"] == {}, data

        tbb = next(ns for ns in namespaces if ns.name == "tbb")
        c.run("ip", "netns", "delete", "tbb")
        gone = ("ip", "link", "show", tbb.veth)  # its veth with it: tailsfwd does not hold it
        c.wait("tbb gone", lambda: c.run(*gone, check=False).returncode != 0)
        make_namespace(tbb, "tbb", via=c.way_in)
        rules_in_force(tbb)
        c.run("ip", "netns", "exec", "tbb", "nft", "delete", "table", "ip", "tailsfw")
        c.run("systemctl", "restart", "tailsfwd.service")
        rules_in_force(tbb)
        assert tailsfwctl_status(c)[1]["daemon"]["properties"]["Failing"] == {}
    finally:
        for ns in namespaces:
            c.run("ip", "netns", "delete", ns.name, check=False)


def test_kill_9_is_restarted_and_the_rules_are_never_absent(container: Container) -> None:
    old = main_pid(container)
    restarts = int(container.show("tailsfwd.service", "NRestarts"))
    watch = Watch(container)
    time.sleep(0.2)
    container.run("kill", "-9", str(old))
    took = container.wait("restarted", lambda: restarted(container, old))
    time.sleep(0.2)
    checks, gaps = watch.stop()
    assert gaps == []
    assert checks > 2 * (took + 0.4) / 0.1, "the watch must list many times a second"
    assert int(container.show("tailsfwd.service", "NRestarts")) == restarts + 1
    assert tailsfwctl_status(container)[0] == summary.OK


def test_a_stopped_daemon_is_killed_by_the_watchdog_and_restarted(container: Container) -> None:
    drop_in = "/run/systemd/system/tailsfwd.service.d"
    container.run("mkdir", "-p", drop_in)
    container.run(
        "sh",
        "-c",
        f"printf '[Service]\\nWatchdogSec=1s\\nTimeoutAbortSec=1s\\n' > {drop_in}/w.conf",
    )
    container.run("systemctl", "daemon-reload")
    container.run("systemctl", "restart", "tailsfwd.service")  # the new WatchdogSec
    container.wait("active", lambda: active(container))
    old = main_pid(container)
    watch = Watch(container)
    container.run("kill", "-STOP", str(old))
    took = container.wait("restarted by the watchdog", lambda: restarted(container, old))
    _, gaps = watch.stop()
    assert gaps == []
    assert 0.9 < took < 5
    messages = [e["MESSAGE"] for e in container.journal("-u", "tailsfwd.service")]
    assert any("Watchdog timeout" in m for m in messages), messages


def test_a_broken_install_still_leaves_the_lockdown_and_a_failed_unit() -> None:
    broken = {
        "tailsfwd.service.d/broken.conf": (
            "[Service]\nExecStart=\nExecStart=/nonexistent/venv/bin/python -m tailsfw.tailsfwd\n"
        )
    }
    with booted({**installed_units(), **TEST_UNITS, **broken}, TARGET) as c:
        c.wait("probe done", lambda: c.run("test", "-e", PROBE_FILE, check=False).returncode == 0)
        at_network_pre = json.loads(c.run("cat", PROBE_FILE).stdout)["nftables"]
        tables = {o["table"]["family"] for o in at_network_pre if "table" in o}
        assert tables == {"ip", "ip6"}
        rules = [o["rule"] for o in at_network_pre if "rule" in o]
        assert rules and all(r.get("comment") == "lockdown: loopback only" for r in rules)
        c.wait(
            "tailsfwd failed",
            lambda: c.show("tailsfwd.service", "ActiveState") == "failed",
            timeout=30,
        )
        assert "lockdown" in json.dumps(c.ruleset())
        code, _ = tailsfwctl_status(c)
        assert code == summary.NOT_IN_FORCE
