"""tailsfwd's reaction times, commit counts and memory, in a namespace of its own.

Creates a network namespace (two ends of a veth pair, both in it), runs
tailsfwd there with the shipped policy in `lan.mode = "connected"`, measures,
deletes the namespace, and returns (bench/run.py prints and saves):

- start_to_ready_ms: from starting the process to READY=1 (median of 5);
- daemon_rss_mb_alone: resident memory once started (after the first READY),
  without NetworkManager or a bus (bench/full.py: daemon_rss_mb, with them);
- react_addr_ms_p50/p99: an address added or removed by another process
  (`ip -batch`, fed one line at a time) to the kernel's notice that the
  transaction changing the LAN set is committed; each new set is checked;
- commits_per_1000_flaps: transactions the daemon commits while another
  process adds and removes addresses 1,000 times in one second (then adds
  five); `_burst`: the same 1,000 changes as fast as `ip -batch` goes.
"""

from __future__ import annotations

import ipaddress
import statistics
import tempfile
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tomli_w

from tests.lab.command import REPO, run
from tests.lab.daemon_process import DaemonProcess, run_daemon
from tests.lab.kernel import Changer, lan_networks
from tests.lab.monitors import NftGenerations
from tests.lab.names import BENCH_NS, temp_prefix
from tests.lab.netns import scratch_namespace
from tests.lab.wait import wait_for

POLICY = REPO / "etc" / "tailsfw" / "policy.toml"
IF = "tfwb0"
BASE = ipaddress.IPv4Network("192.168.200.0/24")
STARTS = 5
FLAPS = 1000
FLAP_NETWORKS = 10


@contextmanager
def namespace() -> Iterator[str]:
    with scratch_namespace(BENCH_NS) as name:
        run(["ip", "-n", name, "-batch", "-"], input="\n".join([
            f"link add {IF} type veth peer name tfwb1",
            f"addr add {BASE[2]}/{BASE.prefixlen} dev {IF}",
            f"link set {IF} up",
            "link set tfwb1 up",
        ]) + "\n")  # fmt: skip
        yield name


def write_policy(path: Path) -> Path:
    with POLICY.open("rb") as f:
        data = tomllib.load(f)
    data["lan"]["mode"] = "connected"
    path.write_text(tomli_w.dumps(data))
    return path


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def flap_network(i: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"10.{200 + i // 256}.{i % 256}.0/24")


def start_to_ready(ns: str, policy: Path, work: Path) -> tuple[list[float], float]:
    times, rss = [], 0.0
    for i in range(STARTS):
        with run_daemon(ns, policy, work / f"start{i}") as daemon:
            daemon.wait_ready()
            times.append((time.monotonic() - daemon.started) * 1000)
            if i == 0:
                time.sleep(0.5)  # steady state: the start's garbage is collected
                rss = daemon.rss_mb()
    return times, rss


def react(ns: str, daemon: DaemonProcess, changes: int) -> list[float]:
    base = lan_networks(ns)
    changer = Changer(ns)
    samples: list[float] = []
    try:
        with NftGenerations(ns) as gens:
            for i in range(changes):
                net = flap_network(i // 2)
                add = i % 2 == 0
                gens.drain()
                start = changer(f"addr {'add' if add else 'del'} {net[1]}/24 dev {IF}")
                seen = gens.wait(1.0)
                if seen is None:
                    raise RuntimeError(f"no commit within 1 s after change {i}:\n{daemon.log()}")
                samples.append((seen - start) * 1000)
                expected = base | {net} if add else base
                if lan_networks(ns) != expected:
                    raise RuntimeError(f"change {i}: set is {lan_networks(ns)}, not {expected}")
    finally:
        changer.close()
    return samples


def flap_commands() -> list[str]:
    """1,000 adds and deletes over ten networks, then five adds."""
    return [
        f"addr {'add' if round_ % 2 == 0 else 'del'} {flap_network(k)[1]}/24 dev {IF}"
        for round_ in range(FLAPS // FLAP_NETWORKS)
        for k in range(FLAP_NETWORKS)
    ] + [f"addr add {flap_network(k)[1]}/24 dev {IF}" for k in range(5)]


def flaps(ns: str, daemon: DaemonProcess, spread: float | None) -> tuple[int, float]:
    """Commits while the flaps run: all at once, or spread over `spread` seconds.

    Returns the commits and how long the flaps took (ms); checks the final set.
    """
    base = lan_networks(ns)
    commands = flap_commands()
    before = daemon.commits()
    start = time.monotonic()
    if spread is None:
        run(["ip", "-n", ns, "-batch", "-"], input="\n".join(commands) + "\n")
    else:
        with Changer(ns) as changer:
            for i, command in enumerate(commands):
                time.sleep(max(0.0, start + i * spread / len(commands) - time.monotonic()))
                changer(command)
    elapsed = time.monotonic() - start
    expected = set(ipaddress.collapse_addresses(base | {flap_network(k) for k in range(5)}))
    wait_for(lambda: lan_networks(ns) == expected, 5, 0.05, what=f"after the flaps, {expected}",
             why=lambda: f"the set is {lan_networks(ns)}")  # fmt: skip
    time.sleep(0.2)  # anything still pending would be committed by now
    commits = daemon.commits() - before
    run(["ip", "-n", ns, "addr", "flush", "dev", IF, "to", "10.0.0.0/8"])
    time.sleep(0.1)
    return commits, elapsed * 1000


def measure(changes: int) -> dict[str, Any]:
    with namespace() as ns, tempfile.TemporaryDirectory(prefix=temp_prefix("bench-daemon")) as tmp:
        work = Path(tmp)
        policy = write_policy(work / "policy.toml")
        starts, rss = start_to_ready(ns, policy, work)
        with run_daemon(ns, policy, work / "run") as daemon:
            daemon.wait_ready()
            samples = react(ns, daemon, changes)
            burst_commits, burst_ms = flaps(ns, daemon, spread=None)
            commits, flap_ms = flaps(ns, daemon, spread=1.0)
            rss_after = daemon.rss_mb()
    return {
        "react_addr_ms_p50": round(statistics.median(samples), 2),
        "react_addr_ms_p99": round(percentile(samples, 99), 2),
        "react_addr_changes": len(samples),
        "commits_per_1000_flaps": commits,
        "flaps_duration_ms": round(flap_ms, 1),
        "commits_per_1000_flaps_burst": burst_commits,
        "flaps_burst_duration_ms": round(burst_ms, 1),
        "daemon_rss_mb_alone": round(rss, 1),
        "daemon_rss_mb_after_flaps": round(rss_after, 1),
        "start_to_ready_ms": round(statistics.median(starts), 1),
    }
