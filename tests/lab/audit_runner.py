"""The dropped-packet audit alone, as tailsfwd will run it (tests and benchmarks).

    python -m tests.lab.audit_runner --group N --counters FILE [--unlimited] [--share S]

Prints "ready" once the group is bound; writes the counters (JSON) to FILE
every 50 ms and once more after SIGTERM, when every open summary has been
written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from dataclasses import asdict
from pathlib import Path

from tailsfw.dropaudit import DropAudit
from tailsfw.droplog import DEFAULT_LIMITS, UNLIMITED, Budget

INTERVAL = 0.05


def write(path: Path, audit: DropAudit) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(audit.counters())))
    tmp.replace(path)


async def main(args: argparse.Namespace) -> None:
    audit = DropAudit(
        args.group,
        limits=UNLIMITED if args.unlimited else DEFAULT_LIMITS,
        budget=Budget(share=args.share),
    )
    task = asyncio.create_task(audit.run())
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    bound = asyncio.create_task(audit.bound.wait())
    await asyncio.wait([task, bound], timeout=5, return_when=asyncio.FIRST_COMPLETED)
    if not bound.done():
        print(f"not bound: {audit.counters().last_error}", flush=True)
        task.cancel()
        return
    write(args.counters, audit)
    print("ready", flush=True)
    while not task.done():
        write(args.counters, audit)
        await asyncio.wait([task], timeout=INTERVAL)
    write(args.counters, audit)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--group", type=int, required=True)
    parser.add_argument("--counters", type=Path, required=True)
    parser.add_argument("--unlimited", action="store_true", help="log every drop")
    parser.add_argument("--share", type=float, default=Budget.share, help="of a core")
    asyncio.run(main(parser.parse_args()))
    sys.exit(0)
