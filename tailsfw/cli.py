"""tailsfwctl: what a person or a boot script runs."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from . import compiler, dropquery, netlink, observe, policy, summary, users, verify
from .facts import Facts
from .nft import Nft, NftError, scratch_namespace

DEFAULT_POLICY = Path("/etc/tailsfw/policy.toml")
CANNOT_TELL = 2  # verify: the kernel could not be compared (1 is "it differs")


class NeedsRoot(RuntimeError):
    """The command changes the kernel's ruleset, which only root may do."""


def build(policy_path: Path) -> compiler.Ruleset:
    pol = policy.load(policy_path)
    ruleset = compiler.compile_policy(pol, Facts(uids=users.lookup_uids(pol)))
    for warning in ruleset.warnings:
        print(f"tailsfwctl: warning: {warning}", file=sys.stderr)
    return ruleset


def cmd_render(args: argparse.Namespace) -> int:
    ruleset = build(args.policy)
    if args.format == "json":
        print(ruleset.to_json())
        return 0
    # nft's text form is nft's to write: load into a throw-away network
    # namespace (never this one) and list it back.
    script = "nft -j -f - && nft list ruleset"
    done = subprocess.run(
        [*scratch_namespace(), "sh", "-c", script],
        input=ruleset.to_json(),
        text=True,
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        print(f"tailsfwctl: cannot render as nft text: {done.stderr.strip()}", file=sys.stderr)
        return 1
    print(done.stdout, end="")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise NeedsRoot("apply needs root")
    ruleset = build(args.policy)
    Nft().apply(ruleset.document())
    print(f"tailsfwctl: ruleset {ruleset.digest()[:12]} in force")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    seen = observe.observe(args.policy, DEFAULT_POLICY, args.bus, args.state_file)
    if args.json:
        print(json.dumps(summary.to_json(seen), indent=1, sort_keys=True))
    else:
        print(summary.render(seen, color=sys.stdout.isatty()), end="")
    return summary.verdict(seen)[0]


def cmd_reload(args: argparse.Namespace) -> int:
    observe.reload(args.bus)
    print("tailsfwctl: tailsfwd reloaded the policy")
    return 0


def cmd_drops(args: argparse.Namespace) -> int:
    since = dropquery.parse_since(args.since, datetime.now()) if args.since else None
    drops = dropquery.DropJournal(args.directory)
    drops.since(since)
    try:
        for entry in drops.follow() if args.follow else drops.entries():
            if args.user is None or entry.concerns(args.user):
                print(json.dumps(entry.json()) if args.json else entry.line(), flush=args.follow)
    except KeyboardInterrupt:
        pass
    finally:
        drops.close()
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """0: the kernel holds what the policy compiles to; 1: it differs; 2: cannot tell."""
    if os.geteuid() != 0:
        raise NeedsRoot("verify needs root to read the kernel's ruleset")
    pol = policy.load(args.policy)
    try:
        lan = netlink.read_snapshot().connected if pol.lan.mode == "connected" else frozenset()
        ruleset = compiler.compile_policy(pol, Facts(uids=users.lookup_uids(pol), connected=lan))
        found = verify.differences(Nft().list_ruleset(), ruleset)
    except Exception as e:  # libnftables, netlink, a listing nft wrote wrongly: one line
        return fail(CANNOT_TELL, f"cannot verify: {type(e).__name__}: {e}")
    for warning in ruleset.warnings:
        print(f"tailsfwctl: warning: {warning}", file=sys.stderr)
    for line in found:
        print(line)
    print(
        f"tailsfwctl: the kernel holds {'another ruleset' if found else 'the policy'}: "
        f"{len(found)} difference{'s' * (len(found) != 1)}",
        file=sys.stderr,
    )
    return 1 if found else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tailsfwctl", description="Control the Tails network filter.")
    sub = p.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="print the ruleset that would be loaded")
    render.add_argument("--format", choices=("json", "nft"), default="json")
    render.set_defaults(func=cmd_render)
    apply = sub.add_parser("apply", help="load the ruleset in one transaction")
    apply.set_defaults(func=cmd_apply)
    check = sub.add_parser("verify", help="compare the kernel's tables with the policy")
    check.set_defaults(func=cmd_verify)
    for s in (render, apply, check):
        s.add_argument("--policy", type=Path, default=DEFAULT_POLICY, help="policy file")
    status = sub.add_parser("status", help="is the policy's ruleset in force? (exit 0 if so)")
    status.add_argument(
        "--policy", type=Path, help="policy to compare with (default: the daemon's)"
    )
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.add_argument(
        "--state-file", type=Path, default=observe.DEFAULT_STATE_FILE,
        help="the daemon's status.json, read when it is not on the bus",
    )  # fmt: skip
    status.set_defaults(func=cmd_status)
    reload = sub.add_parser("reload", help="ask tailsfwd to adopt its policy file again")
    reload.set_defaults(func=cmd_reload)
    for s in (status, reload):
        s.add_argument("--bus", metavar="ADDRESS", help="D-Bus address (default: system bus)")
    drops = sub.add_parser("drops", help="the refused packets, from the journal")
    drops.add_argument("--since", metavar="TIME", help=dropquery.SINCE_HELP)
    drops.add_argument("--user", metavar="NAME", help="only this user's (name or uid)")
    drops.add_argument("--follow", action="store_true", help="then wait for new ones")
    drops.add_argument("--json", action="store_true", help="one JSON object a line")
    drops.add_argument("--directory", type=Path, help="read journal files from here")
    drops.set_defaults(func=cmd_drops)
    return p


def main(argv: list[str] | None = None) -> int:
    """Every failure is one line on stderr and an exit status of its own (tailsfwctl(8))."""
    args = parser().parse_args(argv)
    unchanged = "the ruleset in force is unchanged"
    try:
        return int(args.func(args))
    except policy.PolicyError as e:
        return fail(summary.BAD_POLICY, f"{e}; {unchanged}")
    except NeedsRoot as e:
        return fail(summary.NO_PERMISSION, f"{e}; {unchanged}")
    except dropquery.QueryError as e:
        return fail(summary.FAILED, str(e))
    except BrokenPipeError:  # `tailsfwctl drops | head`: quiet, also at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except NftError as e:
        return fail(summary.FAILED, f"nft refused the ruleset: {e}; {unchanged}")
    except observe.ControlError as e:
        return fail(e.code, str(e))
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a person gets one line, never a traceback
        return fail(summary.FAILED, f"{args.command} failed: {type(e).__name__}: {e}")


def fail(code: int, message: str) -> int:
    print(f"tailsfwctl: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
