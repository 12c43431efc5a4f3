"""Per-packet cost of the ruleset, side by side with no ruleset and the floor.

Two lab namespaces joined by a veth; the peer drops everything at
prerouting, so conntrack never sees a reply and every datagram stays NEW and
walks the whole output path. One process of one user sends 16-byte UDP
datagrams as fast as it can (a small C program: the kernel's path is the
measure, not an interpreter's loop). Configurations are measured in turns,
in a rotating order, and the figure is the median of the rounds.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.lab.names import temp_prefix
from tests.lab.policies import CTL, LAB_ROLES, lab_policy
from tests.lab.topology import Lab

HERE = Path(__file__).resolve().parent
SECONDS = 1.0
ROUNDS = 7
FLOOR = """
table ip floor {
    chain output { type filter hook output priority filter; policy accept;
        ct state established accept
        accept
    }
    chain nat_output { type nat hook output priority -100; policy accept; }
}
"""
PEER_DROP = """
table ip benchdrop {
    chain prerouting { type filter hook prerouting priority -300; policy drop; }
}
"""


@dataclass(frozen=True)
class Flow:
    name: str
    user: str
    dst: str
    port: int
    allowed: bool = True


PATHS = (
    Flow("amnesia_lan_udp", "amnesia", "192.168.77.1", 5000),
    Flow("other_lan_udp", "other", "192.168.77.1", 5000),
    Flow("amnesia_internet_udp_reject", "amnesia", "198.51.100.10", 5000, allowed=False),
    Flow("tor_internet_dns", "debian-tor", "198.51.100.10", 53),
)


def build_flooder(directory: Path) -> str:
    binary = directory / "udpflood"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(HERE / "udpflood.c")], check=True)
    os.chmod(directory, 0o755)
    return str(binary)


def sample(rulesets: dict[str, str | None], rounds: int = ROUNDS) -> dict[tuple[str, str], float]:
    """Median datagrams per second of each path under each ruleset.

    A ruleset is an nft script loaded on a flushed host, or None for the
    lab policy loaded by `tailsfwctl apply`.  Rulesets take turns, in an
    order that rotates every round, so that load on the machine hits all.
    """
    with (
        Lab(LAB_ROLES) as lab,
        tempfile.TemporaryDirectory(prefix=temp_prefix("bench-datapath")) as tmp,
    ):
        flooder = build_flooder(Path(tmp))
        policy = lab_policy(lab, Path(tmp) / "policy.toml")
        lab.peer(["nft", "-f", "-"], input=PEER_DROP)
        names = list(rulesets)
        samples: dict[tuple[str, str], list[float]] = {}
        for round_ in range(rounds):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                script = rulesets[name]
                lab.host(["nft", "-f", "-"], input="flush ruleset\n" + (script or ""))
                if script is None:
                    lab.host([*CTL, "apply", "--policy", str(policy)])
                for path in PATHS:
                    # One CPU: the sender and the veth's softirq share it, as
                    # on a laptop, and the scheduler adds no noise.
                    argv = [flooder, path.dst, str(path.port), str(SECONDS)]
                    out = lab.run_as(path.user, ["taskset", "-c", "1", *argv])
                    attempts, _, elapsed = out.stdout.split()
                    samples.setdefault((name, path.name), []).append(int(attempts) / float(elapsed))
    return {key: statistics.median(values) for key, values in samples.items()}


def measure() -> dict[str, float]:
    pps = sample({"none": "", "floor": FLOOR, "tailsfw": None})
    figures: dict[str, float] = {
        "datapath_none_pps": round(pps[("none", PATHS[0].name)]),
        "datapath_floor_pps": round(pps[("floor", PATHS[0].name)]),
    }
    for path in PATHS:
        ours = pps[("tailsfw", path.name)]
        figures[f"datapath_{path.name}_pps"] = round(ours)
        figures[f"datapath_{path.name}_vs_floor"] = round(ours / pps[("floor", path.name)], 3)
        figures[f"datapath_{path.name}_floor_pps"] = round(pps[("floor", path.name)])
    return figures
