"""The status during a storm of interface changes: published at most every
PUBLISH_INTERVAL, and the last change always published."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tailsfw.daemon import PUBLISH_INTERVAL
from tests.unit.daemon_fakes import links, rig


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
