"""`make bench`: every benchmark, printed as a table and saved to bench/results.json.

Each part builds its own namespaces and removes them; figures are medians
(or percentiles) measured side by side in one run.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import daemon, datapath, droplog, full, netns, nm, resolv, storm, tamper
from bench import policy as policy_load
from tests.lab.names import temp_prefix
from tests.lab.policies import LAB_ROLES, lab_policy
from tests.lab.topology import UNAVAILABLE, Lab

RESULTS = Path(__file__).resolve().parent / "results.json"
VENV_PYTHON = sys.executable
# (limit, True when the figure must stay at or below it)
TARGETS: dict[str, tuple[float, bool]] = {
    "apply_full_vs_nft_json": (1.5, True),
    "react_addr_ms_p99": (20.0, True),
    "daemon_rss_mb": (45.0, True),  # with everything running (bench/full.py)
    "dns_update_ms_p99": (20.0, True),
    "storm_2000_settle_ms": (1000.0, True),
    "tamper_restore_ms_p99": (50.0, True),
    "start_to_ready_ms": (500.0, True),
    "resolv_restore_ms_p99": (100.0, True),
    "accounts_update_ms_p99": (100.0, True),
    "nm_event_ms_p99": (20.0, True),
    "drop_log_pps": (20000.0, False),
    "drop_to_journal_ms_p99": (50.0, True),
    # Noticing leaves most of the 50 ms restore budget to the re-apply.
    "tamper_event_ms_p99": (10.0, True),
    "policy_load_10k_ms": (1000.0, True),
    # From `ip netns add` to the guest's and the host's settings in force (bench/netns.py).
    "netns_ready_ms_p99": (50.0, True),
    # From another process's flush of a guest's ruleset to the ruleset back whole.
    "guest_restore_ms_p99": (50.0, True),
    # tailsfwctl as whole processes, against the bare interpreter (bench/cli.py).
    "cli_apply_vs_python": (3.5, True),
    "cli_status_vs_python": (3.5, True),
    "cli_help_vs_python": (2.0, True),
    **{f"datapath_{p.name}_vs_floor": (0.97, False) for p in datapath.PATHS if p.allowed},
}


def in_lab_host(module: str) -> dict[str, Any]:
    """bench/MODULE.py, run as root inside a lab host namespace with the lab's policy."""
    with Lab(LAB_ROLES) as lab, tempfile.TemporaryDirectory(prefix=temp_prefix("bench")) as tmp:
        policy = lab_policy(lab, Path(tmp) / "policy.toml")
        done = lab.host([VENV_PYTHON, "-m", module, str(policy)], timeout=300)
        figures: dict[str, Any] = json.loads(done.stdout)
        return figures


def apply_figures() -> dict[str, Any]:
    return in_lab_host("bench.apply")


def cli_figures() -> dict[str, Any]:
    return in_lab_host("bench.cli")


def row(key: str, value: Any) -> str:
    target = TARGETS.get(key)
    mark = ""
    if target is not None:
        limit, at_most = target
        ok = value <= limit if at_most else value >= limit
        mark = f"{'<=' if at_most else '>='} {limit:g} {'ok' if ok else 'MISSED'}"
    return f"{key:<44} {value:>12}  {mark}"


def main() -> int:
    if UNAVAILABLE:
        print(UNAVAILABLE, file=sys.stderr)
        return 2
    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    parts: list[Callable[[], dict[str, Any]]] = [
        apply_figures,
        cli_figures,
        policy_load.measure,
        datapath.measure,
        lambda: daemon.measure(300),
        resolv.measure,
        nm.measure,
        droplog.measure,
        tamper.measure,
        netns.measure,
        storm.measure,
        full.measure,
    ]
    for part in parts:
        results.update(part())
        RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print("\n".join(row(k, results[k]) for k in sorted(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
