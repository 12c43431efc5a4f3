"""Test policies: the shipped policy, its users mapped to the lab's accounts."""

from __future__ import annotations

import json
import subprocess
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w

from tests.lab.command import REPO, VENV_PYTHON

if TYPE_CHECKING:
    from tests.lab.topology import Lab

# The account names the shipped policy uses: each is a Lab role.
LAB_ROLES = [
    "amnesia",
    "root",
    "clearnet",
    "debian-tor",
    "_apt",
    "proxy",
    "nobody",
    "tails-upgrade-frontend",
    "htp",
    "tails-iuk-get-target-file",
    "Debian-gdm",
]
REFUSE_CHAIN = "refuse"  # tailsfw.compiler.REFUSE: counts, logs, rejects

DEFAULT_POLICY = REPO / "etc" / "tailsfw" / "policy.toml"
# tailsfwctl as this checkout's code: the venv's script imports whichever
# checkout the shared venv was installed from (run from the repository root).
CTL = [VENV_PYTHON, "-m", "tailsfw.cli"]

Edit = Callable[[dict[str, Any]], None]


def write_lab_policy(accounts: Mapping[str, str], path: Path, edit: Edit | None = None) -> Path:
    """Write the default policy with each user's account replaced by the lab's.

    `accounts` maps a policy user key to the lab account that plays it;
    `edit` may change the decoded policy further (a broken policy, a
    missing user...) before it is written.
    """
    with DEFAULT_POLICY.open("rb") as f:
        data = tomllib.load(f)
    for key, user in data["users"].items():
        user["account"] = accounts[key]
    if edit is not None:
        edit(data)
    path.write_text(tomli_w.dumps(data))
    return path


def lab_policy(lab: Lab, path: Path, edit: Edit | None = None) -> Path:
    """The shipped policy, played by the lab's accounts."""
    return write_lab_policy({role: lab.accounts[role].name for role in lab.roles}, path, edit)


def apply(lab: Lab, policy: Path) -> subprocess.CompletedProcess[str]:
    """`tailsfwctl apply` in the lab host; never raises (callers check)."""
    return subprocess.run(
        ["ip", "netns", "exec", lab.host_ns, *CTL, "apply", "--policy", str(policy)],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
    )  # fmt: skip


def refused_packets(lab: Lab) -> int:
    """The kernel's own count of refused packets: the `refuse` chains' counters."""
    total = 0
    for family in ("ip", "ip6"):
        listing = lab.host(["nft", "-j", "list", "chain", family, "tailsfw", REFUSE_CHAIN])
        for item in json.loads(listing.stdout)["nftables"]:
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    total += int(expr["counter"]["packets"])
    return total
