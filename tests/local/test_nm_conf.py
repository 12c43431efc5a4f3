"""The shipped NetworkManager drop-in, as NetworkManager itself reads it.

`NetworkManager --print-config` parses and merges the configuration and
exits: it starts nothing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CONF_DIR = Path(__file__).resolve().parents[2] / "etc" / "NetworkManager" / "conf.d"


@pytest.mark.skipif(shutil.which("NetworkManager", path="/usr/sbin:/usr/bin") is None,
                    reason="NetworkManager is not installed")  # fmt: skip
def test_networkmanager_never_manages_resolv_conf(tmp_path: Path) -> None:
    (tmp_path / "NetworkManager.conf").write_text("[main]\ndns=default\nrc-manager=symlink\n")
    (tmp_path / "lib").mkdir()
    done = subprocess.run(
        ["/usr/sbin/NetworkManager", "--print-config",
         f"--config={tmp_path / 'NetworkManager.conf'}", f"--config-dir={CONF_DIR}",
         f"--system-config-dir={tmp_path / 'lib'}"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    main = done.stdout.split("[main]", 1)[1].split("\n[", 1)[0].splitlines()
    assert "dns=none" in main and "rc-manager=unmanaged" in main
