#!/usr/bin/python3
"""One DNS query over UDP, for the lab's tests, run as a test user.

    dnsquery.py SERVER PORT NAME [TIMEOUT]

Prints one JSON line: ``{"result": R, "ms": M, "addresses": [...], "detail": D}``
with R one of ``answer`` (a reply came; addresses holds its A records),
``refused`` (ECONNREFUSED, or EPERM from a local reject), ``timeout`` or
``error``. Standard library only: it runs from the lab's copy.
"""

from __future__ import annotations

import errno
import json
import secrets
import socket
import struct
import sys
import time

TYPE_A = 1
CLASS_IN = 1


def query(name: str) -> tuple[int, bytes]:
    ident = secrets.randbelow(1 << 16)
    header = struct.pack("!6H", ident, 0x0100, 1, 0, 0, 0)  # recursion desired
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split("."))
    return ident, header + labels + b"\0" + struct.pack("!2H", TYPE_A, CLASS_IN)


def skip_name(message: bytes, offset: int) -> int:
    while True:
        length = message[offset]
        if length & 0xC0 == 0xC0:  # a compression pointer ends the name
            return offset + 2
        if length == 0:
            return offset + 1
        offset += 1 + length


def a_records(message: bytes, ident: int) -> tuple[int, list[str]]:
    """The reply's rcode and its A records' addresses."""
    rid, flags, qdcount, ancount = struct.unpack_from("!4H", message)
    if rid != ident:
        raise ValueError(f"reply for query {rid}, not {ident}")
    offset = 12
    for _ in range(qdcount):
        offset = skip_name(message, offset) + 4
    addresses = []
    for _ in range(ancount):
        offset = skip_name(message, offset)
        rtype, _, _, length = struct.unpack_from("!2HIH", message, offset)
        offset += 10
        if rtype == TYPE_A and length == 4:
            addresses.append(socket.inet_ntoa(message[offset : offset + 4]))
        offset += length
    return flags & 0xF, addresses


def main(argv: list[str]) -> int:
    server, port, name = argv[0], int(argv[1]), argv[2]
    timeout = float(argv[3]) if len(argv) > 3 else 2.0
    ident, packet = query(name)
    report: dict[str, object] = {"addresses": [], "detail": ""}
    start = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((server, port))
            sock.send(packet)
            reply = sock.recv(4096)
            rcode, addresses = a_records(reply, ident)
            report.update(result="answer", addresses=addresses, detail=f"rcode {rcode}")
        except TimeoutError:
            report["result"] = "timeout"
        except OSError as exc:
            refused = exc.errno in (errno.ECONNREFUSED, errno.EPERM, errno.EACCES)
            report.update(result="refused" if refused else "error", detail=str(exc))
        except ValueError as exc:
            report.update(result="error", detail=str(exc))
    report["ms"] = round((time.monotonic() - start) * 1000, 1)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
