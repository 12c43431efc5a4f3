"""The Tor act of `make demo`: a real Tor behind tailsfw (docs/tor-lab.md).

``tor_act(lab)`` takes a built lab (it loads the default policy itself,
unless told that tailsfwd keeps it in force;
without tor, dnsmasq or curl it says so and returns),
brings up the private Tor network and the Tor client, shows the desktop
user's fetch through Tor, the same fetch refused without it, the circuit's
relays (from Tor's control port) and the watch's count of what left the
host; everything it started is gone when it returns.

``python -m tests.lab.tor_demo`` runs the act alone, in a lab of its own.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from tests.lab.names import temp_prefix
from tests.lab.policies import CTL, LAB_ROLES, lab_policy
from tests.lab.topology import HOST_V4, UNAVAILABLE, Lab
from tests.lab.tor_network import (
    EXIT,
    RELAYS,
    WEB_NAME,
    WEB_V4,
    built_circuits,
    curl,
    missing_tools,
    refused_packets,
    through_tor,
    tor_client,
    tor_lab,
)


def say(line: str) -> None:
    print(f"tor: {line}", flush=True)


def tor_act(lab: Lab, apply: bool = True) -> None:
    """`apply` False: the policy is in force already (tailsfwd runs)."""
    missing = missing_tools()
    if missing:
        say(f"act skipped: missing {', '.join(missing)} (Debian: tor, dnsmasq, curl)")
        return
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=temp_prefix("tor-demo")) as tmp:
        if apply:
            policy = lab_policy(lab, Path(tmp) / "policy.toml")
            lab.host([*CTL, "apply", "--policy", str(policy)])
        with tor_lab(lab) as network:
            relays = ", ".join(f"{r.nick} {r.address}" for r in RELAYS)
            say(f"private Tor network in {lab.peer_ns}: {relays}")
            say(f"the Internet: http://{WEB_V4}/ ({WEB_NAME}), its DNS on the same network")
            with tor_client(network) as client:
                say(
                    f"network up, and the Tor client (as {lab.account('debian-tor').name})"
                    f" bootstrapped behind tailsfw, {network.bootstrap_seconds or 0:.1f} s after"
                    " the first key was made"
                )
                before = network.watch.totals()
                code, page, seconds = through_tor(lab, "amnesia", f"http://{WEB_NAME}/")
                outcome = f"{page.strip()!r}" if code == 0 else f"FAILED (curl {code}: {page})"
                ms = seconds * 1000
                say(f"amnesia, through Tor: http://{WEB_NAME}/ -> {outcome} in {ms:.0f} ms")
                clients = network.web_clients()
                seen = clients[-1] if clients else "nothing"
                say(f"  the web server logged it from {seen} ({EXIT.nick}), not {HOST_V4}")
                refused = refused_packets(lab)
                code, error, seconds = curl(lab, "amnesia", f"http://{WEB_V4}/")
                verdict = "refused" if code == 7 else f"NOT REFUSED (curl {code})"
                ms = seconds * 1000
                say(
                    f"amnesia, without Tor: http://{WEB_V4}/ -> {verdict} in {ms:.0f} ms"
                    f" ({error.strip()}); refuse counter +{refused_packets(lab) - refused}"
                )
                with client.control() as control:
                    circuits = built_circuits(control)
                addresses = {r.nick: r.address for r in RELAYS}
                for hops in (c for c in circuits if len(c) == 3):
                    say("circuit: " + " -> ".join(f"{n} ({addresses.get(n, '?')})" for n in hops))
                leaks = network.watch.since(before)
                say(
                    f"packets from the host meanwhile: {leaks.tor} Tor to its relays,"
                    f" {leaks.from_host} to anything else; {leaks.not_tor_user} from other users;"
                    f" {leaks.outside_lab} from the network to outside the lab"
                )
    say(f"(act done, everything removed, in {time.monotonic() - start:.1f} s)")


def main() -> int:
    if UNAVAILABLE:
        print(UNAVAILABLE, file=sys.stderr)
        return 2
    with Lab(LAB_ROLES) as lab:
        tor_act(lab)
    return 0


if __name__ == "__main__":
    sys.exit(main())
