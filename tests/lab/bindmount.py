"""Run inside `unshare -m --propagation private` (root): does a bind mount of
the clearnet file follow its updates?

Everything happens under the directory given as argument: the clearnet file
is written, bind-mounted over another file (as Tails mounts it over the
resolv.conf of the programs allowed clearnet DNS), updated by
`ResolvFiles.converge`, and read through the mount.  A write through the
mount (a program editing its resolv.conf) must be noticed and undone by the
restore loop, and the time is measured.  Then, as a control, the
file is replaced by rename, the way an atomic writer would: the mount must
then show the old text, which proves the check can tell the two apart.
Prints one JSON object; the mounts vanish with the namespace.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

from tailsfw.resolv import ResolvFiles, render_clearnet, resolv_texts
from tests.files import SERVERS, restore_loop, time_until

BEFORE = (ipaddress.IPv4Address("172.16.0.53"),)
AFTER = SERVERS
RENAMED = "nameserver 203.0.113.53\n"


def main(work: Path) -> dict[str, object]:
    etc = work / "etc"
    etc.mkdir()
    files = ResolvFiles(etc / "resolv.conf", etc / "resolv-over-clearnet.conf")
    files.rewrite(resolv_texts(BEFORE))
    mounted = work / "program-resolv.conf"  # another program's /etc/resolv.conf
    mounted.write_text("")
    subprocess.run(["mount", "--bind", str(files.clearnet_conf), str(mounted)], check=True)
    rewritten = files.rewrite(resolv_texts(AFTER))
    seen_after_update = mounted.read_text()
    with restore_loop(etc):
        with mounted.open("a") as f:
            f.write(RENAMED)
        restore_ms = time_until(lambda: mounted.read_text() == render_clearnet(AFTER))
    new = etc / "renamed"
    new.write_text(RENAMED)
    os.replace(new, files.clearnet_conf)
    return {
        "rewritten": rewritten,
        "expected": render_clearnet(AFTER),
        "seen_after_update": seen_after_update,
        "restore_through_mount_ms": restore_ms,
        "seen_after_rename": mounted.read_text(),
        "file_after_rename": files.clearnet_conf.read_text(),
    }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
