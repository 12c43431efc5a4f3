"""The shipped policy with fixed accounts, for the tests of `prove` and the oracle.

Fixed uids, so that the tests do not depend on this machine's accounts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tailsfw import compiler, oracle, policy
from tailsfw.facts import Facts

SHIPPED = Path(__file__).resolve().parents[1] / "etc" / "tailsfw" / "policy.toml"
ACCOUNTS = {"root": 0, "amnesia": 1000, "clearnet": 120, "debian-tor": 121, "_apt": 42,
            "proxy": 13, "nobody": 65534, "htp": 122, "Debian-gdm": 123}  # fmt: skip


def shipped() -> tuple[dict[str, Any], oracle.World]:
    """The shipped policy's compiled document, and the oracle's world for it."""
    pol = policy.load(SHIPPED)
    document = compiler.compile_policy(pol, Facts(uids=ACCOUNTS)).document()
    return document, oracle.World(pol, oracle.user_uids(pol, ACCOUNTS))
