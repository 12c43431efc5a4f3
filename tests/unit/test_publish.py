"""The status during a storm of interface changes: published at most every
PUBLISH_INTERVAL, and the last change always published; the kernel asked
away from the loop, its answer published when it changes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from tailsfw.daemon import KERNEL_CHECK, PUBLISH_INTERVAL
from tests.unit.daemon_fakes import Rig, links, rig


def test_a_storm_publishes_a_few_statuses_and_the_last_state(tmp_path: Path) -> None:
    r = rig(tmp_path, links("192.168.1.2/24"))
    storm = [
        links("192.168.1.2/24", names=("lo", "eth0", *(f"if{k}" for k in range(i))))
        for i in range(1, 101)
    ]

    async def main() -> float:
        while not r.netlink.queue.empty():
            r.daemon._events.put_nowait(r.netlink.queue.get_nowait())
        await r.daemon.start()
        r.daemon.publish(READY="1")
        start = asyncio.get_running_loop().time()
        for event in storm:  # 100 interface changes, 2 ms apart
            r.daemon.handle(event)
            await asyncio.sleep(0.002)
        await asyncio.sleep(2 * PUBLISH_INTERVAL)
        return asyncio.get_running_loop().time() - start

    elapsed = asyncio.run(main())
    statuses = [m for m in r.notify.messages if "STATUS" in m][1:]  # after READY
    assert 1 <= len(statuses) <= elapsed / PUBLISH_INTERVAL + 2, len(statuses)
    written = json.loads((tmp_path / "state" / "status.json").read_text())
    assert len(written["interfaces"]) == 102  # lo, eth0 and the storm's 100


def test_the_kernel_asked_off_the_loop_and_its_answer_published(tmp_path: Path) -> None:
    asked: list[float] = []
    r: Rig

    async def list_ruleset() -> list[dict[str, Any]]:
        asked.append(asyncio.get_running_loop().time())
        await asyncio.sleep(0.05)  # the child process takes its time; the loop does not
        return r.kernel.list_ruleset()

    r = rig(tmp_path, links("192.168.1.2/24"), list_ruleset=list_ruleset)

    async def main() -> None:
        while not r.netlink.queue.empty():
            r.daemon._events.put_nowait(r.netlink.queue.get_nowait())
        await r.daemon.start()
        r.daemon.publish(READY="1")
        assert r.daemon.status().state == "enforcing" and not asked  # we just replaced it
        r.kernel.tamper(
            {"flush": {"chain": {"family": "ip", "table": "tailsfw", "name": "output"}}}
        )
        await asyncio.sleep(KERNEL_CHECK)
        before = asyncio.get_running_loop().time()
        assert r.daemon.status().state == "enforcing"  # not known yet: asked now
        assert asyncio.get_running_loop().time() - before < 0.01
        await asyncio.sleep(0.1 + PUBLISH_INTERVAL)
        assert len(asked) == 1

    asyncio.run(main())
    written = json.loads((tmp_path / "state" / "status.json").read_text())
    assert written["state"] == "tampered" and written["kernel_differences"], written
