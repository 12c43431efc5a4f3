"""Inside a lab namespace: what one full apply costs, against nft's own floor.

Run by bench/run.py as `ip netns exec HOST python -m bench.apply POLICY`;
prints one JSON object of figures.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from nftables import Nftables

from tailsfw import compiler, policy, users
from tailsfw.facts import Facts
from tailsfw.nft import Nft

ROUNDS = 60


def median_ms(fn: Callable[[], object], rounds: int = ROUNDS) -> float:
    fn()  # warm
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    pol = policy.load(sys.argv[1])
    facts = Facts(uids=users.lookup_uids(pol))
    nft = Nft()

    def full() -> None:
        nft.apply(compiler.compile_policy(pol, facts).document())

    ruleset = compiler.compile_policy(pol, facts)
    text_json = json.dumps(ruleset.document())
    raw = Nftables()
    raw.set_json_output(True)  # makes libnftables read its input as JSON

    def floor() -> None:
        rc, _, err = raw.cmd(text_json)
        assert rc == 0, err

    nft.apply(ruleset.document())
    listing = subprocess.run(
        ["nft", "list", "ruleset"], capture_output=True, text=True, check=True
    ).stdout
    prelude = "".join(f"add table {f} tailsfw\ndelete table {f} tailsfw\n" for f in ("ip", "ip6"))
    with tempfile.NamedTemporaryFile("w", suffix=".nft") as f:
        f.write(prelude + listing)
        f.flush()
        file_ms = median_ms(lambda: subprocess.run(["nft", "-f", f.name], check=True), 20)
    # Side by side, interleaved, so that load on the machine hits both alike.
    full_ms, json_ms = [], []
    for _ in range(5):
        full_ms.append(median_ms(full, ROUNDS // 5))
        json_ms.append(median_ms(floor, ROUNDS // 5))
    compile_ms = median_ms(lambda: compiler.compile_policy(pol, facts))
    figures = {
        "apply_full_ms": round(statistics.median(full_ms), 3),
        "nft_json_ms": round(statistics.median(json_ms), 3),
        "nft_file_ms": round(file_ms, 3),
        "compile_ms": round(compile_ms, 3),
        "rules": sum(1 for o in ruleset.objects if "rule" in o),
    }
    figures["apply_full_vs_nft_json"] = round(figures["apply_full_ms"] / figures["nft_json_ms"], 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
