"""The Tor act of `make demo`: a real Tor behind tailsfw (docs/tor-lab.md).

``tor_act(lab)`` takes a built lab (it loads the default policy itself,
unless told that tailsfwd keeps it in force, following the lab's
namespaces; without tor, dnsmasq or curl it says so and returns),
brings up the private Tor network, the Tor Browser's namespace (tbb, as
Tails 7 makes it once the firewall is up) and the Tor client (also on
``SocksPort 10.200.1.1:9050``), shows the desktop user's fetch through Tor,
the same from inside tbb, the same fetch refused without Tor, the circuit's
relays (from Tor's control port) and the watch's count of what left the
host; everything it started is gone when it returns.

``python -m tests.lab.tor_demo`` runs the act alone, in a lab of its own.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from tests.lab.appns import AppNamespaces, tor_browser_namespace
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


def fetch_in_tbb(lab: Lab, apps: AppNamespaces) -> None:
    """Tor Browser's fetch, from inside tbb, through 127.0.0.1:9050 (the DNAT)."""
    ns = apps.named("tbb")
    code, page, seconds = through_tor(lab, "amnesia", f"http://{WEB_NAME}/", apps.netns(ns))
    outcome = f"{page.strip()!r}" if code == 0 else f"FAILED (curl {code}: {page})"
    say(
        f"amnesia in tbb ({ns.guest}), through 127.0.0.1:9050 -> Tor at {ns.host}:9050:"
        f" http://{WEB_NAME}/ -> {outcome} in {seconds * 1000:.0f} ms"
    )
    code, error, _ = curl(lab, "amnesia", f"http://{WEB_V4}/", namespace=apps.netns(ns))
    verdict = "fails" if code != 0 else "NOT REFUSED"
    say(f"amnesia in tbb, without Tor: http://{WEB_V4}/ -> {verdict} ({error.strip()})")
    ports = [f"{port} {apps.probe(ns, 'tcp', str(ns.host), port).result}" for port in (9052, 9062)]
    say(f"  tbb to the host's listeners at {ns.host} beside Tor's: {', '.join(ports)}")


def tor_act(lab: Lab, apply: bool = True) -> None:
    """`apply` False: the policy is in force already (tailsfwd runs, with
    ``--netns-prefix appns.netns_prefix(lab)``)."""
    missing = missing_tools()
    if missing:
        say(f"act skipped: missing {', '.join(missing)} (Debian: tor, dnsmasq, curl)")
        return
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=temp_prefix("tor-demo")) as tmp:
        policy = lab_policy(lab, Path(tmp) / "policy.toml")
        if apply:
            lab.host([*CTL, "apply", "--policy", str(policy)])
        with tor_lab(lab) as network, tor_browser_namespace(lab, policy, not apply) as apps:
            relays = ", ".join(f"{r.nick} {r.address}" for r in RELAYS)
            say(f"private Tor network in {lab.peer_ns}: {relays}")
            say(f"the Internet: http://{WEB_V4}/ ({WEB_NAME}), its DNS on the same network")
            tbb = apps.named("tbb")
            by = "tailsfwd" if not apply else "the demo, by hand (no tailsfwd)"
            say(
                f"Tor Browser's namespace {apps.netns(tbb)} made (veth-tbb {tbb.host},"
                f" veth0 {tbb.guest}); its guest rules put in force by {by}"
            )
            with tor_client(network, namespace_hosts=[str(tbb.host)]) as client:
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
                fetch_in_tbb(lab, apps)
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
                    f" {leaks.from_host} to anything else; {leaks.not_tor_user} from other users,"
                    f" {leaks.forwarded} forwarded; {leaks.outside_lab} from the network to"
                    " outside the lab"
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
