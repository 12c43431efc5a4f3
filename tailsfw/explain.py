"""`tailsfwctl explain`: what the kernel does with one packet, and why.

The ruleset (the one in force, or a policy's) is loaded into a scratch
network namespace with tracing; one packet of the class is sent there as
the uid asked; the trace says the verdict, the chains it went through and
the rule that decided; the oracle adds the specification's sentence.
Shared with `tailsfwctl prove`: the kernel's verdict from a trace, and the
text that explains it.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import oracle, scratch
from .classes import NAMES, OTHER_INTERFACE, TCP, Link, Packet
from .nft import Nft, NftError, listing_text

Json = dict[str, Any]
LOAD_ORDER = ("table", "chain", "flowtable", "set", "map", "rule")
PROTOCOL_NUMBERS = {name: number for number, name in NAMES.items()}
_HANDLE = re.compile(r"^\s*(.*?)\s*# handle (\d+)$")
_TABLE = re.compile(r"^table (\w+) (\S+) \{")
_COUNTER = re.compile(r"counter packets \d+ bytes \d+")


class UsageError(ValueError):
    """Bad arguments: the message names which."""


@dataclass(frozen=True)
class Rule:
    family: str
    chain: str
    text: str  # nft's own words
    comment: str
    rejects: bool
    logs: bool
    redirect: int | None


@dataclass(frozen=True)
class Seen:
    """The kernel's verdict on one packet, read from its trace."""

    verdict: str  # "accepted", "refused" (rejected), "dropped", or "not sent: WHY"
    redirect: int | None
    logged: bool
    inbound: str | None  # back in on lo: "accepted", "dropped", None if it did not come back
    path: tuple[str, ...]  # the chains, in order
    deciding: str  # the deciding rule, in nft's words
    comment: str  # the last "Tails rule N" met on the way
    forwarded: str = ""  # arrived and forwarded: "out on IFACE from SADDR ttl N"


def as_document(listing: Iterable[Json]) -> Json:
    """A listing (`nft -j list ruleset`) as a document that loads it whole."""
    objects = [o for o in listing if next(iter(o)) in LOAD_ORDER]
    objects.sort(key=lambda o: LOAD_ORDER.index(next(iter(o))))
    return {"nftables": [{"add": o} for o in objects]}


def rules_of(listing: Iterable[Json], text: str) -> dict[tuple[str, int], Rule]:
    """(family, handle) -> the rule, from the JSON listing and nft's text."""
    words: dict[tuple[str, int], str] = {}
    family = ""
    for line in text.splitlines():
        table = _TABLE.match(line)
        if table:
            family = table.group(1)
            continue
        found = _HANDLE.match(line)
        if found and not found.group(1).endswith("{"):
            words[(family, int(found.group(2)))] = _COUNTER.sub("counter", found.group(1))
    rules: dict[tuple[str, int], Rule] = {}
    for obj in listing:
        if "rule" not in obj:
            continue
        r = obj["rule"]
        kinds = {next(iter(e)) for e in r["expr"] if isinstance(e, dict)}
        redirect = next((e["redirect"].get("port") for e in r["expr"] if "redirect" in e), None)
        key = (r["family"], int(r["handle"]))
        rules[key] = Rule(
            r["family"],
            r["chain"],
            words.get(key, ""),
            r.get("comment", ""),
            "reject" in kinds,
            "log" in kinds,
            redirect,
        )
    return rules


def _hook_verdict(
    steps: Iterable[scratch.Step], rules: dict[tuple[str, int], Rule]
) -> tuple[str, scratch.Step | None]:
    """A hook's verdict: dropped by any chain, or accepted by all."""
    final: scratch.Step | None = None
    for step in steps:
        if step.verdict == "drop":
            rule = rules.get((step.family, step.handle))
            return ("refused" if rule and rule.rejects else "dropped"), step
        if step.verdict == "accept":
            final = step
    return "accepted", final


def kernel_verdict(
    outcome: scratch.Outcome, rules: dict[tuple[str, int], Rule], inbound: bool = False
) -> Seen:
    if outcome.error:
        return Seen(f"not sent: {outcome.error}", None, False, None, (), "", "")
    steps = outcome.input if inbound else outcome.output
    if inbound and not outcome.arrived:
        return Seen("not received", None, False, None, (), "", "")
    verdict, deciding = _hook_verdict(steps, rules)
    rule = rules.get((deciding.family, deciding.handle)) if deciding else None
    redirect = None
    logged = False
    comment = ""
    path: list[str] = []
    for step in steps:
        met = rules.get((step.family, step.handle))
        if met and met.redirect is not None and step.verdict == "accept":
            redirect = met.redirect
        logged = logged or bool(met and met.logs)
        if met and met.comment:
            comment = met.comment
        if not path or path[-1] != step.chain:
            path.append(step.chain)
    back = _hook_verdict(outcome.input, rules)[0] if outcome.arrived and not inbound else None
    if deciding is None:
        text = "no rule: no chain of ours saw it"
    elif deciding.kind == "policy":
        text = f"policy {deciding.verdict} of chain {deciding.chain}"
    else:
        text = rule.text if rule else f"rule handle {deciding.handle}"
    return Seen(verdict, redirect, logged, back, tuple(path), text, comment, outcome.left)


def agrees(seen: Seen, decision: oracle.Decision) -> bool:
    """Does the kernel do what the specification says?"""
    same = (seen.verdict, seen.redirect, seen.logged) == (
        decision.verdict,
        decision.redirect,
        decision.logged,
    )
    # Back in on lo: compared when the kernel brought the packet back.
    back = seen.inbound is None or seen.inbound == (decision.inbound or "dropped")
    return same and back and seen.forwarded == decision.forwarded


def verdict_text(verdict: str, redirect: int | None, inbound: str | None,
                 forwarded: str = "") -> str:  # fmt: skip
    text = verdict
    if redirect is not None:
        text = f"redirected to 127.0.0.1:{redirect}, then {verdict}"
    if inbound is not None and verdict == "accepted":
        text += f" (back in on lo: {inbound})"
    if forwarded:
        text += f", forwarded {forwarded}"
    return text


def detail(packet: Packet, seen: Seen, decision: oracle.Decision | None) -> list[str]:
    """explain's text, also prove's for each difference."""
    lines = [
        f"packet:    {packet.describe()}",
        f"kernel:    {verdict_text(seen.verdict, seen.redirect, seen.inbound, seen.forwarded)}"
        + (" (logged)" if seen.logged else ""),
        f"path:      {' -> '.join(seen.path) or '(no chain)'}",
        f"decided by: {seen.deciding}" + (f"   [{seen.comment}]" if seen.comment else ""),
    ]
    if decision is not None:
        lines += [
            "spec:      "
            + verdict_text(
                decision.verdict, decision.redirect, decision.inbound, decision.forwarded
            )
            + f" by {decision.rule}",
            f'           "{decision.sentence}"',
        ]
    return lines


def probe(document: Json, packets: list[Packet], links: Sequence[Link] = ()) -> list[Seen]:
    """The kernel's verdict on each packet, in a scratch namespace with these links."""

    def job() -> tuple[list[scratch.Outcome], list[Json], str]:
        lab = scratch.Scratch(document, links)
        outcomes = lab.send(packets)
        return outcomes, lab.nft.list_ruleset(), listing_text()

    outcomes, listing, text = scratch.run_in_scratch(job)
    rules = rules_of(listing, text)
    return [kernel_verdict(o, rules, p.inbound) for o, p in zip(outcomes, packets, strict=True)]


def ruleset_in_force(netns: str | None) -> Json:
    """The kernel's ruleset, from this network namespace or a named one."""
    if netns is None:
        return as_document(Nft().list_ruleset())
    import json

    done = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-j", "list", "ruleset"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise NftError(f"cannot list the ruleset of namespace {netns}: {done.stderr.strip()}")
    return as_document(json.loads(done.stdout or '{"nftables": []}')["nftables"])


def packet_of(args: argparse.Namespace, uid: int) -> Packet:
    """The class asked on the command line."""
    try:
        address = ipaddress.ip_address(args.destination)
    except ValueError:
        raise UsageError(f"destination {args.destination!r} is not an IP address") from None
    proto_text, _, port_text = args.protocol.partition("/")
    proto = PROTOCOL_NUMBERS.get(proto_text.lower())
    if proto is None and proto_text.isdigit() and int(proto_text) < 256:
        proto = int(proto_text)
    if proto is None:
        raise UsageError(f"protocol {proto_text!r}: tcp, udp, icmp, or a number 0-255")
    port: int | None = None
    if port_text:
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise UsageError(f"port {port_text!r}: a number 0-65535")
        port = int(port_text)
    elif proto in (TCP, 17):
        raise UsageError(f"{proto_text} needs a port: {proto_text}/PORT")
    family = "ipv6" if address.version == 6 else "ipv4"
    oif = "lo" if address.is_loopback else OTHER_INTERFACE
    dport = None if family == "ipv6" and proto == 58 else port or 0
    return Packet(family, uid, str(address), proto, dport, True, oif)


def run(args: argparse.Namespace, world: oracle.World | None, document: Json) -> int:
    """Print the explanation; 0 if the packet is accepted, 1 if not."""
    packet = packet_of(args, args.uid)
    (seen,) = probe(document, [packet])
    decision = oracle.decide(world, packet) if world is not None else None
    for line in detail(packet, seen, decision):
        print(line)
    if decision is not None and not agrees(seen, decision):
        print("note:      the kernel and the specification differ (tailsfwctl prove lists all)")
    if seen.verdict.startswith("not sent"):
        raise scratch.ScratchError(f"the packet could not be sent: {seen.verdict}")
    return 0 if seen.verdict == "accepted" else 1


def policy_path(value: Path | None, default: Path) -> Path | None:
    """The policy the oracle reads: the one given, else the default if present."""
    if value is not None:
        return value
    return default if default.exists() else None
