"""A NUL byte in a passwd line, against the real glibc (`getent passwd` with a
passwd of the test's bind-mounted over /etc/passwd in a private user and mount
namespace: no root needed, nothing of this machine changed).

glibc 2.36 cuts the line at the NUL: what is left is used when it still is an
entry, and skipped otherwise, so that a later line of the same name decides.
Ours counts the account absent whenever its first line holds a NUL: never a
uid that glibc would not give (the name itself cut by a NUL is another name,
for both).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tailsfw.accounts import parse_passwd

NAME = "tfwnul"
FIRST = f"{NAME}:x:4242:4243:gecos:/nonexistent:/usr/sbin/nologin".encode()
LATER = f"{NAME}:x:0:0::/root:/bin/sh\n".encode()  # what a skipped first line would give
ROOT = b"root:x:0:0:root:/root:/bin/bash\n"


def glibc_uid(passwd: Path) -> int | None:
    script = f'mount --bind "{passwd}" /etc/passwd && exec getent passwd {NAME}'
    done = subprocess.run(
        ["unshare", "--map-root-user", "--mount", "sh", "-c", script],
        capture_output=True, text=True, timeout=10, check=False,
    )  # fmt: skip
    if done.returncode == 2:  # getent: not found
        return None
    if done.returncode != 0:
        pytest.skip(f"no private user and mount namespace here: {done.stderr.strip()}")
    return int(done.stdout.split(":")[2])


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_a_nul_anywhere_never_gives_a_uid_glibc_would_not(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    seen: dict[str, int] = {}
    for at in range(len(FIRST) + 1):
        data = ROOT + FIRST[:at] + b"\0" + FIRST[at:] + b"\n" + LATER
        passwd.write_bytes(data)
        system = glibc_uid(passwd)
        ours = parse_passwd(data).get(NAME)
        assert ours is None or ours == system, (at, ours, system)
        seen[f"glibc {system}"] = seen.get(f"glibc {system}", 0) + 1
    # glibc both used cut lines (4242) and skipped them for the later line (0).
    assert {"glibc 4242", "glibc 0"} <= set(seen), seen
