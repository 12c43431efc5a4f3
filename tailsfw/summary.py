"""`tailsfwctl status`, decided and rendered: pure, from what was observed.

`observe.py` gathers an `Observation` (the daemon's properties, the kernel's
tables, the policy's digest); `verdict()` turns it into an exit status as
`systemctl is-active` would, and `render()` / `to_json()` into text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

# Exit statuses of tailsfwctl (documented in tailsfwctl(8)).
OK = 0  # status: the policy's ruleset is in force
FAILED = 1  # a command failed (a refused ruleset or reload)
NOT_IN_FORCE = 3  # status: no tailsfw tables, other tables, or the lockdown
NO_PERMISSION = 4  # needs root (or the bus refused the call)
NO_DAEMON = 5  # tailsfwd does not answer on the bus
BAD_POLICY = 6  # the policy cannot be read or compiled

# What the kernel holds, compared with what the policy compiles to.
NONE, POLICY, LOCKDOWN, OTHER = "none", "policy", "lockdown", "other"


@dataclass(frozen=True)
class Kernel:
    """The tailsfw tables the kernel holds, and whose ruleset they are."""

    families: tuple[str, ...]
    holds: str  # NONE | POLICY | LOCKDOWN | OTHER
    differences: tuple[str, ...] = ()  # OTHER: how it differs from the policy's


@dataclass(frozen=True)
class Guest:
    """A policy namespace: present or not, and whether its guest side (the
    ruleset and settings tailsfwd puts inside it) is in force."""

    name: str
    present: bool
    in_force: bool
    differences: tuple[str, ...] = ()  # found in the namespace: rule by rule, settings
    note: str = ""  # why not in force, when no difference says it


@dataclass(frozen=True)
class Observation:
    """What `status` saw: the policy, the daemon and the kernel."""

    policy_path: str
    expected: str  # digest the policy compiles to ("" when it cannot be compiled)
    policy_error: str
    # The daemon's properties (service.properties() names), None if not running.
    daemon: dict[str, Any] | None
    daemon_source: str  # "D-Bus", "status.json", or why it is not running
    kernel: Kernel | None  # None when the kernel could not be read
    kernel_note: str  # why not, or how the comparison was made
    # The policy's namespaces as root found them inside each (None: not looked at).
    guests: tuple[Guest, ...] | None = None


def guests(obs: Observation) -> tuple[tuple[Guest, ...], str]:
    """The namespaces, and who says so: the kernel (root looked inside each),
    else what the daemon reports."""
    if obs.guests is not None:
        return obs.guests, "checked inside it"
    reported = (obs.daemon or {}).get("Namespaces", [])
    return tuple(Guest(n, p, f, note=why) for n, p, f, why in reported), "as tailsfwd reports"


def guests_verdict(obs: Observation) -> tuple[int, str] | None:
    """Not on while a present namespace's guest side is not in force."""
    wrong = [g.name for g in guests(obs)[0] if g.present and not g.in_force]
    if not wrong:
        return None
    names = f"namespace{'s' * (len(wrong) > 1)} {', '.join(wrong)}"
    return NOT_IN_FORCE, f"not the policy: the guest rules of {names} are not in force"


def verdict(obs: Observation) -> tuple[int, str]:
    """The exit status and a one-line answer: is the policy's ruleset in force?"""
    if obs.kernel is not None:
        holds = obs.kernel.holds
        if holds == NONE:
            return NOT_IN_FORCE, "off: no tailsfw ruleset in the kernel"
        if holds == LOCKDOWN:
            return NOT_IN_FORCE, "lockdown: only loopback traffic passes"
        if obs.policy_error:
            return BAD_POLICY, "unknown: the policy cannot be compiled to compare"
        if holds == OTHER:
            return NOT_IN_FORCE, "not the policy: the kernel holds another tailsfw ruleset"
        return guests_verdict(obs) or (OK, "on: the policy's ruleset is in force")
    daemon = obs.daemon
    if daemon is None:
        why = "does not answer" if obs.daemon_source.startswith(NO_ANSWER) else "is not running"
        return NO_PERMISSION, f"unknown: tailsfwd {why} and only root can read the kernel"
    state = daemon["State"]
    if state == "lockdown":
        return NOT_IN_FORCE, "lockdown: only loopback traffic passes"
    if state != "enforcing":  # whatever digest it reports, it says it does not enforce it
        return NOT_IN_FORCE, f"not in force: tailsfwd reports {STATES.get(state, state or '?')}"
    if obs.policy_error:
        return BAD_POLICY, "unknown: the policy cannot be compiled to compare"
    if daemon["RulesetDigest"] != obs.expected:
        return NOT_IN_FORCE, "not the policy: tailsfwd reports another ruleset"
    return guests_verdict(obs) or (OK, "on: the policy's ruleset is in force")


# What a daemon's state other than enforcing means, for the status line.
STATES = {
    "starting": "it is starting (no ruleset of the policy loaded yet)",
    "tampered": "the kernel's tables differ from its ruleset (tampered)",
    "failed": "it failed (see its error)",
}
NO_ANSWER = "tailsfwd does not answer"  # how observe.py names a daemon silent on the bus
SHOWN_DIFFERENCES = 5


def when(usec: int) -> str:
    if not usec:
        return "unknown"
    seconds = usec / 1_000_000
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(seconds))
    return f"{stamp}; {ago(time.time() - seconds)} ago"


def ago(seconds: float) -> str:
    """Like systemctl: the two largest units ("2h 5min", "3min 2s", "40s")."""
    rest = max(0, int(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        count, rest = divmod(rest, size)
        if count or (unit == "s" and not parts):
            parts.append(f"{count}{unit}")
    return " ".join(parts[:2])


DOTS = {OK: "\x1b[0;1;32m●\x1b[0m", NOT_IN_FORCE: "\x1b[0;1;31m●\x1b[0m"}
PLAIN_DOT = "●"
YELLOW_DOT = "\x1b[0;1;33m●\x1b[0m"


def render(obs: Observation, color: bool = False) -> str:
    code, answer = verdict(obs)
    dot = DOTS.get(code, YELLOW_DOT) if color else PLAIN_DOT
    rows: list[tuple[str, str]] = []
    d = obs.daemon
    if d is None:
        rows.append(("Daemon", f"not running ({obs.daemon_source})"))
    else:
        since = f" since {when(d['RunningSince'])}" if d["RunningSince"] else ""
        rows.append(("Daemon", f"running (pid {d['Pid']}, via {obs.daemon_source}){since}"))
        rows.append(("State", d["State"] + (f" ({d['StatusLine']})" if d["StatusLine"] else "")))
    rows.append(("Policy", obs.policy_path + (f": {obs.policy_error}" if obs.policy_error else "")))
    rows.append(("Ruleset", ruleset_line(obs)))
    rows.extend(difference_rows(obs.kernel.differences if obs.kernel else ()))
    rows.extend(namespace_rows(obs))
    if d is not None:
        if d["LastApply"]:
            cause = f" ({d['LastApplyCause']})" if d["LastApplyCause"] else ""
            rows.append(("Applied", when(d["LastApply"]) + cause))
        if d["LastError"]:
            rows.append(("Error", d["LastError"]))
        rows.extend(dns_rows(d))
        rows.extend(sysctl_rows(d["Sysctls"]))
        rows.append(("Drops", drops_line(d["DropsByUser"], d["DropsByReason"])))
        rows.extend(("Warning", w) for w in d["Warnings"])
    width = max(len(k) for k, _ in rows)
    lines = [f"{dot} tailsfw: {answer}"]
    lines += [f"  {k.rjust(width)}: {v}" for k, v in rows]
    return "\n".join(lines) + "\n"


def ruleset_line(obs: Observation) -> str:
    d = obs.daemon
    digest = (d["RulesetDigest"] if d else "") or ""
    if digest:
        shown = digest[:12]
    else:  # no daemon to say what it loaded: name what the policy compiles to
        shown = f"policy compiles to {obs.expected[:12]}" if obs.expected else "no digest"
    k = obs.kernel
    if k is None and d is None:
        return f"unknown: tailsfwd is not running and {obs.kernel_note}"
    if k is None:
        assert d is not None
        if d["State"] != "enforcing":
            compared = f"not in force: tailsfwd reports {d['State'] or '?'}"
        elif digest == obs.expected:
            compared = "matches the policy"
        else:
            compared = "does not match the policy"
        return f"{shown}, {compared} (as tailsfwd reports; {obs.kernel_note})"
    if k.holds == NONE:
        return "no tailsfw tables in the kernel"
    tables = ", ".join(f"{f} tailsfw" for f in k.families)
    what = {
        POLICY: "the policy's ruleset",
        LOCKDOWN: "the lockdown ruleset",
        OTHER: "not what the policy compiles to",
    }[k.holds]
    return f"{shown}; kernel: {tables}: {what} ({obs.kernel_note})"


def difference_rows(found: tuple[str, ...]) -> list[tuple[str, str]]:
    rows = [("Differs", line) for line in found[:SHOWN_DIFFERENCES]]
    if len(found) > SHOWN_DIFFERENCES:
        rows.append(("", f"... {len(found) - SHOWN_DIFFERENCES} more (tailsfwctl verify)"))
    return rows


def namespace_rows(obs: Observation) -> list[tuple[str, str]]:
    """One line per policy namespace, then how each present one differs."""
    found, how = guests(obs)
    rows: list[tuple[str, str]] = []
    for g in found:
        if not g.present:
            rows.append(("Namespace", f"{g.name}: absent"))
            continue
        if g.in_force:
            state = "guest rules in force"
        elif g.differences:
            count = len(g.differences)
            state = f"guest rules not in force: {count} difference{'s' * (count != 1)}"
        else:
            state = f"guest rules not in force: {g.note or '?'}"
        rows.append(("Namespace", f"{g.name}: present, {state} ({how})"))
        rows.extend((k, f"{g.name}: {v}" if k else v) for k, v in difference_rows(g.differences))
    return rows


def dns_rows(d: dict[str, Any]) -> list[tuple[str, str]]:
    servers = ", ".join(d["ClearnetDns"]) or "no clearnet DNS server"
    manager = d["NetworkManager"]
    rows = [("DNS", servers if manager == "available" else f"{servers}; NetworkManager {manager}")]
    rows.extend(("", f"refused from NetworkManager: {value}") for value in d["DnsRefused"])
    return rows


def sysctl_rows(rows: list[list[Any]]) -> list[tuple[str, str]]:
    wrong = [r for r in rows if not r[3]]
    out = [("Sysctls", f"{len(rows) - len(wrong)} of {len(rows)} as wanted")]
    for name, wanted, actual, _, note in wrong:
        why = f" ({note})" if note else ""
        out.append(("", f"{name}: wanted {wanted}, is {actual or '?'}{why}"))
    return out


def drops_line(by_user: dict[str, int], by_reason: dict[str, int]) -> str:
    total = sum(by_user.values()) or sum(by_reason.values())
    if not total:
        return "none counted"
    parts = [f"{total} refused"]
    if by_user:
        parts.append("by user: " + ", ".join(f"{u} {n}" for u, n in sorted(by_user.items())))
    if by_reason:
        parts.append("by reason: " + ", ".join(f"{r} {n}" for r, n in sorted(by_reason.items())))
    return "; ".join(parts)


def to_json(obs: Observation) -> dict[str, Any]:
    code, answer = verdict(obs)
    return {
        "in_force": code == OK,
        "exit_status": code,
        "summary": answer,
        "policy": {"path": obs.policy_path, "digest": obs.expected, "error": obs.policy_error},
        "daemon": {"running": obs.daemon is not None, "source": obs.daemon_source,
                   "properties": obs.daemon},
        "kernel": None if obs.kernel is None else {
            "tables": list(obs.kernel.families), "holds": obs.kernel.holds,
            "differences": list(obs.kernel.differences),
        },
        "kernel_note": obs.kernel_note,
        "namespaces": [dict(vars(g), differences=list(g.differences), source=guests(obs)[1])
                       for g in guests(obs)[0]],
    }  # fmt: skip
