"""The leftover clean-up's rule: what a dead process made is a leftover,
what a live one (another lab, bench or test in parallel) made is not."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.lab.leftovers import left_behind
from tests.lab.names import (
    LAB_NS,
    NAMESPACE_PREFIXES,
    SCRATCH_NS,
    TEMP_PREFIX,
    owned_name,
    owner,
    temp_prefix,
)


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(done.stdout)


def test_a_name_says_which_process_made_it() -> None:
    name = owned_name(SCRATCH_NS)
    assert name.startswith(f"{SCRATCH_NS}-")
    assert owner(name, SCRATCH_NS) == os.getpid()
    assert owner(f"{temp_prefix('tor')}x1y2z3", TEMP_PREFIX) == os.getpid()
    assert owner("tfwnm-ab12cd", SCRATCH_NS) is None  # made before names carried a pid


def test_only_what_a_dead_process_made_is_left_behind() -> None:
    dead = dead_pid()
    for prefix in NAMESPACE_PREFIXES:
        assert left_behind(f"{prefix}-{dead}-abcdef", NAMESPACE_PREFIXES)
        assert not left_behind(owned_name(prefix), NAMESPACE_PREFIXES)
    assert left_behind(f"{TEMP_PREFIX}-{dead}-bench-k3j4", (TEMP_PREFIX, LAB_NS))
    assert not left_behind(f"{temp_prefix('bench')}k3j4", (TEMP_PREFIX, LAB_NS))


def test_a_name_without_owner_is_a_leftover_only_under_the_locked_prefix() -> None:
    # Only a lab holding the lock (the one cleaning up) ever made tfwlab-*.
    assert left_behind(f"{LAB_NS}-ab12cd-host", NAMESPACE_PREFIXES)
    assert left_behind(f"{LAB_NS}-scripts-x1y2", (TEMP_PREFIX, LAB_NS))
    assert not left_behind(f"{SCRATCH_NS}-ab12cd", NAMESPACE_PREFIXES)
    assert not left_behind("tfwother-1-ab", NAMESPACE_PREFIXES)
    assert not left_behind("netns-of-someone-else", NAMESPACE_PREFIXES)
