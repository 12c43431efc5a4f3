"""netns_ready_ms: how soon tailsfwd puts an application namespace's rules in force.

In a network namespace of its own (the host, removed at the end), the real
tailsfwd with the shipped policy; ROUNDS times, the clearnet namespace is
made as tails-create-netns makes it (`ip netns add`, then the veth pair and
the addresses) and deleted again.  Timed from just before `ip netns add` to
the moment both sides are in force: inside the namespace `route_localnet`
reads 1 (the daemon writes the settings after the guest ruleset's commit),
and on the host `ip_forward` reads 1 (a clearnet veth exists).  Polled from
this process through files opened in each namespace (a /proc/sys file reads
the namespace it was opened in).  The guest ruleset is checked against
nsrules.guest_ruleset after the first round.  p50/p99 printed.

guest_restore_ms: in the first round, TAMPERINGS times, the guest's ruleset
is flushed from a thread of this process inside it (another process, for
tailsfwd), and timed until the guest's table is back whole (listed by the
same thread through one libnftables context, about every millisecond).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from bench.daemon import POLICY, percentile
from tailsfw import nsrules, policy, verify
from tailsfw.nft import Nft
from tests.lab.appns import restore_times
from tests.lab.command import run
from tests.lab.daemon_process import run_daemon
from tests.lab.names import BENCH_NS, temp_prefix
from tests.lab.netns import delete_namespace, in_netns, scratch_namespace

ROUNDS = 25
TAMPERINGS = 25
NAME = "clearnet"
ROUTE_LOCALNET = "/proc/sys/net/ipv4/conf/all/route_localnet"
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"


def opened(namespace: str, path: str) -> int:
    return in_netns(namespace, lambda: os.open(path, os.O_RDONLY | os.O_CLOEXEC))


def reads(fd: int, value: bytes) -> bool:
    return os.pread(fd, 16, 0).strip() == value


def in_force(guest: int, host: int) -> bool:
    return reads(guest, b"1") and reads(host, b"1")


def until(check: Callable[[], bool], what: str, timeout: float = 5.0) -> float:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout} s")
        time.sleep(0.0002)
    return time.monotonic()


def ready_times(host: str) -> tuple[list[float], list[float]]:
    (ns,) = [ns for ns in policy.load(POLICY).namespaces if ns.name == NAME]
    guest = f"{host}-{NAME}"
    veth = [f"link add {ns.veth} type veth peer name veth0 netns {guest}",
            f"addr add {ns.host}/30 dev {ns.veth}", f"link set {ns.veth} up"]  # fmt: skip
    inside = ["link set lo up", f"addr add {ns.guest}/30 dev veth0", "link set veth0 up",
              f"route add default via {ns.host}"]  # fmt: skip
    times: list[float] = []
    restores: list[float] = []
    forward = opened(host, IP_FORWARD)
    try:
        with tempfile.TemporaryDirectory(prefix=temp_prefix("bench-netns")) as tmp:
            args = ["--netns-prefix", f"{host}-"]
            with run_daemon(host, POLICY, Path(tmp) / "run", args) as daemon:
                daemon.wait_ready()
                for i in range(ROUNDS):
                    start = time.monotonic()
                    run(["ip", "netns", "add", guest])
                    try:
                        run(["ip", "-n", host, "-batch", "-"], input="\n".join(veth) + "\n")
                        run(["ip", "-n", guest, "-batch", "-"], input="\n".join(inside) + "\n")
                        localnet = opened(guest, ROUTE_LOCALNET)
                        try:
                            both = partial(in_force, localnet, forward)
                            times.append((until(both, f"round {i}") - start) * 1000)
                        finally:
                            os.close(localnet)
                        if i == 0:
                            listing = in_netns(guest, lambda: Nft().list_ruleset())
                            wrong = verify.differences(listing, nsrules.guest_ruleset(ns))
                            if wrong:
                                raise RuntimeError(f"the guest ruleset differs: {wrong}")
                            restores = restore_times(guest, ns, [0.02] * TAMPERINGS)
                    finally:
                        delete_namespace(guest)
                    until(lambda: reads(forward, b"0"), "ip_forward back to 0")
                if daemon.status()["failing"]:
                    raise RuntimeError(f"failing: {daemon.status()['failing']}")
    finally:
        os.close(forward)
    return times, restores


def measure() -> dict[str, Any]:
    with scratch_namespace(BENCH_NS) as host:
        times, restores = ready_times(host)
    return {
        "netns_ready_ms_p50": round(statistics.median(times), 2),
        "netns_ready_ms_p99": round(percentile(times, 99), 2),
        "netns_ready_samples": len(times),
        "guest_restore_ms_p50": round(statistics.median(restores), 2),
        "guest_restore_ms_p99": round(percentile(restores, 99), 2),
        "guest_restore_samples": len(restores),
    }


if __name__ == "__main__":
    json.dump(measure(), sys.stdout, indent=1)
    print()
