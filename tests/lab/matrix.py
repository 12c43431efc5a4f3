"""The leak matrix: every user class against every destination class.

`expected()` is the specification (shared/tails-network-filter.md) written
out case by case, independently of the compiler: the lab proves the loaded
ruleset against it with real connection attempts, and the peer counts every
packet that arrives from the host.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

Outcome = Literal["open", "refused"]

USERS = (
    "amnesia", "root", "clearnet", "debian-tor", "_apt", "proxy", "nobody",
    "tails-upgrade-frontend", "htp", "tails-iuk-get-target-file", "Debian-gdm", "other",
)  # fmt: skip
LAN = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")]
# A refused attempt must fail at once, as in Tails, not time out.
FAST_MS = 200.0


@dataclass(frozen=True)
class Destination:
    name: str
    proto: str  # tcp, udp, icmp, raw, or udplite|sctp|dccp (raw packets with ports)
    family: int
    dst: str
    port: int | None = None

    @property
    def local(self) -> bool:
        return ipaddress.ip_address(self.dst).is_loopback

    @property
    def lan(self) -> bool:
        addr = ipaddress.ip_address(self.dst)
        return any(addr in net for net in LAN)


INTERNET = "198.51.100.10"
INTERNET2 = "203.0.113.10"
INTERNET6 = "2001:db8:1::10"
ROUTER = "192.168.77.1"
ROUTER6 = "2001:db8:77::1"

# Every port the policy names has its neighbours probed too (N-1, N+1): a
# rule widened by one port, or to a whole protocol, shows as an answer.
DESTINATIONS = (
    Destination("internet tcp/443", "tcp", 4, INTERNET, 443),
    Destination("internet tcp/53", "tcp", 4, INTERNET, 53),
    Destination("internet udp/5000", "udp", 4, INTERNET, 5000),
    Destination("internet udp/53", "udp", 4, INTERNET, 53),
    *(
        Destination(f"internet udp/{port}", "udp", 4, INTERNET, port)
        for port in (52, 54, 123)  # beside the direct users' DNS
    ),
    Destination("internet udplite/53", "udplite", 4, INTERNET, 53),
    Destination("internet icmp", "icmp", 4, INTERNET2),
    Destination("internet ipproto 253", "raw", 4, INTERNET2),
    Destination("internet6 tcp/443", "tcp", 6, INTERNET6, 443),
    Destination("internet6 udp/53", "udp", 6, INTERNET6, 53),
    Destination("internet6 icmp", "icmp", 6, INTERNET6),
    Destination("lan6 tcp/5000", "tcp", 6, ROUTER6, 5000),
    Destination("lan tcp/5000", "tcp", 4, ROUTER, 5000),
    Destination("lan udp/5000", "udp", 4, ROUTER, 5000),
    Destination("lan icmp", "icmp", 4, ROUTER),
    Destination("lan dns udp/53", "udp", 4, ROUTER, 53),
    Destination("lan dns tcp/53", "tcp", 4, ROUTER, 53),
    Destination("lan netbios udp/137", "udp", 4, ROUTER, 137),
    *(Destination(f"lan udp/{port}", "udp", 4, ROUTER, port) for port in (52, 54, 136, 138)),
    *(Destination(f"lan tcp/{port}", "tcp", 4, ROUTER, port) for port in (52, 54, 137)),
    # Every transport with ports: a LAN resolver is reached by none.
    Destination("lan udplite/53", "udplite", 4, ROUTER, 53),
    Destination("lan sctp/137", "sctp", 4, ROUTER, 137),
    Destination("lan dccp/53", "dccp", 4, ROUTER, 53),
    Destination("lan udplite/5000", "udplite", 4, ROUTER, 5000),
    Destination("lan ipproto 253", "raw", 4, ROUTER),
    *(
        Destination(f"127.0.0.1 tcp/{port}", "tcp", 4, "127.0.0.1", port)
        for port in (9050, 9062, 9063, 9040, 9052, 951, 4101, 631, 8000)
    ),
    *(
        Destination(f"127.0.0.1 tcp/{port}", "tcp", 4, "127.0.0.1", port)
        for port in (9049, 9051, 9053, 9061, 9064, 950, 952, 4100, 4102)
    ),
    Destination("127.0.0.1 udp/53 (dns)", "udp", 4, "127.0.0.1", 53),
    Destination("127.0.0.1 udp/5353", "udp", 4, "127.0.0.1", 5353),
    # Only port 53 is redirected to Tor's DNS port; nothing else is allowed.
    *(
        Destination(f"127.0.0.1 udp/{port}", "udp", 4, "127.0.0.1", port)
        for port in (52, 54, 123, 5352, 5354)
    ),
    Destination("automap tcp/80", "tcp", 4, "127.192.0.5", 80),
    Destination("::1 tcp/4101", "tcp", 6, "::1", 4101),
    Destination("::1 tcp/4100", "tcp", 6, "::1", 4100),
    Destination("::1 tcp/4102", "tcp", 6, "::1", 4102),
)
# Sent without an answer to wait for: "sent" (and counted at the peer) is open.
UNANSWERED = {"raw", "udplite", "sctp", "dccp"}

# Tails rule 2, new TCP to 127.0.0.1: who may, who is rejected; then "any
# other port: amnesia".
LOCAL_TCP_ALLOW = {
    9050: {"_apt", "proxy", "nobody", "tails-upgrade-frontend"},
    9062: {"htp", "tails-upgrade-frontend"},
    9063: {"tails-iuk-get-target-file"},
    9052: {"root"},
    951: {"root"},
    4101: {"Debian-gdm"},
}
LOCAL_TCP_REJECT = {9063: {"amnesia"}, 9052: {"amnesia"}}
LOCAL_DNS_ALLOW = {"amnesia", "htp", "root"}
DIRECT = {"clearnet", "debian-tor"}
# Tails rule 5's exceptions: TCP's and UDP's own, and both on the other
# transports with ports.
LAN_REFUSED = {
    "tcp": {53},
    "udp": {53, 137},
    **dict.fromkeys(("udplite", "sctp", "dccp"), frozenset({53, 137})),
}


def after_nat(d: Destination) -> int | None:
    """The port the filter sees: the nat redirects come first."""
    if d.proto == "tcp" and ipaddress.ip_address(d.dst) in ipaddress.ip_network("127.192.0.0/10"):
        return 9040
    if d.proto == "udp" and d.dst == "127.0.0.1" and d.port == 53:
        return 5353
    return d.port


def expected(user: str, d: Destination) -> Outcome:
    if d.family == 6:
        # Only the accessibility daemon on ::1, for amnesia and Debian-gdm.
        ok = d.dst == "::1" and d.port == 4101 and user in {"amnesia", "Debian-gdm"}
        return "open" if ok else "refused"
    port = after_nat(d)
    if d.local:
        if d.proto == "tcp":
            if user in LOCAL_TCP_ALLOW.get(port or 0, set()):
                return "open"
            if user in LOCAL_TCP_REJECT.get(port or 0, set()):
                return "refused"
            # amnesia: any other port; debian-tor: new TCP on any interface.
            return "open" if user in {"amnesia", "debian-tor"} else "refused"
        ok = d.proto == "udp" and port == 5353 and user in LOCAL_DNS_ALLOW
        return "open" if ok else "refused"
    if user in DIRECT and (d.proto == "tcp" or (d.proto == "udp" and port == 53)):
        return "open"  # Tails rules 3 and 4
    if d.lan:
        return "refused" if port in LAN_REFUSED.get(d.proto, set()) else "open"
    return "refused"


class ProbeResultLike(Protocol):
    @property
    def result(self) -> str: ...
    @property
    def ms(self) -> float: ...
    @property
    def detail(self) -> str: ...
    @property
    def arrived(self) -> int: ...


class Prober(Protocol):
    def probe(
        self, role: str, proto: str, family: int, dst: str, port: int | None = None,
        timeout: float = 1.0,
    ) -> ProbeResultLike: ...  # fmt: skip


@dataclass(frozen=True)
class Case:
    user: str
    destination: Destination
    expected: Outcome
    result: str
    ms: float
    detail: str
    arrived: int

    @property
    def problem(self) -> str | None:
        """What is wrong with this case, or None when it behaved as specified."""
        d = self.destination
        if self.expected == "refused":
            if self.arrived:
                return f"LEAK: {self.arrived} packet(s) reached the peer"
            if self.result != "refused":
                return f"expected refused, got {self.result} ({self.detail})"
            if self.ms > FAST_MS:
                return f"refused only after {self.ms:.0f} ms"
            return None
        if self.result != "open" and not (d.proto in UNANSWERED and self.result == "sent"):
            return f"expected open, got {self.result} ({self.detail})"
        if d.local and self.arrived:
            return f"LEAK: local traffic, yet {self.arrived} packet(s) reached the peer"
        if not d.local and not self.arrived:
            return "open, but nothing reached the peer"
        if d.proto == "tcp" and d.local and not self.detail.startswith(str(after_nat(d))):
            return f"reached the wrong listener: {self.detail!r}"
        return None


def run(lab: Prober, users: Iterable[str] = USERS) -> list[Case]:
    cases = []
    for user in users:
        for d in DESTINATIONS:
            r = lab.probe(user, d.proto, d.family, d.dst, d.port, timeout=1.0)
            cases.append(Case(user, d, expected(user, d), r.result, r.ms, r.detail, r.arrived))
    return cases


def table(cases: list[Case]) -> str:
    """Destinations down, users across: `ok` or `OPEN` per case, `!!` on a problem."""
    users = list(dict.fromkeys(c.user for c in cases))
    by = {(c.user, c.destination.name): c for c in cases}
    width = max(len(d.name) for d in DESTINATIONS)
    short = {u: u.replace("tails-", "t-").replace("-target-file", "")[:10] for u in users}
    lines = [" " * width + " | " + " ".join(f"{short[u]:>10}" for u in users)]
    for d in DESTINATIONS:
        cells = []
        for u in users:
            c = by.get((u, d.name))
            cell = "-" if c is None else ("open" if c.expected == "open" else "refused")
            if c is not None and c.problem:
                cell = "!! " + c.result
            cells.append(f"{cell:>10}")
        lines.append(f"{d.name:<{width}} | " + " ".join(cells))
    problems = [c for c in cases if c.problem]
    leaks = sum(1 for c in problems if c.arrived and c.expected == "refused")
    lines.append(
        f"\n{len(cases)} cases, {len(problems)} problems, {leaks} leaks "
        f"(packets that reached the peer when they should not have)"
    )
    lines += [f"  !! {c.user} -> {c.destination.name}: {c.problem}" for c in problems]
    return "\n".join(lines)
