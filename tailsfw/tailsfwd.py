"""tailsfwd's composition root: options, logging, the real parts, the D-Bus
service and the watchdog, around the loop of tailsfw/daemon.py."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .accounts import PASSWD, AccountsSource
from .coalesce import MAX_DELAY, QUIET
from .conntrack import cut_in_background
from .daemon import Daemon, Service
from .dropaudit import DropAudit
from .guests import GuestsEffect
from .guestwatch import GuestWatch
from .logflood import RateLimit
from .netlink import RCVBUF, NetlinkSource
from .netnsfiles import NETNS_DIR
from .netnswatch import NetnsWatch
from .nft import Nft, list_in_child
from .nftmonitor import NftMonitor
from .nm import NetworkManagerSource
from .notify import Notifier, watchdog_interval
from .parts import Parts, Settings
from .resolv import ResolvFiles, ResolvWatch
from .service import keep_serving
from .sysctl import DEFAULT_ROOT, Sysctl

log = logging.getLogger("tailsfwd")

DEFAULT_POLICY = Path("/etc/tailsfw/policy.toml")
DEFAULT_STATE_DIR = Path("/run/tailsfw")
DEFAULT_RESOLV_CONF = Path("/etc/resolv.conf")
DEFAULT_CLEARNET_CONF = Path("/etc/resolv-over-clearnet.conf")


@dataclass(frozen=True)
class Options:
    policy: Path = DEFAULT_POLICY
    state_dir: Path = DEFAULT_STATE_DIR
    proc_sys: Path = DEFAULT_ROOT
    quiet: float = QUIET
    max_delay: float = MAX_DELAY
    netlink_rcvbuf: int = RCVBUF
    resolv_conf: Path = DEFAULT_RESOLV_CONF
    clearnet_conf: Path = DEFAULT_CLEARNET_CONF
    passwd: Path = PASSWD
    nm_bus: str | None = None  # NetworkManager's bus address; None: the system bus
    bus: str | None = None  # where our D-Bus service is; None: the system bus
    serve_bus: bool = True
    netns_dir: Path = NETNS_DIR
    netns_prefix: str = ""  # the lab's namespaces are NAME with a run's prefix


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="tailsfwd", description="The Tails network filter daemon.")
    p.add_argument("--policy", type=Path, default=DEFAULT_POLICY, help="policy file")
    p.add_argument(
        "--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="where status.json is kept"
    )
    p.add_argument(
        "--proc-sys", type=Path, default=DEFAULT_ROOT, help="root of the sysctl tree to set"
    )
    p.add_argument("--quiet-ms", type=float, default=QUIET * 1000, help=argparse.SUPPRESS)
    p.add_argument("--max-delay-ms", type=float, default=MAX_DELAY * 1000, help=argparse.SUPPRESS)
    p.add_argument(
        "--resolv-conf", type=Path, default=DEFAULT_RESOLV_CONF, help="kept on Tor's DNS"
    )
    p.add_argument(
        "--clearnet-resolv-conf",
        type=Path,
        default=DEFAULT_CLEARNET_CONF,
        help="NetworkManager's DNS servers, for the clearnet users",
    )
    p.add_argument("--passwd", type=Path, default=PASSWD, help="the account database")
    p.add_argument(
        "--nm-bus", metavar="ADDRESS", help="NetworkManager's D-Bus address (default: system bus)"
    )
    p.add_argument(
        "--bus",
        metavar="ADDRESS",
        help="where to offer org.boum.tails.Firewall (default: the system bus; 'none': nowhere)",
    )
    # Tests shrink it to make the kernel drop events (ENOBUFS) on purpose.
    p.add_argument("--netlink-rcvbuf", type=int, default=RCVBUF, help=argparse.SUPPRESS)
    # The lab's namespaces live in this machine's /run/netns, under a prefix.
    p.add_argument("--netns-dir", type=Path, default=NETNS_DIR, help=argparse.SUPPRESS)
    p.add_argument("--netns-prefix", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return Options(
        policy=args.policy,
        state_dir=args.state_dir,
        proc_sys=args.proc_sys,
        quiet=args.quiet_ms / 1000,
        max_delay=args.max_delay_ms / 1000,
        netlink_rcvbuf=args.netlink_rcvbuf,
        resolv_conf=args.resolv_conf,
        clearnet_conf=args.clearnet_resolv_conf,
        passwd=args.passwd,
        nm_bus=args.nm_bus,
        bus=None if args.bus == "none" else args.bus,
        serve_bus=args.bus != "none",
        netns_dir=args.netns_dir,
        netns_prefix=args.netns_prefix,
    )


def real_parts(options: Options, notify: Notifier) -> Parts:
    """The real outside worlds."""
    files = (options.resolv_conf, options.clearnet_conf)
    guests = GuestWatch()
    nft = Nft()
    return Parts(
        nft=nft,
        list_ruleset=list_in_child,
        netlink=NetlinkSource(options.netlink_rcvbuf),
        sysctl=Sysctl(options.proc_sys),
        notify=notify,
        accounts=AccountsSource(options.passwd),
        sources=[
            ResolvWatch(files),
            NetworkManagerSource(options.nm_bus),
            NftMonitor(probe=nft.probe),
            NetnsWatch(options.netns_dir, options.netns_prefix),
            guests,
        ],
        files=ResolvFiles(*files),
        audit=lambda group: DropAudit(group=group),
        cut_flows=cut_in_background,
        guests=GuestsEffect(options.netns_dir, options.netns_prefix, guests),
    )


def services(options: Options, notify: Notifier) -> list[Service]:
    """What runs beside the loop once the ruleset is in force."""
    found: list[Service] = []
    if options.serve_bus:
        # The bus comes later in boot than we do, and may restart: the
        # service waits for it, and its troubles never stop the daemon.
        found.append(lambda control: keep_serving(control, options.bus))
    interval = watchdog_interval()
    if interval is not None:
        found.append(lambda control: watchdog(notify, interval))
    return found


async def watchdog(notify: Notifier, interval: float) -> None:
    """Pings from the loop: a stuck loop stops them, and systemd restarts us."""
    while True:
        notify(WATCHDOG="1")
        await asyncio.sleep(interval)


def stderr_is_journal() -> bool:
    """True when stderr is systemd's journal stream (see systemd.exec(5))."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(2)
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


def setup_logging() -> None:
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("tailsfwd: %(levelname)s: %(message)s"))
    if stderr_is_journal():
        # The journal reads our stderr anyway: send it structured entries
        # (priority, code location) instead.
        try:
            from systemd.journal import JournalHandler
        except ImportError:
            pass
        else:
            handler = JournalHandler(SYSLOG_IDENTIFIER="tailsfwd")
            handler.setFormatter(logging.Formatter("%(message)s"))  # PRIORITY says the level
    # Whatever another program makes us repeat is summarized, not repeated.
    handler.addFilter(RateLimit())
    debug = bool(os.environ.get("TAILSFWD_DEBUG"))
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO, handlers=[handler], force=True
    )


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    setup_logging()
    notify = Notifier()
    settings = Settings(options.policy, options.state_dir, options.quiet, options.max_delay)
    daemon = Daemon(settings, real_parts(options, notify))
    return asyncio.run(daemon.run(services(options, notify)))


if __name__ == "__main__":
    sys.exit(main())
