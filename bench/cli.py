"""Inside a lab namespace: tailsfwctl as whole processes, against a bare interpreter.

Run by bench/run.py as `ip netns exec HOST python -m bench.cli POLICY`; prints
one JSON object of figures.  Each round runs every command once, in turn, so
that the machine's load falls on all of them alike; figures are medians.
`status` runs as root with no daemon (no bus, no status file): it compiles
the policy and compares the kernel's tables with it.  tailsfw is byte-compiled
first, as an installed package is (this environment may set
PYTHONDONTWRITEBYTECODE, which would make every start compile the sources).
"""

from __future__ import annotations

import compileall
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROUNDS = 30
REPO = Path(__file__).resolve().parents[1]


def commands(policy: str) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "tailsfw.cli"]
    return {
        "python_start_ms": [sys.executable, "-c", "pass"],
        "cli_help_ms": [*cli, "--help"],
        "cli_apply_ms": [*cli, "apply", "--policy", policy],
        "cli_status_ms": [
            *cli, "status", "--policy", policy, "--bus", "unix:path=/nonexistent",
            "--state-file", "/nonexistent/status.json",
        ],
    }  # fmt: skip


def run_ms(argv: list[str], ok: tuple[int, ...]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, capture_output=True, check=False)
    elapsed = (time.perf_counter() - started) * 1000
    if done.returncode not in ok:
        raise RuntimeError(f"{argv}: exit {done.returncode}: {done.stderr.decode()}")
    return elapsed


def measure(policy: str, rounds: int = ROUNDS) -> dict[str, float]:
    compileall.compile_dir(REPO / "tailsfw", quiet=1)
    runs = commands(policy)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for argv in runs.values():  # warm the page cache, and load the ruleset once
        run_ms(argv, (0,))
    for _ in range(rounds):
        for name, argv in runs.items():
            times[name].append(run_ms(argv, (0,)))
    figures = {name: round(statistics.median(t), 1) for name, t in times.items()}
    start = figures["python_start_ms"]
    for name in ("cli_help_ms", "cli_apply_ms", "cli_status_ms"):
        figures[name.removesuffix("_ms") + "_vs_python"] = round(figures[name] / start, 2)
    return figures


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1])))
