"""Loading and validating big policies: 10,000 LAN networks, ports or users.

Pure, no namespace: each policy is the shipped one with one list grown to
10,000 entries, written as a person would (inline tables for users), read
from a file by `policy.load` (open, fstat, read, decode, validate).  Prints
one JSON object of figures (medians of ROUNDS loads); the issue measured the
first loader at 26.6 s for 10,000 networks (a quadratic overlap check).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from tailsfw import policy
from tests.lab.names import temp_prefix

SHIPPED = Path(__file__).resolve().parents[1] / "etc" / "tailsfw" / "policy.toml"
COUNT = 10_000
ROUNDS = 5


def networks(text: str) -> str:
    nets = ", ".join(f'"10.{i // 256}.{i % 256}.0/24"' for i in range(COUNT))
    old = 'networks = ["192.168.0.0/16", "10.0.0.0/8", "172.16.0.0/12"]'
    assert old in text
    return text.replace(old, f'networks = ["192.168.0.0/16", {nets}, "172.16.0.0/12"]')


def ports(text: str) -> str:
    old = "ports = [9050]"
    assert old in text
    return text.replace(old, f"ports = [{', '.join(str(20000 + i) for i in range(COUNT))}]")


def users(text: str) -> str:
    old = 'nobody = { account = "nobody" }\n'
    assert old in text
    more = "".join(f'u{i} = {{ account = "bench{i}", fallback_uid = {20000 + i} }}\n'
                   for i in range(COUNT))  # fmt: skip
    return text.replace(old, old + more)


def median_ms(fn: Callable[[], object]) -> float:
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 1)


def measure() -> dict[str, float]:
    shipped = SHIPPED.read_text()
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix=temp_prefix("bench-policy")) as tmp:
        for name, grow in (("networks", networks), ("ports", ports), ("users", users)):
            path = Path(tmp) / f"{name}.toml"
            path.write_text(grow(shipped))
            figures[f"policy_load_10k_{name}_ms"] = median_ms(partial(policy.load, path))
    figures["policy_load_10k_ms"] = max(figures.values())
    figures["policy_load_shipped_ms"] = median_ms(lambda: policy.load(SHIPPED))
    return figures


if __name__ == "__main__":
    print(json.dumps(measure()))
