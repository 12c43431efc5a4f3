"""A property-based fuzz of the loader (hypothesis): random structural and
byte-level mutations of the shipped policy.  Whatever the input, tailsfwctl
answers with a ruleset or one line naming the file; never a traceback, never
a hang; every policy it accepts compiles."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tailsfw import cli, summary
from tests import policy_mutants as mutants

SETTINGS = settings(
    max_examples=150,
    deadline=5000,
    derandomize=True,  # the same mutants on every run: a failure is reproducible
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip


def render(data: bytes) -> tuple[int, str, str]:
    """`tailsfwctl render` of these bytes as a policy file: (exit, out, err)."""
    out, err = io.StringIO(), io.StringIO()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "policy.toml"
        path.write_bytes(data)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["render", "--policy", str(path)])
    return code, out.getvalue(), err.getvalue()


def check(data: bytes) -> None:
    code, out, err = render(data)
    lines = err.splitlines()
    assert all(line.startswith("tailsfwctl: ") for line in lines), err
    if code == 0:
        document = json.loads(out)  # compiled, and valid JSON
        assert {"add": {"table": {"family": "ip", "name": "tailsfw"}}} in document["nftables"]
    else:
        assert code == summary.BAD_POLICY
        (error,) = [line for line in lines if "warning" not in line]
        assert "policy.toml: " in error and len(error) < 400, error


@SETTINGS
@given(st.data(), st.integers(1, 4))
def test_structural_mutants(data: st.DataObject, ops: int) -> None:
    tree = mutants.structural(data.draw, mutants.shipped(), ops)
    check(tomli_w.dumps(tree).encode())


@SETTINGS
@given(st.data(), st.integers(1, 3))
def test_byte_level_mutants(data: st.DataObject, ops: int) -> None:
    check(mutants.byte_level(data.draw, mutants.SHIPPED.read_bytes(), ops))


@SETTINGS
@given(st.data())
def test_semantic_mutants(data: st.DataObject) -> None:
    check(tomli_w.dumps(mutants.semantic(data.draw, mutants.shipped())).encode())
