"""What the dropped-packet audit costs: throughput, latency to the journal, memory.

In a lab host with the shipped policy in force, the audit (the same
`DropAudit` tailsfwd runs, via tests/lab/audit_runner.py) reads the NFLOG
group and writes to a real journald of its own (tests/lab/journald.py):

- drop_log_pps: refused packets decoded and accounted per second of the
  audit's own CPU time, i.e. with one core busy: the audit pinned to CPU 0
  with no CPU budget, a C flooder (bench/udpflood.c) pinned to CPU 1 refused
  as fast as the kernel goes (median of ROUNDS rounds of SECONDS); beside it
  the wall-clock rate, the audit's CPU share and the drops lost meanwhile;
- drop_decode_only_pps: the same decoding and accounting of crafted messages
  in one process, no kernel: what Python costs per drop;
- drop_to_journal_ms_p50/p99: from a packet's send to its journal entry
  (journald's own receive time), every drop logged (no rate limit),
  LATENCY_PACKETS packets 20 ms apart;
- journal_send_us_p50/p99/max: one `journal.send` of a drop entry to that
  journald (a local datagram), as the writer thread spends it;
- drop_audit_rss_mb: the audit process's resident memory after the flood
  (Python, systemd-python and the audit; the daemon has these once).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.datapath import build_flooder
from tailsfw import policy as policy_module
from tailsfw.dropaudit import DropAudit
from tailsfw.droplog import DEFAULT_LIMITS, DROP_MESSAGE_ID
from tailsfw.nflog import Batch, decode, messages
from tests.lab.command import REPO, VENV_PYTHON
from tests.lab.journald import AuditProcess, Journald, run_audit, run_journald
from tests.lab.kernel import reset_host
from tests.lab.names import temp_prefix
from tests.lab.policies import LAB_ROLES, apply, lab_policy
from tests.lab.topology import INTERNET_V4, Lab
from tests.unit.nflog_messages import ipv4, packet_message, ports

SECONDS = 3.0
ROUNDS = 3
LATENCY_PACKETS = 300
LATENCY_GAP = 0.02
# Sends one UDP datagram to each port from BASE on, GAP apart; prints the
# wall-clock time of each send as JSON {port: time}.
SENDER = """
import json, socket, sys, time
base, count, gap = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent = {}
for port in range(base, base + count):
    sent[port] = time.time()
    try:
        s.sendto(b"t", (sys.argv[1], port))
    except OSError:
        pass
    time.sleep(gap)
print(json.dumps(sent))
"""


@dataclass(frozen=True)
class Round:
    drops: int
    lost: int
    cpu: float  # the audit process's CPU seconds
    elapsed: float


def flood_round(lab: Lab, audit: AuditProcess, flooder: str) -> Round:
    before, cpu = audit.counters(), audit.cpu_seconds()
    started = time.monotonic()
    lab.run_as("other", ["taskset", "-c", "1", flooder, INTERNET_V4[0], "42", str(SECONDS)])
    time.sleep(0.1)  # the counters file is written every 50 ms
    after = audit.counters()
    return Round(after["drops"] - before["drops"], after["lost"] - before["lost"],
                 audit.cpu_seconds() - cpu, time.monotonic() - started)  # fmt: skip


def latency(lab: Lab, audit: AuditProcess) -> list[float]:
    """Milliseconds from each send to its journal entry."""
    done = lab.run_as("amnesia", ["/usr/bin/python3", "-c", SENDER, INTERNET_V4[1], "20000",
                                  str(LATENCY_PACKETS), str(LATENCY_GAP)], timeout=120)  # fmt: skip
    sent = {int(port): at for port, at in json.loads(done.stdout).items()}
    time.sleep(0.5)
    entries = audit.journald.entries(f"_PID={audit.process.pid}", f"MESSAGE_ID={DROP_MESSAGE_ID}")
    delays = [
        int(e["__REALTIME_TIMESTAMP"]) / 1000 - sent[int(e["TAILSFW_DPORT"])] * 1000
        for e in entries
        if e.get("TAILSFW_DST") == INTERNET_V4[1] and int(e.get("TAILSFW_DPORT", 0)) in sent
    ]
    if len(delays) != LATENCY_PACKETS:
        raise RuntimeError(f"{len(delays)} of {LATENCY_PACKETS} drops reached the journal")
    return delays


SEND_TIMER = """
import json, statistics, time
from systemd import journal
from tailsfw.droplog import drop_entry
from tailsfw.nflog import Drop
fields = drop_entry(Drop(4, 17, "192.168.77.2", "198.51.100.10", 29, "Dropped outbound packet: ",
                         0.0, sport=1, dport=42, uid=1000, gid=1000), "amnesia", "", "eth0")
times = []
for _ in range(2000):
    start = time.perf_counter()
    journal.send(**fields)
    times.append((time.perf_counter() - start) * 1e6)
times.sort()
print(json.dumps([statistics.median(times), times[int(len(times) * 0.99)], times[-1]]))
"""


def send_cost(journald: Journald) -> dict[str, float]:
    """How long one journal.send of a drop entry takes (what the writer thread spends)."""
    done = subprocess.run(journald.wrap([VENV_PYTHON, "-c", SEND_TIMER]), capture_output=True,
                          text=True, check=True, cwd=REPO, timeout=120)  # fmt: skip
    p50, p99, worst = json.loads(done.stdout)
    return {"journal_send_us_p50": round(p50, 1), "journal_send_us_p99": round(p99, 1),
            "journal_send_us_max": round(worst, 1)}  # fmt: skip


async def decode_only(batches: int = 800) -> float:
    """Decoding and accounting alone, of crafted messages, per second (in a loop,
    as the audit runs: summaries are scheduled on it)."""
    data = packet_message(ipv4(17, "192.168.77.2", "198.51.100.10", ports(40000, 42)))
    audit = DropAudit(0, send=lambda **fields: None, limits=DEFAULT_LIMITS)
    started = time.perf_counter()
    for chunk in range(batches):
        batch = Batch([decode(m, 0.0) for _ in range(256) for m in messages(data)], [])
        audit.account(batch, chunk / 1000)
    return batches * 256 / (time.perf_counter() - started)


def measure() -> dict[str, Any]:
    figures: dict[str, Any] = {"drop_decode_only_pps": round(asyncio.run(decode_only()))}
    with (
        Lab(LAB_ROLES) as lab,
        tempfile.TemporaryDirectory(prefix=temp_prefix("bench-droplog")) as tmp,
    ):
        work = Path(tmp)
        flooder = build_flooder(work)
        policy = lab_policy(lab, work / "policy.toml")
        group = policy_module.load(policy).log.group
        with reset_host(lab.host_ns, ["net.ipv4.ip_forward"]), run_journald(work / "j") as jd:
            figures.update(send_cost(jd))
            done = apply(lab, policy)
            if done.returncode != 0:
                raise RuntimeError(done.stderr)
            with run_audit(lab.host_ns, jd, group, ["--share", "1.0"], cpu=0) as audit:
                figures["drop_audit_rss_idle_mb"] = round(audit.rss_mb(), 1)
                rounds = [flood_round(lab, audit, flooder) for _ in range(ROUNDS)]
                # Per second of the audit's own CPU time: what one busy core decodes,
                # whatever else the (shared) machine runs meanwhile.
                figures["drop_log_pps"] = round(statistics.median(r.drops / r.cpu for r in rounds))
                figures["drop_log_wall_pps"] = round(
                    statistics.median(r.drops / r.elapsed for r in rounds)
                )
                figures["drop_log_cpu_share"] = round(
                    statistics.median(r.cpu / r.elapsed for r in rounds), 2
                )
                figures["drop_log_lost_pps"] = round(
                    statistics.median(r.lost / r.elapsed for r in rounds)
                )
                figures["drop_audit_rss_mb"] = round(audit.rss_mb(), 1)
                audit.stop()
            with run_audit(lab.host_ns, jd, group, ["--unlimited", "--share", "1.0"]) as audit:
                delays = sorted(latency(lab, audit))
                audit.stop()
            figures["drop_to_journal_ms_p50"] = round(statistics.median(delays), 2)
            figures["drop_to_journal_ms_p99"] = round(delays[int(len(delays) * 0.99) - 1], 2)
    return figures


if __name__ == "__main__":
    print(json.dumps(measure(), indent=1, sort_keys=True))
