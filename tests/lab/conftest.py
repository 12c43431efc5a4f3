"""Fixtures for the network-namespace lab (see topology.py).

The lab needs root and a few system tools. Without them every test here is
skipped, and the reason, naming what is missing, is shown in the report header
and on each skip (``pytest -rs``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.lab.topology import COMMAND_PATH, PYTHON, Lab

LAB_ROLES = [
    "amnesia",
    "root",
    "clearnet",
    "debian-tor",
    "_apt",
    "proxy",
    "nobody",
    "tails-upgrade-frontend",
    "htp",
    "tails-iuk-get-target-file",
    "Debian-gdm",
]
TOOLS = ("ip", "nft", "setpriv", "useradd", "userdel", "groupdel", "getent", "sysctl")


def unavailable() -> str | None:
    """Why the lab cannot run here, or None."""
    problems = []
    if os.geteuid() != 0:
        problems.append(f"not root (euid {os.geteuid()})")
    missing = [tool for tool in TOOLS if shutil.which(tool, path=COMMAND_PATH) is None]
    if not os.access(PYTHON, os.X_OK):
        missing.append(PYTHON)
    if missing:
        problems.append("missing " + ", ".join(missing))
    return "network lab skipped: " + "; ".join(problems) if problems else None


UNAVAILABLE = unavailable()


def pytest_report_header() -> str | None:
    return f"WARNING: {UNAVAILABLE}" if UNAVAILABLE else None


@pytest.fixture(autouse=True)
def _lab_available() -> None:
    if UNAVAILABLE:
        pytest.skip(UNAVAILABLE)


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    if UNAVAILABLE:
        pytest.skip(UNAVAILABLE)
    with Lab(LAB_ROLES) as built:
        yield built
