"""The man pages render with man -l, without a single groff or man warning."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

MAN = Path(__file__).parents[2] / "man"
PAGES = sorted(MAN.glob("*.[1-8]"))


def test_every_page_is_here() -> None:
    assert [p.name for p in PAGES] == ["tailsfw-policy.5", "tailsfwctl.8", "tailsfwd.8"]


@pytest.mark.skipif(shutil.which("man") is None, reason="man-db is not installed")
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_renders_without_warnings(page: Path) -> None:
    done = subprocess.run(
        ["man", "--warnings", "-l", "-Tutf8", str(page)],
        capture_output=True, text=True, timeout=30, check=False,
        env={**os.environ, "MANROFFSEQ": "", "MANWIDTH": "80"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    name = page.stem.upper()
    assert done.stdout.startswith(f"{name}({page.suffix[1:]})")
