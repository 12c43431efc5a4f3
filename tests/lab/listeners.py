#!/usr/bin/python3
"""TCP and UDP listeners for the lab, in one thread.

    listeners.py --tcp ADDR:PORT ... --udp ADDR:PORT ...   (IPv6: [::1]:4101)

Prints ``ready`` once every socket is bound, then serves until SIGTERM:

- TCP: on accept, sends ``"<local port> <original destination>\\n"`` and
  closes. The original destination is read with SO_ORIGINAL_DST (IPv4 only),
  so a connection that the firewall's nat redirected here tells where it was
  going (``9040 198.51.100.10:80``); for IPv6, or without conntrack, it is the
  local address. IPv6 addresses are written in brackets (``[::1]:4101``).
- UDP: answers each datagram with ``"<local port>\\n"``, from the address it
  was sent to (each address is bound separately, so a connected client
  accepts the reply).

Standard library only: it runs from the lab's copy outside the project.
"""

from __future__ import annotations

import argparse
import selectors
import signal
import socket
import struct
import sys
from contextlib import suppress
from types import FrameType

SO_ORIGINAL_DST = 80  # from linux/netfilter_ipv4.h; the socket module lacks it


def parse_endpoint(text: str) -> tuple[socket.AddressFamily, str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"not ADDR:PORT: {text!r}")
    if host.startswith("[") and host.endswith("]"):
        return socket.AF_INET6, host[1:-1], int(port)
    return socket.AF_INET, host, int(port)


def format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind(
    family: socket.AddressFamily, kind: socket.SocketKind, host: str, port: int
) -> socket.socket:
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        # Lets [::]:P and 0.0.0.0:P be bound side by side.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    if kind == socket.SOCK_STREAM:
        sock.listen(64)
    sock.setblocking(False)
    return sock


def original_destination(conn: socket.socket) -> str:
    local = conn.getsockname()
    if conn.family == socket.AF_INET:
        try:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, packed = struct.unpack_from("!2xH4s", raw)
            return format_endpoint(socket.inet_ntoa(packed), port)
        except OSError:
            pass  # no conntrack entry: the connection was not translated
    return format_endpoint(local[0], local[1])


def serve_tcp(listener: socket.socket) -> None:
    try:
        conn, _ = listener.accept()
    except OSError:
        return  # the client gave up (RST) before we got to it
    with conn:
        conn.settimeout(1.0)
        line = f"{conn.getsockname()[1]} {original_destination(conn)}\n"
        with suppress(OSError):  # the client may have reset it already
            conn.sendall(line.encode())


def serve_udp(sock: socket.socket) -> None:
    try:
        _, peer = sock.recvfrom(2048)
        sock.sendto(f"{sock.getsockname()[1]}\n".encode(), peer)
    except OSError:
        pass  # e.g. an ICMP error queued on the socket: nothing to answer


def stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Lab TCP/UDP listeners.")
    parser.add_argument("--tcp", action="append", default=[], type=parse_endpoint)
    parser.add_argument("--udp", action="append", default=[], type=parse_endpoint)
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, stop)
    selector = selectors.DefaultSelector()
    for kind, endpoints, handler in (
        (socket.SOCK_STREAM, args.tcp, serve_tcp),
        (socket.SOCK_DGRAM, args.udp, serve_udp),
    ):
        for family, host, port in endpoints:
            selector.register(bind(family, kind, host, port), selectors.EVENT_READ, handler)
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            key.data(key.fileobj)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
