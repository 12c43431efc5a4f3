"""The one reporter: during a storm of interface changes at most one status
every PUBLISH_INTERVAL, the last change always published; the kernel asked
away from the loop, its answer published when it changes; a heartbeat
rewrites status.json when nothing changes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from tailsfw.report import PUBLISH_INTERVAL
from tests.unit.daemon_fakes import Rig, drive, links, rig

CHECK = 0.1  # the kernel asked this often for the status (enforce.KERNEL_CHECK)


def written(r: Rig) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((r.daemon.settings.state_dir / "status.json").read_text())
    return data


def test_a_storm_publishes_a_few_statuses_and_the_last_state(tmp_path: Path) -> None:
    r = rig(tmp_path, links("192.168.1.2/24"))
    storm = [
        links("192.168.1.2/24", names=("lo", "eth0", *(f"if{k}" for k in range(i))))
        for i in range(1, 101)
    ]
    elapsed = 0.0

    async def scenario() -> None:
        nonlocal elapsed
        start = asyncio.get_running_loop().time()
        for event in storm:  # 100 interface changes, 2 ms apart
            await r.feed(event, settle=0.002)
        await asyncio.sleep(2 * PUBLISH_INTERVAL)
        elapsed = asyncio.get_running_loop().time() - start

    drive(r, scenario)
    statuses = [m for m in r.notify.messages if "STATUS" in m][1:]  # after READY
    assert 1 <= len(statuses) <= elapsed / PUBLISH_INTERVAL + 3, len(statuses)
    assert len(written(r)["interfaces"]) == 102  # lo, eth0 and the storm's 100


def test_the_kernel_asked_off_the_loop_and_its_answer_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tailsfw.enforce.KERNEL_CHECK", CHECK)
    asked: list[float] = []
    r: Rig

    async def list_ruleset() -> list[dict[str, Any]]:
        asked.append(asyncio.get_running_loop().time())
        await asyncio.sleep(0.05)  # the child process takes its time; the loop does not
        return r.kernel.list_ruleset()

    r = rig(tmp_path, links("192.168.1.2/24"), list_ruleset=list_ruleset)

    async def scenario() -> None:
        assert r.control.status().state == "enforcing" and not asked  # we just replaced it
        r.kernel.tamper(
            {"flush": {"chain": {"family": "ip", "table": "tailsfw", "name": "output"}}}
        )
        await asyncio.sleep(CHECK)
        before = asyncio.get_running_loop().time()
        assert r.control.status().state == "enforcing"  # not known yet: asked now
        assert asyncio.get_running_loop().time() - before < 0.01
        await asyncio.sleep(0.1 + PUBLISH_INTERVAL)
        assert len(asked) == 1

    drive(r, scenario)
    data = written(r)
    assert data["state"] == "tampered" and data["kernel_differences"], data


def test_the_heartbeat_rewrites_the_status_when_nothing_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tailsfw.report.HEARTBEAT", 0.05)
    monkeypatch.setattr("tailsfw.report.POLL", 0.01)
    r = rig(tmp_path, links("192.168.1.2/24"))
    times: list[float] = []

    async def scenario() -> None:
        for _ in range(4):
            times.append(written(r)["updated"])
            await asyncio.sleep(0.06)

    drive(r, scenario)
    assert times == sorted(set(times)), times  # a new write time each heartbeat
