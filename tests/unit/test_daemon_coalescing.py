"""The coalescer: when a burst of changes is committed, from times alone."""

from __future__ import annotations

import pytest

from tailsfw.coalesce import MAX_DELAY, QUIET, Coalescer


def run(
    coalescer: Coalescer, changes: list[float], end: float, step: float = 0.0005
) -> list[float]:
    """Simulates the loop: changes at the given times; returns the commit times."""
    commits: list[float] = []
    pending = sorted(changes)
    now = 0.0
    while now <= end:
        while pending and pending[0] <= now:
            coalescer.change(pending.pop(0))
        if coalescer.take(now):
            commits.append(now)
        now = round(now + step, 6)
    return commits


def test_idle_is_never_due() -> None:
    c = Coalescer(QUIET, MAX_DELAY)
    assert c.due() is None
    assert not c.take(100.0)


def test_one_change_is_committed_after_the_quiet_time() -> None:
    c = Coalescer(QUIET, MAX_DELAY)
    c.change(1.0)
    assert c.due() == pytest.approx(1.0 + QUIET)
    assert not c.take(1.0 + QUIET - 0.0001)
    assert c.take(1.0 + QUIET)
    assert c.due() is None  # idle again


def test_a_burst_is_one_commit() -> None:
    c = Coalescer(QUIET, MAX_DELAY)
    burst = [0.010 + i * 0.0001 for i in range(10)]  # 10 changes in 1 ms
    commits = run(c, burst, end=0.1)
    assert commits == [pytest.approx(0.0109 + QUIET, abs=0.0006)]


def test_a_storm_is_committed_at_least_every_max_delay() -> None:
    c = Coalescer(QUIET, MAX_DELAY)
    storm = [i * 0.001 for i in range(1000)]  # 1,000 changes in one second
    commits = run(c, storm, end=1.1)
    # Bounded: about one commit per max_delay, not one per change ...
    assert 0.8 / MAX_DELAY <= len(commits) <= 1.0 / MAX_DELAY + 1
    # ... and no change waits longer than max_delay (plus one step of the loop).
    for t in storm:
        assert min(c for c in commits if c >= t) - t <= MAX_DELAY + 0.0005 + 1e-9
    # The last change is committed once the storm is over.
    assert commits[-1] == pytest.approx(0.999 + QUIET, abs=0.0006)


def test_due_never_moves_earlier() -> None:
    """The daemon's timer relies on it: it sleeps to the due time, then looks again."""
    c = Coalescer(QUIET, MAX_DELAY)
    previous = 0.0
    for i in range(100):
        c.change(i * 0.0015)
        due = c.due()
        assert due is not None and due >= previous
        previous = due
