"""The guests' change notifications, read by the loop: another process's
transaction on a guest's tailsfw table makes one `GuestTouched`, and the
guests effect does that guest again.  The sockets here are socket pairs fed
with nftables' message layout (tests/unit/test_nftmonitor.py); the lab
reads real ones inside real namespaces (tests/lab/test_netns_live.py)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tailsfw import guests, guestwatch, policy
from tailsfw.desired import Desired
from tailsfw.events import GuestTouched
from tailsfw.facts import Facts
from tailsfw.guests import GuestsEffect
from tailsfw.guestwatch import GuestWatch
from tailsfw.netnsfiles import NetnsId
from tailsfw.nsrules import Guest

from .daemon_fakes import DEFAULT
from .test_nftmonitor import newgen, rule

TBB = NetnsId(9, 1, 1)
IP = 2


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    yield ours, kernel
    ours.close()
    kernel.close()


def test_another_process_touching_a_guests_table_is_one_event(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, kernel = pair
    watch = GuestWatch()

    async def scenario() -> list[GuestTouched]:
        watch.follow("tbb", TBB, ours)
        events = watch.events()
        kernel.send(rule(6, IP, "output", 7) + newgen(4242, "nft"))
        kernel.send(rule(6, IP, "output", 8) + newgen(4243, "nft"))  # unfollowed by then
        found = [await asyncio.wait_for(anext(events), 1.0)]
        with pytest.raises(TimeoutError):
            found.append(await asyncio.wait_for(anext(events), 0.2))
        return found

    (event,) = asyncio.run(scenario())
    assert (event.name, event.identity, event.pid, event.process) == ("tbb", TBB, 4242, "nft")
    assert "output" in event.what
    assert ours.fileno() == -1  # one is enough: the socket is closed


def test_other_tables_are_not_ours_to_watch(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, kernel = pair
    watch = GuestWatch()

    async def scenario() -> None:
        watch.follow("tbb", TBB, ours)
        events = watch.events()
        kernel.send(rule(6, IP, "output", 7, table="filter") + newgen(4242))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(events), 0.2)
        watch.unfollow_all_but({})

    asyncio.run(scenario())
    assert ours.fileno() == -1


def test_the_socket_is_read_past_our_own_commit_only(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Opened before our commit: another's change before it (which our
    full replacement undid) and our own are read away; one after it stays."""
    ours, kernel = pair
    before = rule(6, IP, "output", 7) + newgen(4242)
    own = rule(6, IP, "output", 8) + newgen(777)
    after = rule(8, IP, "output", 8) + newgen(4243)
    for datagram in (before, own, after):
        kernel.send(datagram)
    guestwatch.past_own_commit(ours, (777, "tfw0"))
    assert ours.recv(65536) == after
    with pytest.raises(OSError, match="lost"):
        guestwatch.past_own_commit(ours, (777, "tfw0"))  # never seen: the buffer overflowed
    # In a container the kernel names our thread by its id outside: by its name, then.
    kernel.send(rule(6, IP, "output", 9) + newgen(31337, "tfw0"))
    guestwatch.past_own_commit(ours, (777, "tfw0"))


def test_a_touched_guest_is_done_again_and_a_stale_event_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The effect's side: it closes a guest's socket before its own commit
    there, and follows the new one it is handed after."""
    handed: list[socket.socket] = []

    def put_in_force(path: Path, guest: Guest, follow: bool) -> socket.socket:
        assert follow
        assert all(s.fileno() == -1 for s in handed), "our own commit would be read"
        ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        kernel.close()
        handed.append(ours)
        return ours

    monkeypatch.setattr(guests, "put_in_force", put_in_force)
    desired = Desired(policy.load(DEFAULT), Facts(netns=(("tbb", TBB),)))

    async def scenario() -> list[bool]:
        effect = GuestsEffect(tmp_path, watch=GuestWatch())
        assert effect.converge(desired)
        stale = GuestTouched("tbb", NetnsId(9, 1, 0), 4242, "nft", "x")
        touched = GuestTouched("tbb", TBB, 4242, "nft", "x")
        results = [effect.touched(stale), effect.touched(touched), effect.touched(touched)]
        assert effect.converge(desired)  # done again
        assert handed[0].fileno() == -1 and handed[1].fileno() != -1
        effect.forget()
        assert handed[1].fileno() == -1
        return results

    assert asyncio.run(scenario()) == [False, True, False]
