"""Fixtures for the network-namespace lab (see topology.py).

The lab needs root and a few system tools. Without them every test here is
skipped, and the reason, naming what is missing, is shown in the report header
and on each skip (``pytest -rs``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.daemon_fixtures import lab_host_put_back
from tests.lab.dbus_fixtures import unavailable as bus_unavailable
from tests.lab.networkmanager import NetworkManagerLab, extra_link, network_manager
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
TOOLS = ("ip", "nft", "setpriv", "useradd", "userdel", "groupmod", "groupdel", "getent", "sysctl")


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


def nm_unavailable() -> str | None:
    missing = [
        t
        for t in ("NetworkManager", "nmcli", "dnsmasq", "unshare")
        if shutil.which(t, path=COMMAND_PATH) is None
    ]
    return "real NetworkManager skipped: missing " + ", ".join(missing) if missing else None


NM_UNAVAILABLE = bus_unavailable() or nm_unavailable()
# The DNS servers the lab's DHCP server hands out first: addresses the peer
# listens on, so that packets to them can be counted.
LEASED = ("198.51.100.53", "203.0.113.53")


@pytest.fixture(scope="module")
def nm_lab(lab: Lab) -> Iterator[NetworkManagerLab]:
    """A real NetworkManager in the lab host, on an extra link, leasing LEASED."""
    if NM_UNAVAILABLE:
        pytest.skip(NM_UNAVAILABLE)
    with (
        tempfile.TemporaryDirectory(prefix="tfwnm-") as tmp,
        extra_link(lab.host_ns, lab.peer_ns) as link,
        network_manager(lab.host_ns, lab.peer_ns, link, Path(tmp), LEASED) as nm_lab,
    ):
        yield nm_lab


@pytest.fixture(scope="module")
def daemon_host(lab: Lab) -> Iterator[None]:
    """For a module whose tests run tailsfwd in the lab host: afterwards the
    host is put back as the other tests expect it (no ruleset, IPv6 on)."""
    with lab_host_put_back(lab):
        yield
