"""Fixtures for the network-namespace lab (see topology.py); the parts
themselves live in library modules (the demo and the benches use them too).

The lab needs root and a few system tools. Without them every test here is
skipped, and the reason, naming what is missing, is shown in the report header
and on each skip (``pytest -rs``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.kernel import lab_host_put_back
from tests.lab.names import temp_prefix
from tests.lab.networkmanager import (
    LEASED,
    NM_UNAVAILABLE,
    NetworkManagerLab,
    extra_link,
    network_manager,
)
from tests.lab.policies import LAB_ROLES
from tests.lab.topology import UNAVAILABLE, Lab


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


@pytest.fixture(scope="module")
def nm_lab(lab: Lab) -> Iterator[NetworkManagerLab]:
    """A real NetworkManager in the lab host, on an extra link, leasing LEASED."""
    if NM_UNAVAILABLE:
        pytest.skip(NM_UNAVAILABLE)
    with (
        tempfile.TemporaryDirectory(prefix=temp_prefix("nm")) as tmp,
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
