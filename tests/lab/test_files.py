"""The kept files with real parts that need root: a bind mount in a private
mount namespace, and the real useradd replacing a passwd.

Everything lives in temp directories: this machine's /etc is never touched.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import subprocess
import time
from pathlib import Path

from tailsfw.accounts import AccountsSource
from tests.files import holds, kept, restore_loop, time_until
from tests.lab.command import REPO, VENV_PYTHON
from tests.lab.names import USER_PREFIX

TARGET_MS = 100.0


def test_a_bind_mount_of_the_clearnet_file_sees_its_updates(tmp_path: Path) -> None:
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private",
         VENV_PYTHON, "-m", "tests.lab.bindmount", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    seen = json.loads(done.stdout)
    assert seen["seen_after_update"] == seen["expected"]
    assert seen["rewritten"] == [str(tmp_path / "etc" / "resolv-over-clearnet.conf")]
    # A program writing its resolv.conf (the mount) is noticed and undone.
    assert seen["restore_through_mount_ms"] < TARGET_MS
    # The control: a file replaced by rename is not what the mount shows.
    assert seen["file_after_rename"] != seen["expected"]
    assert seen["seen_after_rename"] == seen["expected"]


def prefix_root(tmp_path: Path) -> Path:
    """A root for `useradd --prefix`: its own etc/passwd, group, shadow, gshadow."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (etc / "group").write_text("root:x:0:\n")
    for name, text in (("shadow", "root:*:19000:0:99999:7:::\n"), ("gshadow", "root:*::\n")):
        (etc / name).write_text(text)
        (etc / name).chmod(0o600)
    return tmp_path


def test_accounts_follow_the_real_useradd_and_userdel(tmp_path: Path) -> None:
    root = prefix_root(tmp_path)
    account = f"{USER_PREFIX}acct"

    passwd = root / "etc" / "passwd"

    def tool(*argv: str) -> None:
        subprocess.run([*argv, "--prefix", str(root), account], check=True, capture_output=True)

    async def change(*argv: str) -> tuple[dict[str, int], float]:
        """The uids reported after the tool's change, and how long after the
        rename that made it (the new file's ctime; the clock is coarse, ~4 ms)."""
        running = asyncio.ensure_future(asyncio.to_thread(tool, *argv))
        uids = dict((await asyncio.wait_for(anext(events), 5)).uids)
        ms = (time.time() - passwd.stat().st_ctime) * 1000
        await running
        return uids, ms

    events = AccountsSource(passwd).events()

    async def run() -> list[float]:
        assert account not in (await anext(events)).uids  # the whole database: not yet
        added, added_ms = await change("useradd", "-M", "-N", "-g", "0", "-u", "4242")
        assert added[account] == 4242
        removed, removed_ms = await change("userdel")
        assert account not in removed
        return [added_ms, removed_ms]

    times = asyncio.run(run())
    assert max(times) < TARGET_MS, times
    assert account not in Path("/etc/passwd").read_text()


def test_a_chown_is_undone_within_100ms(tmp_path: Path) -> None:
    """Whoever owns a kept file could rewrite it: the owner is put back (root)."""
    nobody = pwd.getpwnam("nobody")
    with restore_loop(tmp_path) as loop:
        for path, text in kept(tmp_path).items():
            time_until(lambda: holds(path, text))  # noqa: B023
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
            ms = time_until(lambda: path.stat().st_uid == 0 and path.stat().st_gid == 0)  # noqa: B023
            assert ms < TARGET_MS
            assert holds(path, text)
        assert not loop.errors
