#!/usr/bin/python3
"""The lab's web server: "the Internet" for the Tor tests.

    webserver.py ADDR PORT DIRECTORY

Serves DIRECTORY and logs one line per request, starting with the client's
address, to stdout. Unlike ``python3 -m http.server`` it looks up no name (that
one asks the machine's resolver for its own address's name on start), so it
sends nothing but its answers. Standard library only.
"""

from __future__ import annotations

import functools
import sys
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer


class Server(ThreadingHTTPServer):
    def server_bind(self) -> None:
        TCPServer.server_bind(self)  # without HTTPServer's getfqdn()
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class Handler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        print(f"{self.client_address[0]} {format % args}", flush=True)


def main(argv: list[str]) -> int:
    address, port, directory = argv
    handler = functools.partial(Handler, directory=directory)
    with Server((address, int(port)), handler) as server:
        print("ready", flush=True)
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
