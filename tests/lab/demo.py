"""`make demo`: the default policy in a lab host, proven by the leak matrix.

Builds the namespace lab, loads the shipped policy (its users mapped to the
lab's test accounts) with `tailsfwctl apply`, sends every user's connection
attempts to every destination class, prints the matrix, and tears down.
Nothing touches this machine's own network namespace.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from tests.lab import matrix
from tests.lab.conftest import LAB_ROLES, UNAVAILABLE
from tests.lab.policies import TAILSFWCTL, lab_policy
from tests.lab.topology import Lab


def main() -> int:
    if UNAVAILABLE:
        print(UNAVAILABLE, file=sys.stderr)
        return 2
    start = time.monotonic()
    with Lab(LAB_ROLES) as lab, tempfile.TemporaryDirectory(prefix="tailsfw-demo") as tmp:
        print(f"lab: host namespace {lab.host_ns}, peer (LAN + Internet) {lab.peer_ns}")
        policy = lab_policy(lab, Path(tmp) / "policy.toml")
        done = lab.host([TAILSFWCTL, "apply", "--policy", str(policy)])
        print(done.stdout.strip())
        print(f"\nleak matrix: {len(matrix.USERS)} users x {len(matrix.DESTINATIONS)} destinations"
              " (open/refused: as the spec says; !!: not as the spec says)\n")  # fmt: skip
        cases = matrix.run(lab)
        print(matrix.table(cases))
    print(f"\n(lab built, proven and removed in {time.monotonic() - start:.1f} s)")
    return 1 if any(c.problem for c in cases) else 0


if __name__ == "__main__":
    sys.exit(main())
