"""tailsfwctl: what a person or a boot script runs."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from . import compiler, dropquery, policy, users
from .facts import Facts
from .nft import Nft, NftError

DEFAULT_POLICY = Path("/etc/tailsfw/policy.toml")


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
        ["unshare", "--map-root-user", "--net", "sh", "-c", script],
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
    ruleset = build(args.policy)
    Nft().apply(ruleset.document())
    print(f"tailsfwctl: ruleset {ruleset.digest()[:12]} in force")
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tailsfwctl", description="Control the Tails network filter.")
    sub = p.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="print the ruleset that would be loaded")
    render.add_argument("--format", choices=("json", "nft"), default="json")
    render.set_defaults(func=cmd_render)
    apply = sub.add_parser("apply", help="load the ruleset in one transaction")
    apply.set_defaults(func=cmd_apply)
    for s in (render, apply):
        s.add_argument("--policy", type=Path, default=DEFAULT_POLICY, help="policy file")
    drops = sub.add_parser("drops", help="the refused packets, from the journal")
    drops.add_argument("--since", metavar="TIME", help=dropquery.SINCE_HELP)
    drops.add_argument("--user", metavar="NAME", help="only this user's (name or uid)")
    drops.add_argument("--follow", action="store_true", help="then wait for new ones")
    drops.add_argument("--json", action="store_true", help="one JSON object a line")
    drops.add_argument("--directory", type=Path, help="read journal files from here")
    drops.set_defaults(func=cmd_drops)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except policy.PolicyError as e:
        print(f"tailsfwctl: {e}; the ruleset in force is unchanged", file=sys.stderr)
    except dropquery.QueryError as e:
        print(f"tailsfwctl: {e}", file=sys.stderr)
    except BrokenPipeError:  # `tailsfwctl drops | head`: quiet, also at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except NftError as e:
        print(
            f"tailsfwctl: nft refused the ruleset: {e}; the ruleset in force is unchanged",
            file=sys.stderr,
        )
    return 1


if __name__ == "__main__":
    sys.exit(main())
