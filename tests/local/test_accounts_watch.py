"""AccountsSource on a passwd in a temp directory, with real inotify (no root).

The file is replaced by rename, as useradd and adduser do (tests/lab runs
the real useradd); the uids must follow within 100 ms.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from tailsfw.accounts import AccountsSource
from tailsfw.events import AccountsChanged

ROOT = "root:x:0:0:root:/root:/bin/bash\n"
AMNESIA = "amnesia:x:1000:1000::/home/amnesia:/bin/bash\n"
CLEARNET = "clearnet:x:116:125::/nonexistent:/usr/sbin/nologin\n"
TARGET_MS = 100.0


def replace(passwd: Path, text: str) -> None:
    new = passwd.with_name("passwd+")
    new.write_text(text)
    os.replace(new, passwd)


class Changes:
    """The source's events, awaited with a timeout without cancelling the source."""

    def __init__(self, source: AccountsSource) -> None:
        self.events = source.events()
        self.pending: asyncio.Future[AccountsChanged] | None = None

    async def next(self, timeout: float = 1.0) -> dict[str, int]:
        if self.pending is None:
            self.pending = asyncio.ensure_future(anext(self.events))
        done, _ = await asyncio.wait({self.pending}, timeout=timeout)
        if not done:
            raise TimeoutError(f"no change within {timeout} s")
        event, self.pending = self.pending.result(), None
        return dict(event.uids)

    async def quiet(self, seconds: float = 0.2) -> bool:
        try:
            await self.next(seconds)
        except TimeoutError:
            return True
        return False


@pytest.fixture
def passwd(tmp_path: Path) -> Path:
    path = tmp_path / "passwd"
    path.write_text(ROOT + CLEARNET)
    return path


def test_whole_state_first_then_each_change(passwd: Path) -> None:
    async def run() -> list[float]:
        changes = Changes(AccountsSource(passwd))
        assert await changes.next() == {"root": 0, "clearnet": 116}
        times = []
        for text, expected in (
            (ROOT + CLEARNET + AMNESIA, {"root": 0, "clearnet": 116, "amnesia": 1000}),
            (ROOT + AMNESIA, {"root": 0, "amnesia": 1000}),
            (ROOT + AMNESIA.replace("1000", "1001"), {"root": 0, "amnesia": 1001}),
        ):
            start = time.monotonic()
            replace(passwd, text)
            assert await changes.next() == expected
            times.append((time.monotonic() - start) * 1000)
        return times

    times = asyncio.run(run())
    assert max(times) < TARGET_MS, times


def test_changes_to_other_files_or_that_change_nothing_are_not_reported(passwd: Path) -> None:
    async def run() -> None:
        changes = Changes(AccountsSource(passwd))
        await changes.next()
        replace(passwd, "# a comment\n" + ROOT + CLEARNET)  # the same accounts
        (passwd.parent / "group").write_text("root:x:0:\n")
        assert await changes.quiet()
        with passwd.open("a") as f:  # an edit in place is seen too
            f.write(AMNESIA)
        assert await changes.next() == {"root": 0, "clearnet": 116, "amnesia": 1000}

    asyncio.run(run())


def test_deleted_means_no_accounts_until_it_is_back(passwd: Path) -> None:
    async def run() -> None:
        changes = Changes(AccountsSource(passwd))
        await changes.next()
        passwd.unlink()
        assert await changes.next() == {}
        replace(passwd, ROOT + CLEARNET)
        assert await changes.next() == {"root": 0, "clearnet": 116}

    asyncio.run(run())


def test_a_fifo_in_its_place_neither_hangs_nor_changes_the_uids(passwd: Path) -> None:
    async def run() -> AccountsSource:
        source = AccountsSource(passwd)
        changes = Changes(source)
        await changes.next()
        fifo = passwd.with_name("fifo")
        os.mkfifo(fifo)
        os.replace(fifo, passwd)
        assert await changes.quiet()  # the last uids stay; the error is kept
        assert "not a regular file" in source.last_error
        replace(passwd, ROOT + AMNESIA)
        assert await changes.next() == {"root": 0, "amnesia": 1000}
        assert source.last_error == ""
        return source

    asyncio.run(run())
