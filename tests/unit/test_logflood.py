"""The log flood filter: a few messages of a kind, then one summary."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from tailsfw.logflood import RateLimit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, Lines, Clock]]:
    clock = Clock()
    lines = Lines()
    lines.addFilter(RateLimit(burst=3, window=10.0, clock=clock))
    log = logging.getLogger("tailsfw.test_logflood")
    log.addHandler(lines)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    try:
        yield log, lines, clock
    finally:
        log.removeHandler(lines)


def test_a_flood_of_one_kind_becomes_a_few_lines_and_a_summary(
    logged: tuple[logging.Logger, Lines, Clock],
) -> None:
    log, lines, clock = logged
    for i in range(1000):
        log.warning("%s was changed by another process: rewrote it", f"/etc/f{i}")
    log.error("another kind: %d", 1)  # other kinds are not held back
    assert len(lines.lines) == 4
    clock.now += 10
    log.warning("%s was changed by another process: rewrote it", "/etc/g")
    assert lines.lines[4] == (
        "997 more messages like '%s was changed by another process: rewrote it'"
        " left out (over 3 in 10 s)"
    )
    assert lines.lines[5] == "/etc/g was changed by another process: rewrote it"


def test_debug_is_never_held_back(logged: tuple[logging.Logger, Lines, Clock]) -> None:
    log, lines, _ = logged
    for _ in range(50):
        log.debug("commit")
    assert len(lines.lines) == 50


def test_the_summary_comes_on_its_own_when_a_loop_runs() -> None:
    lines = Lines()
    lines.addFilter(RateLimit(burst=1, window=0.05))
    log = logging.getLogger("tailsfw.test_logflood.loop")
    log.addHandler(lines)
    log.propagate = False

    async def flood() -> None:
        for _ in range(10):
            log.warning("flood")
        await asyncio.sleep(0.2)

    try:
        asyncio.run(flood())
    finally:
        log.removeHandler(lines)
    assert lines.lines == ["flood", "9 more messages like 'flood' left out (over 1 in 0.05 s)"]
