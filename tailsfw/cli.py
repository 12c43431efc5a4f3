"""tailsfwctl: what a person or a boot script runs.

It starts fast: this module imports nothing of tailsfw at its top.  Each
command is one row of COMMANDS: a line of help, a function that adds its
arguments and one that runs it; both import what that command needs, and
only the command in hand has its arguments added (docs/benchmarks.md says
what each command imports; tests/unit/test_cli_imports.py keeps it so).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path

TYPE_CHECKING = False  # as typing's, without importing typing (4 ms) for --help
if TYPE_CHECKING:
    from .compiler import Ruleset
    from .observe import NetnsPlace

DEFAULT_POLICY = Path("/etc/tailsfw/policy.toml")
DEFAULT_STATE_FILE = Path("/run/tailsfw/status.json")
CANNOT_TELL = 2  # verify: the kernel could not be compared (1 is "it differs")
UNCHANGED = "the ruleset in force is unchanged"


class NeedsRoot(RuntimeError):
    """The command changes or reads the kernel's ruleset, which only root may do."""


def warn(ruleset: Ruleset) -> None:
    for warning in ruleset.warnings:
        print(f"tailsfwctl: warning: {warning}", file=sys.stderr)


def build(policy_path: Path) -> Ruleset:
    """What `apply` loads: the policy with the facts of now (no daemon asked)."""
    from .now import compile_now

    ruleset = compile_now(policy_path)
    warn(ruleset)
    return ruleset


def scratch_argv() -> list[str]:
    """The command prefix that runs in a throw-away network namespace (never
    this one).  Root gets a plain one: in a user namespace the kernel refuses
    some statements (rewriting `ip ttl`, as the clearnet forward does)."""
    if os.geteuid() == 0:
        return ["unshare", "--net"]
    return ["unshare", "--map-root-user", "--net"]


# -- the commands: each imports what it needs -----------------------------------


def cmd_render(args: argparse.Namespace) -> int:
    import subprocess

    ruleset = build(args.policy)
    if args.format == "json":
        print(ruleset.to_json())
        return 0
    # nft's text form is nft's to write: load into a throw-away network
    # namespace (never this one) and list it back.
    script = "nft -j -f - && nft list ruleset"
    done = subprocess.run(
        [*scratch_argv(), "sh", "-c", script],
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
    from .nft import Nft

    ruleset = build(args.policy)
    nft = Nft()
    nft.apply(ruleset.document())
    # The digest while `nft` lives: closing its socket after a commit waits
    # for the kernel to free the old tables (an RCU grace period, ~10 ms).
    print(f"tailsfwctl: ruleset {ruleset.digest()[:12]} in force")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from . import observe, summary

    seen = observe.observe(args.policy, DEFAULT_POLICY, args.bus, args.state_file, netns(args))
    if args.json:
        print(json.dumps(summary.to_json(seen), indent=1, sort_keys=True))
    else:
        print(summary.render(seen, color=sys.stdout.isatty()), end="")
    return summary.verdict(seen)[0]


def cmd_reload(args: argparse.Namespace) -> int:
    from . import observe

    observe.reload(args.bus)
    print("tailsfwctl: tailsfwd reloaded the policy")
    return 0


def cmd_drops(args: argparse.Namespace) -> int:
    if args.summary:
        from . import dropsummary

        return dropsummary.command(args)
    from . import dropquery

    return dropquery.command(args)


def cmd_verify(args: argparse.Namespace) -> int:
    """0: the kernel holds what the policy compiles to; 1: it differs; 2: cannot tell.

    The policy is compiled as `status` compiles it (the facts of now, the
    running daemon's DNS servers) and compared as `status` and the daemon
    compare (tailsfw/verify.py): the three cannot disagree."""
    if os.geteuid() != 0:
        raise NeedsRoot("verify needs root to read the kernel's ruleset")
    from . import observe, verify
    from .nft import Nft
    from .policy import PolicyError

    found, _ = observe.daemon(args.bus, args.state_file)
    try:
        ruleset, namespaces = observe.expected(args.policy, found)
        differences = verify.differences(Nft().list_ruleset(), ruleset)
        guests = observe.guests(namespaces, netns(args))
    except PolicyError:
        raise
    except Exception as e:  # libnftables, netlink, a listing nft wrote wrongly: one line
        return fail(CANNOT_TELL, f"cannot verify: {type(e).__name__}: {e}")
    warn(ruleset)
    # Each present namespace's guest side, rule by rule, named by namespace.
    differences += [f"namespace {g.name}: {line}" for g in guests for line in g.differences]
    for line in differences:
        print(line)
    count = len(differences)
    absent = [g.name for g in guests if not g.present]
    print(
        f"tailsfwctl: the kernel holds {'another ruleset' if differences else 'the policy'}: "
        f"{count} difference{'s' * (count != 1)}"
        + (f"; absent: {', '.join(absent)}" if absent else ""),
        file=sys.stderr,
    )
    if differences:
        return 1
    if unread := [g for g in guests if g.note]:  # present, not entered: cannot tell
        return fail(CANNOT_TELL, "; ".join(f"namespace {g.name}: {g.note}" for g in unread))
    return 0


# -- the arguments: added for the command in hand only ---------------------------


def policy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", type=Path, default=DEFAULT_POLICY, help="policy file")


def render_arguments(p: argparse.ArgumentParser) -> None:
    policy_arguments(p)
    p.add_argument("--format", choices=("json", "nft"), default="json")


def bus_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bus", metavar="ADDRESS", help="D-Bus address (default: system bus)")


def daemon_arguments(p: argparse.ArgumentParser) -> None:
    bus_arguments(p)
    p.add_argument(
        "--state-file", type=Path, default=DEFAULT_STATE_FILE,
        help="the daemon's status.json, read when it is not on the bus",
    )  # fmt: skip


def netns_arguments(p: argparse.ArgumentParser) -> None:
    # As tailsfwd's: the lab's namespaces live in /run/netns under a prefix.
    p.add_argument("--netns-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--netns-prefix", default="", help=argparse.SUPPRESS)


def netns(args: argparse.Namespace) -> NetnsPlace:
    from .observe import NetnsPlace

    return NetnsPlace(args.netns_dir, args.netns_prefix)


def verify_arguments(p: argparse.ArgumentParser) -> None:
    policy_arguments(p)
    daemon_arguments(p)
    netns_arguments(p)


def status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", type=Path, help="policy to compare with (default: the daemon's)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    daemon_arguments(p)
    netns_arguments(p)


def drops_arguments(p: argparse.ArgumentParser) -> None:
    from .dropquery import SINCE_HELP

    p.add_argument("--since", metavar="TIME", help=SINCE_HELP)
    p.add_argument("--user", metavar="NAME", help="only this user's (name or uid)")
    p.add_argument("--follow", action="store_true", help="then wait for new ones")
    p.add_argument("--json", action="store_true", help="one JSON object a line")
    p.add_argument("--directory", type=Path, help="read journal files from here")
    p.add_argument(
        "--summary", action="store_true", help="tailsfwd's own counters beside the journal's"
    )
    daemon_arguments(p)  # --bus and --state-file, read for --summary


def explain_arguments(p: argparse.ArgumentParser) -> None:
    from .provecli import explain_arguments

    explain_arguments(p)


def prove_arguments(p: argparse.ArgumentParser) -> None:
    from .provecli import policy_argument

    policy_argument(p)


def cmd_explain(args: argparse.Namespace) -> int:
    from .provecli import cmd_explain

    return cmd_explain(args)


def cmd_prove(args: argparse.Namespace) -> int:
    from .provecli import cmd_prove

    return cmd_prove(args)


class Command:
    """A row of COMMANDS (a plain class: typing's are slow to import)."""

    def __init__(
        self,
        help: str,
        arguments: Callable[[argparse.ArgumentParser], None],
        run: Callable[[argparse.Namespace], int],
    ) -> None:
        self.help, self.arguments, self.run = help, arguments, run


COMMANDS = {
    "render": Command("print the ruleset that would be loaded", render_arguments, cmd_render),
    "apply": Command("load the ruleset in one transaction", policy_arguments, cmd_apply),
    "verify": Command("compare the kernel's tables with the policy", verify_arguments, cmd_verify),
    "status": Command(
        "is the policy's ruleset in force? (exit 0 if so)", status_arguments, cmd_status
    ),
    "reload": Command("ask tailsfwd to adopt its policy file again", bus_arguments, cmd_reload),
    "drops": Command("the refused packets, from the journal", drops_arguments, cmd_drops),
    "explain": Command(
        "what the kernel does with one packet, and which rule says so",
        explain_arguments,
        cmd_explain,
    ),
    "prove": Command(
        "check every class of packet in the kernel against the specification (exit 0 if none"
        " differs)",
        prove_arguments,
        cmd_prove,
    ),
}


def parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser for `argv`: the command named, with its arguments, else every
    command listed (for --help and the error naming the choices): each
    subparser costs ~0.4 ms."""
    p = argparse.ArgumentParser(prog="tailsfwctl", description="Control the Tails network filter.")
    named = [name for name in COMMANDS if name in argv[:1]]
    # With one subparser, the usage line of an error still names every command.
    every = "{" + ",".join(COMMANDS) + "}" if named else None
    sub = p.add_subparsers(dest="command", required=True, metavar=every)
    for name in named or COMMANDS:
        command = COMMANDS[name]
        s = sub.add_parser(name, help=command.help)
        if named:
            command.arguments(s)
        s.set_defaults(run=command.run)
    return p


def main(argv: list[str] | None = None) -> int:
    """Every failure is one line on stderr and an exit status of its own (tailsfwctl(8))."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser(argv).parse_args(argv)
    try:
        return int(args.run(args))
    except BrokenPipeError:  # `tailsfwctl drops | head`: quiet, also at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a person gets one line, never a traceback
        return fail(*failure(e, args.command))


def failure(e: Exception, command: str) -> tuple[int, str]:
    """The exit status and the line for an error.  An error class can only
    have been raised if its module was imported: look only at those."""
    from . import summary

    def raised(module: str, name: str) -> bool:
        loaded = sys.modules.get(f"tailsfw.{module}")
        return loaded is not None and isinstance(e, getattr(loaded, name))

    if raised("policy", "PolicyError"):
        return summary.BAD_POLICY, f"{e}; {UNCHANGED}"
    if isinstance(e, NeedsRoot):
        return summary.NO_PERMISSION, f"{e}; {UNCHANGED}"
    if raised("dropquery", "QueryError"):
        return summary.FAILED, str(e)
    if raised("nft", "NftError"):
        return summary.FAILED, f"nft refused the ruleset: {e}; {UNCHANGED}"
    if raised("observe", "ControlError"):
        return e.code, str(e)  # type: ignore[attr-defined]
    return summary.FAILED, f"{command} failed: {type(e).__name__}: {e}"


def fail(code: int, message: str) -> int:
    print(f"tailsfwctl: {message}", file=sys.stderr)
    return code


def run() -> None:
    """The `tailsfwctl` process: main(), then its exit status at once.

    A command is a short process that makes few cycles: the collector's
    passes over what its imports create cost ~6 ms at the default threshold
    (700); it still collects, less often.  Once main() has returned, every
    command has closed what it opened (in `with` and `finally`: nothing of
    tailsfwctl's relies on atexit or finalizers), so the interpreter's own
    teardown (~15 ms: every module, a last collection) is skipped; the
    kernel frees the rest.  Only stdout is flushed (stderr is line-buffered).
    """
    gc.set_threshold(20_000)
    code = main()
    with contextlib.suppress(BrokenPipeError):  # `tailsfwctl ... | head -1`: quiet, as in main()
        sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
