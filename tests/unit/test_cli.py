"""tailsfwctl without a kernel: render, and the errors a person sees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tailsfw import cli

REPO = Path(__file__).parents[2]
DEFAULT = REPO / "etc" / "tailsfw" / "policy.toml"


def test_render_json_prints_the_document(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["render", "--policy", str(DEFAULT)]) == 0
    out = capsys.readouterr()
    document = json.loads(out.out)
    assert document["nftables"][0] == {"metainfo": {"json_schema_version": 1}}
    assert {"add": {"table": {"family": "ip", "name": "tailsfw"}}} in document["nftables"]


def test_a_broken_policy_is_named_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "policy.toml"
    bad.write_text(DEFAULT.read_text().replace("group = 0", "group = -1"))
    # render, never apply: a unit test must not reach this machine's kernel.
    assert cli.main(["render", "--policy", str(bad)]) == 6
    err = capsys.readouterr().err
    assert f"{bad}: log.group: -1 is out of range" in err
    assert "the ruleset in force is unchanged" in err


def test_a_missing_policy_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["render", "--policy", str(tmp_path / "none.toml")]) == 6
    assert "none.toml: cannot read the policy" in capsys.readouterr().err


def tailsfwctl(*argv: str) -> subprocess.CompletedProcess[str]:
    """tailsfwctl as a process of its own, into pipes (stdout block-buffered,
    as it is unless PYTHONUNBUFFERED says otherwise)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.run(
        [sys.executable, "-m", "tailsfw.cli", *argv],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_the_process_exits_at_once_with_its_output_and_status(tmp_path: Path) -> None:
    """`run()` skips the interpreter's teardown: all of the output still
    arrives, on both streams, and the exit status is main()'s."""
    done = tailsfwctl("render", "--policy", str(DEFAULT))
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("}\n")  # print()'s last write, left in the buffer
    assert json.loads(done.stdout)["nftables"][0] == {"metainfo": {"json_schema_version": 1}}
    assert "tailsfwctl: warning: user 'clearnet'" in done.stderr
    done = tailsfwctl("render", "--policy", str(tmp_path / "none.toml"))
    assert (done.returncode, done.stdout) == (6, "")
    assert "none.toml: cannot read the policy" in done.stderr
