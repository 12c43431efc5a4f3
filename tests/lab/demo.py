"""`make demo`: the whole product at work, inside network namespaces.

The lab host gets a real NetworkManager (leases from a DHCP server in the
peer), a private system bus, a private journald, and tailsfwd with the
shipped policy (its users played by the lab's test accounts).  Then:
`tailsfwctl status`, the resolv files, the leak matrix, refused packets read
back with `tailsfwctl drops`, and a link change followed live.  Everything is
removed at the end; with DEMO_KEEP=1 it stays until Ctrl-C, and the commands
to look around are printed.  Nothing touches this machine's own network
namespace, /etc or journal.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.lab import matrix
from tests.lab.appns import netns_prefix
from tests.lab.bus import private_system_bus
from tests.lab.command import VENV_PYTHON, command_env, netns_exec, run
from tests.lab.daemon_process import DaemonProcess, run_daemon
from tests.lab.journald import Journald, run_journald
from tests.lab.kernel import lab_host_put_back, lan_networks
from tests.lab.names import temp_prefix
from tests.lab.networkmanager import LEASED, extra_link, network_manager
from tests.lab.policies import LAB_ROLES, lab_policy
from tests.lab.topology import INTERNET_V4, UNAVAILABLE, Lab
from tests.lab.tor_demo import tor_act

STEPS = 9
NEW_LINK = ("tfwdemo0", "tfwdemo1")
NEW_LAN = ipaddress.IPv4Network("10.77.9.0/24")


class Progress:
    def __init__(self) -> None:
        self.step = 0
        self.start = time.monotonic()

    def __call__(self, what: str) -> None:
        self.step += 1
        print(f"\n[{self.step}/{STEPS}] {what}", flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def indent(text: str) -> str:
    return "".join(f"    {line}\n" for line in text.rstrip("\n").splitlines())


def tailsfwctl(lab: Lab, *args: str) -> str:
    done = subprocess.run(
        [*netns_exec(lab.host_ns), VENV_PYTHON, "-m", "tailsfw.cli", *args],
        capture_output=True, text=True, timeout=60, check=False, env=command_env(),
    )  # fmt: skip
    return done.stdout + done.stderr


def connected_mode(data: dict[str, Any]) -> None:
    data["lan"]["mode"] = "connected"  # the LAN set follows the links: shown in step 8


@contextlib.contextmanager
def new_link(lab: Lab) -> Iterator[None]:
    host, peer = NEW_LINK
    run(["ip", "-n", lab.host_ns, "link", "add", host, "type", "veth", "peer", peer,
         "netns", lab.peer_ns])  # fmt: skip
    try:
        yield
    finally:
        subprocess.run(["ip", "-n", lab.host_ns, "link", "del", host], check=False)


def follow_a_link_change(lab: Lab) -> str:
    host, _ = NEW_LINK
    before = lan_networks(lab.host_ns)
    start = time.monotonic()
    run(["ip", "-n", lab.host_ns, "addr", "add", f"{NEW_LAN[2]}/{NEW_LAN.prefixlen}", "dev", host])
    run(["ip", "-n", lab.host_ns, "link", "set", host, "up"])
    while NEW_LAN not in lan_networks(lab.host_ns):
        if time.monotonic() - start > 5:
            return f"{NEW_LAN} not in the LAN set after 5 s"
        time.sleep(0.001)
    ms = (time.monotonic() - start) * 1000
    after = lan_networks(lab.host_ns)
    return (
        f"on-link LAN networks before: {', '.join(map(str, sorted(before)))}\n"
        f"{host} up with {NEW_LAN[2]}: in the ruleset's LAN set {ms:.0f} ms later\n"
        f"after: {', '.join(map(str, sorted(after)))}"
    )


def show(daemon: DaemonProcess, lab: Lab, journald: Journald, bus: str, policy: Path) -> bool:
    progress = SHOW
    progress("tailsfwctl status")
    status = tailsfwctl(lab, "status", "--policy", str(policy), "--bus", bus,
                        "--state-file", str(daemon.state_dir / "status.json"))  # fmt: skip
    print(indent(status))
    progress("the resolv files (NetworkManager's leased DNS servers, and Tor's DNS)")
    deadline = time.monotonic() + 15
    while daemon.status()["clearnet_dns"] != list(LEASED) and time.monotonic() < deadline:
        time.sleep(0.05)
    for path in (daemon.resolv_conf, daemon.clearnet_conf):
        print(f"    {path.name}:\n{indent(indent(path.read_text() if path.exists() else '-'))}")
    progress(f"leak matrix: {len(matrix.USERS)} users x {len(matrix.DESTINATIONS)} destinations"
             " (open/refused: as the spec says; !!: not as the spec says)")  # fmt: skip
    cases = matrix.run(lab)
    print(indent(matrix.table(cases)))
    progress("refused packets, from the journal (tailsfwctl drops)")
    for proto in ("tcp", "udp"):
        lab.probe("amnesia", proto, 4, INTERNET_V4[0], 42)
    time.sleep(0.3)
    user = lab.account("amnesia").name
    listed = tailsfwctl(lab, "drops", "--user", user, "--directory", str(journald.files))
    drops = listed.splitlines()
    print(indent("\n".join(drops[-6:]) or "(none)"))
    progress("a link change, followed live")
    print(indent(follow_a_link_change(lab)))
    progress("a real Tor network behind tailsfwd, and Tor Browser's namespace (docs/tor-lab.md)")
    tor_act(lab, apply=False)
    return not any(c.problem for c in cases)


SHOW = Progress()


def keep(lab: Lab, daemon: DaemonProcess, journald: Journald, bus: str) -> None:
    host = shlex.join(netns_exec(lab.host_ns))
    print(f"""
DEMO_KEEP=1: the lab stays until Ctrl-C.  To look around:
    {host} nft list ruleset
    {host} {VENV_PYTHON} -m tailsfw.cli status --bus {bus}
    {host} {VENV_PYTHON} -m tailsfw.cli drops --directory {journald.files} --follow
    cat {daemon.state_dir / 'status.json'}
    cat {daemon.clearnet_conf}
    {shlex.join([*netns_exec(lab.host_ns), *lab.setpriv('amnesia')])} curl -m 2 http://{INTERNET_V4[0]}/
""", flush=True)  # fmt: skip
    with contextlib.suppress(KeyboardInterrupt):
        signal.pause()


def main() -> int:
    if UNAVAILABLE:
        print(UNAVAILABLE, file=sys.stderr)
        return 2
    progress = SHOW
    with contextlib.ExitStack() as stack:
        progress("the lab: a host and its LAN/Internet peer in network namespaces")
        lab = stack.enter_context(Lab(LAB_ROLES))
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=temp_prefix("demo"))))
        print(f"    host {lab.host_ns}, peer {lab.peer_ns} ({progress.elapsed():.1f} s)")
        progress("NetworkManager on a private bus, leases from dnsmasq; a bus and a journald")
        link = stack.enter_context(extra_link(lab.host_ns, lab.peer_ns))
        nm = stack.enter_context(
            network_manager(lab.host_ns, lab.peer_ns, link, tmp / "nm", LEASED)
        )
        bus = stack.enter_context(private_system_bus())
        journald = stack.enter_context(run_journald(tmp / "journald"))
        print(f"    DHCP hands out DNS {', '.join(LEASED)} ({progress.elapsed():.1f} s)")
        progress("tailsfwd in the lab host, with the shipped policy")
        policy = lab_policy(lab, tmp / "policy.toml", connected_mode)
        stack.enter_context(lab_host_put_back(lab))
        stack.enter_context(new_link(lab))
        netns = tmp / "netns"  # /run/netns as the daemon sees it (see Journald.wrap)
        netns.mkdir()
        daemon = stack.enter_context(
            run_daemon(lab.host_ns, policy, tmp / "tailsfwd",
                       ["--nm-bus", nm.bus.address, "--bus", bus.address,
                        "--netns-prefix", netns_prefix(lab), "--netns-dir", str(netns)],
                       wrap=lambda argv: journald.wrap(argv, netns_dir=netns))
        )  # fmt: skip
        ready = daemon.wait_ready()
        print(f"    READY after {(time.monotonic() - daemon.started) * 1000:.0f} ms:"
              f" {ready['STATUS']}")  # fmt: skip
        ok = show(daemon, lab, journald, bus.address, policy)
        if os.environ.get("DEMO_KEEP") == "1":
            keep(lab, daemon, journald, bus.address)
    print(f"\n{'no leak' if ok else 'PROBLEMS above'}; everything removed"
          f" ({progress.elapsed():.1f} s in all)")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
