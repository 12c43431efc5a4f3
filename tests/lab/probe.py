#!/usr/bin/python3
"""One network attempt, reported as one JSON line.

Run by the lab as an unprivileged test user inside the host namespace, so it
uses the standard library only and imports nothing from the project:

    probe.py --proto tcp|udp|icmp|raw|udplite|sctp|dccp --family 4|6 --dst ADDR [--port N]
             [--timeout SECONDS]

Output: ``{"result": R, "ms": elapsed_ms, "detail": str}`` where R is

- ``open``: TCP connected (detail = what the listener sent), or UDP/ICMP got
  a reply (detail = the UDP reply text);
- ``refused``: ECONNREFUSED, or EPERM/EACCES on connect/send (a local reject
  or drop), or an ECONNREFUSED on a UDP receive (ICMP port unreachable), or
  ENETUNREACH (no route: IPv6 switched off on the interface by tailsfwd);
- ``sent``: UDP/ICMP/raw (and udplite, sctp, dccp: raw packets with ports)
  sent without error, no reply within the timeout;
- ``timeout``: TCP connect timed out;
- ``error``: anything else (detail = repr of the exception).

``ms`` is the time until the outcome was known (connect, reply or timeout),
not counting the read of a TCP greeting.
"""

from __future__ import annotations

import argparse
import errno
import json
import socket
import struct
import sys
import time
from dataclasses import dataclass

# An IP protocol number reserved for experiments (RFC 3692): nothing answers.
RAW_PROTOCOL = 253
# Transports with ports, sent as raw packets whose header starts with a
# source and a destination port (what a firewall's `th dport` reads); the
# peer's stack drops them, but its counter sees them arrive.
PORTED_RAW = {"dccp": 33, "sctp": 132, "udplite": 136}
RAW_SOURCE_PORT = 40000
GREETING_MAX = 200
REFUSING_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EPERM, errno.EACCES, errno.ENETUNREACH})


@dataclass(frozen=True)
class Outcome:
    result: str
    ms: float
    detail: str = ""


class Attempt:
    """Measures one attempt from its first system call on."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def done(self, result: str, detail: str = "") -> Outcome:
        elapsed = (time.monotonic() - self.start) * 1000.0
        return Outcome(result, round(elapsed, 2), detail)

    def failed(self, exc: OSError) -> Outcome:
        if exc.errno in REFUSING_ERRNOS:
            return self.done("refused", f"{errno.errorcode[exc.errno]}: {exc}")
        return self.done("error", repr(exc))


def family_of(family: int) -> socket.AddressFamily:
    return socket.AF_INET if family == 4 else socket.AF_INET6


def read_greeting(sock: socket.socket) -> str:
    """Reads until EOF (or the size cap or the timeout).

    Waiting for the listener's FIN means no packet of this connection is still
    on its way when the probe exits, so the lab's packet count is complete.
    """
    data = b""
    try:
        while len(data) < GREETING_MAX:
            chunk = sock.recv(GREETING_MAX - len(data))
            if not chunk:
                break
            data += chunk
    except OSError:
        pass  # what was read so far is the detail; the result is already known
    return data.decode("utf-8", "replace")


def close_with_reset(sock: socket.socket) -> None:
    # Linger on with a zero timeout: close() sends a RST at once instead of a
    # FIN exchange whose packets could be counted during the next probe.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def probe_tcp(family: int, dst: str, port: int, timeout: float) -> Outcome:
    with socket.socket(family_of(family), socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        attempt = Attempt()
        try:
            sock.connect((dst, port))
        except TimeoutError:
            return attempt.done("timeout")
        except OSError as exc:
            return attempt.failed(exc)
        outcome = attempt.done("open")
        greeting = read_greeting(sock)
        close_with_reset(sock)
        return Outcome(outcome.result, outcome.ms, greeting)


def probe_udp(family: int, dst: str, port: int, timeout: float) -> Outcome:
    with socket.socket(family_of(family), socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        attempt = Attempt()
        try:
            # Connected, so that an ICMP port unreachable is reported to us.
            sock.connect((dst, port))
            sock.send(b"probe\n")
            reply = sock.recv(GREETING_MAX)
        except TimeoutError:
            return attempt.done("sent")
        except OSError as exc:
            return attempt.failed(exc)
        return attempt.done("open", reply.decode("utf-8", "replace"))


def probe_icmp(family: int, dst: str, timeout: float) -> Outcome:
    # Unprivileged ping socket: allowed by net.ipv4.ping_group_range (which
    # also governs ICMPv6 ping sockets); the kernel sets the identifier and
    # computes the checksum.
    proto = socket.IPPROTO_ICMP if family == 4 else socket.IPPROTO_ICMPV6
    request, reply_type = (8, 0) if family == 4 else (128, 129)
    with socket.socket(family_of(family), socket.SOCK_DGRAM, proto) as sock:
        sock.settimeout(timeout)
        attempt = Attempt()
        try:
            sock.connect((dst, 0))
            sock.send(struct.pack("!BBHHH", request, 0, 0, 0, 1) + b"tfwlab")
            deadline = attempt.start + timeout
            while True:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                reply = sock.recv(1024)
                if reply and reply[0] == reply_type:
                    return attempt.done("open", f"echo reply from {dst}")
        except TimeoutError:
            return attempt.done("sent")
        except OSError as exc:
            return attempt.failed(exc)


def probe_raw(
    family: int, dst: str, ipproto: int = RAW_PROTOCOL, port: int | None = None
) -> Outcome:
    # Needs CAP_NET_RAW, which the lab grants the test users as an ambient
    # capability; nothing answers protocol 253, so success is "sent".
    header = b"" if port is None else struct.pack("!HH", RAW_SOURCE_PORT, port)
    with socket.socket(family_of(family), socket.SOCK_RAW, ipproto) as sock:
        attempt = Attempt()
        try:
            sock.sendto(header + b"tfwlab\x00\x00", (dst, 0))
        except OSError as exc:
            return attempt.failed(exc)
        return attempt.done("sent")


def run(args: argparse.Namespace) -> Outcome:
    proto: str = args.proto
    if proto in ("tcp", "udp", *PORTED_RAW) and args.port is None:
        raise SystemExit(f"probe.py: --port is required for {proto}")
    if proto == "tcp":
        return probe_tcp(args.family, args.dst, args.port, args.timeout)
    if proto == "udp":
        return probe_udp(args.family, args.dst, args.port, args.timeout)
    if proto == "icmp":
        return probe_icmp(args.family, args.dst, args.timeout)
    if proto in PORTED_RAW:
        return probe_raw(args.family, args.dst, PORTED_RAW[proto], args.port)
    return probe_raw(args.family, args.dst)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="One network attempt.")
    protos = ("tcp", "udp", "icmp", "raw", *PORTED_RAW)
    parser.add_argument("--proto", required=True, choices=protos)
    parser.add_argument("--family", required=True, type=int, choices=(4, 6))
    parser.add_argument("--dst", required=True)
    parser.add_argument("--port", type=int)
    parser.add_argument("--timeout", type=float, default=1.0)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        outcome = run(args)
    except OSError as exc:  # e.g. socket() itself refused: still one JSON line
        outcome = Outcome("error", 0.0, repr(exc))
    print(json.dumps({"result": outcome.result, "ms": outcome.ms, "detail": outcome.detail}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
