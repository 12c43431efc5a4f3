"""The nftables notification decoder and the transaction summary, on crafted bytes."""

from __future__ import annotations

import asyncio
import errno
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tailsfw import nftmonitor
from tailsfw.events import RulesetTouched
from tailsfw.nftmonitor import (
    Change,
    Generation,
    Transactions,
    Unreadable,
    decode,
    summarize,
)

IP, IP6, INET, ARP = 2, 10, 1, 3
NEWTABLE, DELTABLE, NEWCHAIN, DELCHAIN, NEWRULE, DELRULE = 0, 2, 3, 5, 6, 8
NEWSET, NEWSETELEM, DELSETELEM, NEWGEN = 9, 12, 14, 15
OWN = 4242


def attr(kind: int, value: bytes) -> bytes:
    data = struct.pack("=HH", 4 + len(value), kind) + value
    return data + b"\0" * (-len(data) % 4)


def name(text: str) -> bytes:
    return text.encode() + b"\0"


def be(value: int, size: int = 4) -> bytes:
    return value.to_bytes(size, "big")


def message(msg: int, family: int, *attrs: bytes, subsys: int = 10) -> bytes:
    body = struct.pack("=BBH", family, 0, 0) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), (subsys << 8) | msg, 0, 1, 0) + body


def table(msg: int, family: int, table: str = "tailsfw") -> bytes:
    return message(msg, family, attr(1, name(table)))


def chain(msg: int, family: int, chain: str, policy: int | None = None) -> bytes:
    attrs = [attr(1, name("tailsfw")), attr(3, name(chain))]
    if policy is not None:
        attrs.append(attr(5, be(policy)))
    return message(msg, family, *attrs)


def rule(msg: int, family: int, chain: str, handle: int, table: str = "tailsfw") -> bytes:
    return message(msg, family, attr(1, name(table)), attr(2, name(chain)), attr(3, be(handle, 8)))


def elements(msg: int, family: int, set_name: str, *ends: bool) -> bytes:
    """One element per entry of `ends`; True marks an interval's end."""
    elems = b"".join(
        attr(1 | 0x8000, attr(1, attr(1, b"\x0a\0\0\0")) + (attr(3, be(1)) if end else b""))
        for end in ends
    )
    return message(msg, family, attr(1, name("tailsfw")), attr(2, name(set_name)), attr(3, elems))


def newgen(pid: int, process: str = "nft") -> bytes:
    return message(NEWGEN, 0, attr(1, be(7)), attr(2, be(pid)), attr(3, name(process)))


def events(*datagrams: bytes) -> list[RulesetTouched]:
    transactions = Transactions("tailsfw", lambda pid: pid == OWN)
    found = []
    for data in datagrams:
        for notice in decode(data):
            event = transactions.feed(notice)
            if event is not None:
                found.append(event)
    return found


# -- decode ------------------------------------------------------------------


def test_each_kind_of_message_is_decoded() -> None:
    data = b"".join([
        table(DELTABLE, IP),
        chain(NEWCHAIN, IP, "output", policy=1),
        rule(NEWRULE, IP6, "output", 54),
        elements(NEWSETELEM, IP, "lan", False, True, False),
        message(NEWSET, INET, attr(1, name("tailsfw")), attr(2, name("s"))),
        newgen(1234, "evil"),
    ])  # fmt: skip
    assert decode(data) == [
        Change("delete", "table", IP, "tailsfw"),
        Change("add", "chain", IP, "tailsfw", "output", detail="policy accept"),
        Change("add", "rule", IP6, "tailsfw", "output", handle=54),
        Change("add", "element", IP, "tailsfw", "lan", count=2),
        Change("add", "set", INET, "tailsfw", "s"),
        Generation(1234, "evil"),
    ]


def test_messages_of_other_subsystems_and_kinds_are_skipped() -> None:
    trace = message(17, IP, attr(1, name("tailsfw")))  # NFT_MSG_TRACE
    conntrack = message(0, IP, attr(1, name("x")), subsys=1)
    assert decode(trace + conntrack + newgen(1)) == [Generation(1, "nft")]


def test_a_truncated_datagram_is_unreadable_not_an_exception() -> None:
    data = table(DELTABLE, IP) + newgen(1234)
    for cut in range(1, len(data)):
        notices = decode(data[:cut])
        # What came whole is kept; the cut message is named, nothing else.
        assert isinstance(notices[-1], Unreadable) or cut == len(table(DELTABLE, IP))


def test_a_bad_attribute_length_is_unreadable() -> None:
    bad = message(DELTABLE, IP, struct.pack("=HH", 2, 1))  # shorter than its header
    assert decode(bad) == [Unreadable(f"message type {0xA02:#x}: attribute of length 2 at byte 20")]
    over = message(DELTABLE, IP, struct.pack("=HH", 64, 1) + b"tailsfw\0")
    assert isinstance(decode(over)[0], Unreadable)


def test_a_message_without_its_nfgenmsg_is_unreadable() -> None:
    short = struct.pack("=IHHII", 18, (10 << 8) | DELTABLE, 0, 0, 0) + b"\0\0"
    assert isinstance(decode(short)[0], Unreadable)


def test_an_overrun_is_unreadable() -> None:
    overrun = struct.pack("=IHHII", 16, 4, 0, 0, 0)
    assert decode(overrun) == [Unreadable("the kernel reported an overrun")]


def test_names_that_are_not_utf8_do_not_raise() -> None:
    data = message(DELTABLE, IP, attr(1, b"tails\xfffw\0"))
    assert decode(data) == [Change("delete", "table", IP, "tails\ufffdfw")]


@given(st.binary(max_size=512))
def test_random_bytes_never_raise(data: bytes) -> None:
    for notice in decode(data):
        assert isinstance(notice, Change | Generation | Unreadable)


@given(st.binary(max_size=64), st.integers(min_value=0, max_value=200))
def test_a_valid_datagram_with_garbage_never_raises(garbage: bytes, at: int) -> None:
    data = table(DELTABLE, IP) + rule(NEWRULE, IP, "output", 1) + newgen(1234)
    at = min(at, len(data))
    decode(data[:at] + garbage + data[at:])


# -- transactions ------------------------------------------------------------


def test_a_foreign_commit_is_one_event_with_its_process() -> None:
    found = events(table(DELTABLE, IP), newgen(1234, "nft"))
    assert found == [RulesetTouched(1234, "nft", "deleted table ip tailsfw")]


def test_a_transaction_split_over_datagrams_is_one_event() -> None:
    found = events(rule(DELRULE, IP, "output", 3), rule(DELRULE, IP, "output", 4), newgen(9))
    assert found == [RulesetTouched(9, "nft", "deleted 2 rules from ip tailsfw output")]


def test_our_own_commits_are_ignored() -> None:
    assert events(table(DELTABLE, IP), table(NEWTABLE, IP), newgen(OWN, "tailsfwd")) == []


def test_other_tables_and_families_are_ignored() -> None:
    other = rule(NEWRULE, IP, "output", 1, table="other")
    arp = message(DELTABLE, ARP, attr(1, name("tailsfw")))
    assert events(other + arp + newgen(1234)) == []


def test_a_table_made_dormant_is_named() -> None:
    dormant = message(NEWTABLE, IP, attr(1, name("tailsfw")), attr(2, be(1)))
    found = events(dormant, newgen(1234))
    assert found == [RulesetTouched(1234, "nft", "added table ip tailsfw (dormant)")]


def test_destroy_messages_are_deletions() -> None:
    found = events(table(26, IP6), newgen(1234))  # NFT_MSG_DESTROYTABLE
    assert found == [RulesetTouched(1234, "nft", "deleted table ip6 tailsfw")]


def test_an_inet_table_named_like_ours_is_reported() -> None:
    found = events(table(NEWTABLE, INET), newgen(1234))
    assert found == [RulesetTouched(1234, "nft", "added table inet tailsfw")]


def test_flush_ruleset_names_both_tables() -> None:
    data = b"".join([
        rule(DELRULE, IP, "output", 1), chain(DELCHAIN, IP, "output"), table(DELTABLE, IP),
        rule(DELRULE, IP6, "output", 1), chain(DELCHAIN, IP6, "output"), table(DELTABLE, IP6),
        table(DELTABLE, IP, "other"), newgen(77, "nft"),
    ])  # fmt: skip
    assert events(data) == [
        RulesetTouched(77, "nft", "deleted table ip tailsfw; deleted table ip6 tailsfw")
    ]


def test_a_replacement_by_another_program_reads_as_replaced() -> None:
    data = table(NEWTABLE, IP) + table(DELTABLE, IP) + table(NEWTABLE, IP) + newgen(5, "tailsfwctl")
    assert events(data) == [RulesetTouched(5, "tailsfwctl", "replaced table ip tailsfw")]


def test_a_chain_emptied_is_flushed_when_its_rules_were_seen() -> None:
    own = chain(NEWCHAIN, IP, "output") + b"".join(rule(NEWRULE, IP, "output", h) for h in (1, 2))
    flush = rule(DELRULE, IP, "output", 1) + rule(DELRULE, IP, "output", 2) + newgen(8)
    found = events(own + newgen(OWN), flush)
    assert found == [RulesetTouched(8, "nft", "flushed chain ip tailsfw output (2 rules)")]


def test_deleting_some_rules_is_not_a_flush() -> None:
    own = chain(NEWCHAIN, IP, "output") + b"".join(rule(NEWRULE, IP, "output", h) for h in (1, 2))
    found = events(own + newgen(OWN), rule(DELRULE, IP, "output", 1) + newgen(8))
    assert found == [RulesetTouched(8, "nft", "deleted rule from ip tailsfw output")]


def test_insert_replace_policy_and_elements_are_named() -> None:
    own = chain(NEWCHAIN, IP, "output", policy=0) + newgen(OWN)
    tamper = b"".join([
        rule(NEWRULE, IP, "output", 90),
        rule(DELRULE, IP, "output", 54), rule(NEWRULE, IP, "output", 54),
        chain(NEWCHAIN, IP, "output", policy=1),
        elements(NEWSETELEM, IP, "lan", False, True, False, True),
        elements(DELSETELEM, IP6, "local_ports", False),
        elements(NEWSETELEM, IP, "__set0", False),
        newgen(3, "sh"),
    ])  # fmt: skip
    (event,) = events(own, tamper)
    assert event.pid == 3 and event.process == "sh"
    assert event.what == (
        "changed chain ip tailsfw output (policy accept); replaced rule in ip tailsfw output; "
        "added rule to ip tailsfw output; added 2 elements to set ip tailsfw lan; "
        "deleted element from set ip6 tailsfw local_ports"
    )


def test_an_unreadable_notice_asks_for_a_check_at_once() -> None:
    transactions = Transactions("tailsfw", lambda pid: False)
    transactions.feed(Change("delete", "rule", IP, "tailsfw", "output", handle=1))
    event = transactions.feed(Unreadable("cut"))
    assert event == RulesetTouched(0, "", "unreadable change notification (cut)")
    # What was pending is unknown now; the next commit stands alone.
    assert transactions.feed(Generation(5, "nft")) is None


def test_a_long_summary_counts_the_rest() -> None:
    changes = [Change("add", "chain", IP, "tailsfw", f"c{i}") for i in range(12)]
    assert summarize(changes).endswith("; and 4 more changes")


# -- the source, on a fake socket --------------------------------------------


def test_the_source_yields_events_and_reopens_after_failures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A datagram socket pair stands in for netlink: the test writes the
    kernel's datagrams into one end, the monitor reads the other."""
    pairs: list[tuple[socket.socket, socket.socket]] = []
    failures = [OSError(errno.EPROTONOSUPPORT, "no nfnetlink")]

    def open_socket(rcvbuf: int) -> socket.socket:
        if failures:
            raise failures.pop()
        ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        ours.setblocking(False)
        pairs.append((ours, kernel))
        return ours

    monkeypatch.setattr(nftmonitor, "open_socket", open_socket)

    async def run() -> list[RulesetTouched]:
        monitor = nftmonitor.NftMonitor(own_pid=OWN, retry_delay=0.001)
        events = monitor.events()
        seen = [await anext(events)]  # after one failed open
        kernel = pairs[-1][1]
        kernel.send(table(NEWTABLE, IP) + newgen(OWN))  # ours: nothing
        kernel.send(rule(NEWRULE, IP, "output", 9) + newgen(1234, "nft"))
        seen.append(await anext(events))
        kernel.send(b"")  # the socket ends: reopened, and the kernel must be checked
        seen.append(await anext(events))
        pairs[-1][1].send(table(DELTABLE, IP6) + newgen(99))
        seen.append(await anext(events))
        assert monitor.touched == 2 and monitor.lost == 1
        assert "ConnectionResetError" in monitor.last_error
        return seen

    assert asyncio.run(run()) == [
        RulesetTouched(0, "", "monitor started"),
        RulesetTouched(1234, "nft", "added rule to ip tailsfw output"),
        RulesetTouched(0, "", "notifications lost (socket reopened)"),
        RulesetTouched(99, "nft", "deleted table ip6 tailsfw"),
    ]
    for ours, kernel in pairs:
        assert ours.fileno() == -1  # closed by the monitor (asyncio.run closes it at the end)
        kernel.close()


def test_the_id_our_probe_carried_is_ours_too() -> None:
    """In a container our commits carry the task id outside it: the probe's
    transaction (a table of its own name made and deleted) teaches it."""
    transactions = Transactions("tailsfw", lambda pid: pid == OWN, probe="tailsfw-probe-1")
    ours_outside, other = 31337, 5151

    def touched(*datagrams: bytes) -> list[int]:
        notices = [n for data in datagrams for n in decode(data)]
        return [e.pid for n in notices if (e := transactions.feed(n)) is not None]

    replaced = table(NEWTABLE, IP, "tailsfw")
    assert touched(replaced + newgen(ours_outside)) == [ours_outside]  # before the probe
    probe = table(NEWTABLE, IP, "tailsfw-probe-1") + table(DELTABLE, IP, "tailsfw-probe-1")
    assert touched(probe + newgen(ours_outside, "tailsfwd")) == []
    assert touched(replaced + newgen(ours_outside), replaced + newgen(other)) == [other]
