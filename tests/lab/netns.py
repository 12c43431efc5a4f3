"""Network namespaces of the lab's own: made, entered, and removed.

`ip netns exec` runs a whole command inside one; `enter_netns` moves only
the calling thread, so that this process can make sockets that belong to a
namespace (`netns_socket`) or run a piece of work there (`in_netns`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from tests.lab.command import run
from tests.lab.names import SCRATCH_NS, owned_name

T = TypeVar("T")
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000


def delete_namespace(namespace: str) -> None:
    # A namespace lives on while a process is inside it, and a crashed run's
    # listeners would keep running unseen: end them first, by pid.
    pids = run(["ip", "netns", "pids", namespace]).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    run(["ip", "netns", "delete", namespace])


def delete_if_present(namespace: str) -> None:
    """For clean-ups registered before the namespace is made (a command
    that timed out may still have made it)."""
    if (NETNS_DIR / namespace).exists():
        delete_namespace(namespace)


@contextlib.contextmanager
def scratch_namespace(prefix: str = SCRATCH_NS) -> Iterator[str]:
    """A namespace of our own with loopback up, deleted on exit with
    whatever still runs in it."""
    name = owned_name(prefix)
    try:
        # Inside the try: an `ip netns add` that times out on a loaded
        # machine may still have made the namespace (seen: two were left).
        run(["ip", "netns", "add", name])
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        yield name
    finally:
        delete_if_present(name)


def enter_netns(namespace: str) -> None:
    """Moves the calling thread (only) into a named network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_DIR / namespace, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {namespace}: {os.strerror(err)}")
    finally:
        os.close(fd)


def in_netns(namespace: str, work: Callable[[], T]) -> T:
    """`work()` run by a short-lived thread of this process inside a namespace."""
    done: list[T] = []
    errors: list[BaseException] = []

    def run_inside() -> None:
        try:
            enter_netns(namespace)
            done.append(work())
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run_inside)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return done[0]


def netns_socket(namespace: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket that belongs to a named network namespace.

    setns() moves only the calling thread, so a short-lived thread enters
    the namespace and makes the socket; the socket stays in that namespace
    whichever thread uses it later.
    """
    return in_netns(namespace, lambda: socket.socket(family, kind, proto))
