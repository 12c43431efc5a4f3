"""`tailsfwctl explain` and `tailsfwctl prove`: their arguments and exit codes.

The heavy modules are imported when a command runs, not when tailsfwctl
starts.  Exit codes: 0 accepted (explain) or no difference (prove); 1
refused, or a difference; 2 cannot tell (wrong usage, no scratch namespace,
a ruleset that does not load); 4 not root; 6 bad policy.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

CANNOT_TELL = 2
NO_PERMISSION = 4
DEFAULT_POLICY = Path("/etc/tailsfw/policy.toml")


def explain_arguments(explain: argparse.ArgumentParser) -> None:
    who = explain.add_mutually_exclusive_group()
    who.add_argument("--user", metavar="NAME", help="the sender's account (default: yours)")
    who.add_argument("--uid", type=int, metavar="N", help="the sender's uid")
    explain.add_argument(
        "--netns", metavar="NAME", help="the ruleset in force in this network namespace (ip netns)"
    )
    explain.add_argument("destination", metavar="DEST", help="an IPv4 or IPv6 address")
    explain.add_argument(
        "protocol",
        metavar="PROTO[/PORT]",
        nargs="?",
        default="tcp/443",
        help="tcp, udp, icmp or a number, and a port (default: tcp/443)",
    )
    policy_argument(explain)


def policy_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--policy",
        type=Path,
        metavar="FILE",
        help="check this policy's ruleset (default: the ruleset in force)",
    )


def cmd_explain(args: argparse.Namespace) -> int:
    from . import explain

    if os.geteuid() != 0:
        return _fail(NO_PERMISSION, "explain needs root (it makes a scratch network namespace)")
    args.uid = _uid(args)
    try:
        world, document = _world_and_ruleset(args.policy, getattr(args, "netns", None))
        return explain.run(args, world, document)
    except explain.UsageError as e:
        return _fail(CANNOT_TELL, str(e))
    except (OSError, RuntimeError) as e:
        return _fail(CANNOT_TELL, f"cannot explain: {type(e).__name__}: {e}")


def cmd_prove(args: argparse.Namespace) -> int:
    from . import prove

    if os.geteuid() != 0:
        return _fail(NO_PERMISSION, "prove needs root (it makes a scratch network namespace)")
    try:
        world, document = _world_and_ruleset(args.policy, None)
        if world is None:
            return _fail(CANNOT_TELL, f"no policy to compare with: {DEFAULT_POLICY} is missing")
        report = prove.prove(document, world)
    except (OSError, RuntimeError) as e:
        return _fail(CANNOT_TELL, f"cannot prove: {type(e).__name__}: {e}")
    for difference in report.differences:
        print("\n".join(difference.lines()), end="\n\n")
    print(report.summary(), file=sys.stderr)
    return 1 if report.differences else 0


def _uid(args: argparse.Namespace) -> int:
    if args.uid is not None:
        return int(args.uid)
    if args.user is None:
        return os.getuid()
    import pwd

    try:
        return pwd.getpwnam(args.user).pw_uid
    except KeyError:
        if args.user.isdigit():
            return int(args.user)
        raise SystemExit(_fail(CANNOT_TELL, f"no account named {args.user!r}")) from None


def _world_and_ruleset(policy_file: Path | None, netns: str | None) -> tuple[Any, Any]:
    """The oracle's world (None without a policy) and the ruleset to load:
    the policy's when one is given, else the kernel's in force."""
    from . import compiler, explain, netlink, policy, prove, users
    from .facts import Facts

    path = policy_file or (DEFAULT_POLICY if DEFAULT_POLICY.exists() else None)
    if path is None:
        return None, explain.ruleset_in_force(netns)
    pol = policy.load(path)
    connected = netlink.read_snapshot().connected if pol.lan.mode == "connected" else frozenset()
    world = prove.world_of(pol, connected)
    if policy_file is None:
        return world, explain.ruleset_in_force(netns)
    ruleset = compiler.compile_policy(pol, Facts(uids=users.lookup_uids(pol), connected=connected))
    return world, ruleset.document()


def _fail(code: int, message: str) -> int:
    print(f"tailsfwctl: {message}", file=sys.stderr)
    return code
