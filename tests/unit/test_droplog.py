"""The rate limiter and the CPU budget from times alone, and the journal entries."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tailsfw.droplog import (
    DROP_MESSAGE_ID,
    KEY,
    LOSS_MESSAGE_ID,
    OVERFLOW,
    SUMMARY_MESSAGE_ID,
    USER,
    Budget,
    Limiter,
    Limits,
    Summary,
    drop_entry,
    drop_message,
    loss_entry,
    reason,
    summary_entry,
)
from tailsfw.nflog import Drop

LIMITS = Limits(burst=3, window=10.0, share=100, users=8)
Offer = Limiter[str, str]


def test_a_burst_then_one_summary_when_the_window_ends() -> None:
    limiter: Offer = Limiter(LIMITS)
    decisions = [limiter.offer("u", "k", t * 0.5) for t in range(10)]  # 0 .. 4.5 s
    assert decisions == [True] * 3 + [False] * 7
    assert limiter.due(9.9) == []
    assert limiter.next_due() == 10.0
    assert limiter.due(10.0) == [Summary(KEY, "u", "k", 7, 0.0, 4.5)]
    assert limiter.due(20.0) == []  # said once
    assert limiter.offer("u", "k", 20.0)  # a new window, a new burst
    assert len(limiter) == 1


def test_a_window_that_only_logged_says_nothing_more() -> None:
    limiter: Offer = Limiter(LIMITS)
    assert limiter.offer("u", "k", 0.0)
    assert limiter.due(11.0) == []
    assert len(limiter) == 0
    assert limiter.next_due() is None


def test_keys_are_limited_apart() -> None:
    limiter: Offer = Limiter(LIMITS)
    for key in "ab":
        assert [limiter.offer("u", key, 1.0) for _ in range(4)] == [True, True, True, False]
    assert sorted(s.key or "" for s in limiter.due(11.0)) == ["a", "b"]


def test_an_ended_window_is_summarised_even_without_a_tick() -> None:
    limiter: Offer = Limiter(LIMITS)
    for _ in range(5):
        limiter.offer("u", "k", 0.0)
    assert limiter.offer("u", "k", 12.0)  # a new window opens; the old one's summary waits
    assert limiter.next_due() == float("-inf")
    assert limiter.due(12.0) == [Summary(KEY, "u", "k", 2, 0.0, 0.0)]


def test_one_users_flood_never_hides_another_users_drops() -> None:
    """Issue 18: one packet to each of 150 addresses used to fill the global
    budget, and root's and amnesia's next drops went into a summary."""
    limiter: Limiter[int, int] = Limiter()
    flood = [limiter.offer(1001, address, 1.0) for address in range(150)]
    assert sum(flood) == Limits().share
    assert limiter.offer(0, 1, 1.5) and limiter.offer(1000, 1, 1.5)
    assert [limiter.offer(1000, 1, 2.0) for _ in range(5)] == [True] * 4 + [False]
    assert limiter.due(11.0) == [Summary(USER, 1001, None, 150 - Limits().share, 1.0, 1.0)]
    assert limiter.due(11.5) == [Summary(KEY, 1000, 1, 1, 1.5, 2.0)]


def test_a_users_share_caps_its_entries_of_all_keys() -> None:
    limiter: Offer = Limiter(Limits(burst=5, window=10.0, share=4, users=10))
    assert sum(limiter.offer("u", str(k % 3), 1.0) for k in range(30)) == 4
    assert limiter.offer("u", "7", 11.0)  # the next window has room again


def test_too_many_users_go_to_the_overflow_bucket() -> None:
    limiter: Limiter[int, str] = Limiter(Limits(burst=1, window=10.0, share=100, users=2))
    assert [limiter.offer(u, "k", 0.0) for u in range(5)] == [True, True, False, False, False]
    assert limiter.due(10.0) == [Summary(OVERFLOW, None, None, 3, 0.0, 0.0)]


def test_flush_says_every_open_count() -> None:
    limiter: Offer = Limiter(Limits(burst=1, window=10.0, share=1, users=1))
    for user, key in (("a", "k"), ("a", "k"), ("a", "l"), ("b", "k")):
        limiter.offer(user, key, 1.0)
    assert limiter.flush() == [
        Summary(KEY, "a", "k", 1, 1.0, 1.0),
        Summary(USER, "a", None, 1, 1.0, 1.0),
        Summary(OVERFLOW, None, None, 1, 1.0, 1.0),
    ]
    assert limiter.flush() == [] and len(limiter) == 0


offers = st.lists(
    st.tuples(st.integers(0, 4), st.integers(0, 20), st.floats(0, 5, allow_nan=False)),
    max_size=300,
)  # (user, key, time step)


@given(offers, st.sampled_from([LIMITS, Limits(2, 1.0, 5, 3), Limits(1, 30.0, 1, 1)]))
def test_every_drop_is_logged_or_summarised_and_memory_is_bounded(
    steps: list[tuple[int, int, float]], limits: Limits
) -> None:
    limiter: Limiter[int, int] = Limiter(limits)
    now = logged = summarised = 0.0
    entries_at: dict[int, list[float]] = {}
    for user, key, step in steps:
        now += step
        if limiter.offer(user, key, now):
            logged += 1
            entries_at.setdefault(user, []).append(now)
        summarised += sum(s.suppressed for s in limiter.due(now))
        assert len(limiter) <= limits.total
    summarised += sum(s.suppressed for s in limiter.flush())
    assert logged + summarised == len(steps)
    # No span of one window holds more than twice a user's share of its entries
    # (windows restart at the first drop after the last one ended).
    for times in entries_at.values():
        for i, start in enumerate(times):
            within = [t for t in times[i:] if t < start + limits.window]
            assert len(within) <= 2 * limits.share


def test_budget_pauses_reading_past_its_share() -> None:
    budget = Budget(share=0.5, period=0.1)
    assert budget.spend(0.01, 1.00) is None
    assert budget.spend(0.03, 1.04) is None  # 40 ms of the 50 ms allowed
    resume = budget.spend(0.02, 1.06)  # 60 ms spent since 0.99: read again at 0.99 + 0.12
    assert resume is not None and abs(resume - 1.11) < 1e-9
    assert budget.spend(0.001, 1.2) is None  # a new period


def test_budget_of_a_whole_core_never_pauses_for_short_reads() -> None:
    budget = Budget(share=1.0, period=0.1)
    assert all(budget.spend(0.001, t / 1000) is None for t in range(0, 1000, 2))


TCP = Drop(family=4, protocol=6, src="192.168.77.2", dst="198.51.100.10", length=60,
           prefix="Dropped outbound packet: ", timestamp=0.0, sport=40000, dport=42,
           uid=1000, gid=1000, outdev=2)  # fmt: skip
ICMP6 = Drop(family=6, protocol=58, src="2001:db8:77::2", dst="2001:db8:1::10", length=104,
             prefix="Dropped outbound packet: ", timestamp=0.0, icmp_type=128, icmp_code=0,
             uid=0, gid=0, outdev=2)  # fmt: skip


def test_drop_message_is_the_kernel_log_line() -> None:
    assert drop_message(TCP, "", "eth0") == (
        "Dropped outbound packet: IN= OUT=eth0 SRC=192.168.77.2 DST=198.51.100.10 LEN=60"
        " PROTO=TCP SPT=40000 DPT=42 UID=1000 GID=1000"
    )
    assert drop_message(ICMP6, "", "eth0").endswith("PROTO=ICMPv6 TYPE=128 CODE=0 UID=0 GID=0")
    kernel = Drop(4, 47, "10.0.0.1", "10.0.0.2", 20, "x: ", 0.0)
    assert drop_message(kernel, "", "").endswith("LEN=20 PROTO=47")


def test_drop_entry_fields() -> None:
    fields = drop_entry(TCP, "amnesia", "", "eth0")
    assert fields["MESSAGE_ID"] == DROP_MESSAGE_ID
    assert fields["PRIORITY"] == "5"
    assert {k: v for k, v in fields.items() if k.startswith("TAILSFW_")} == {
        "TAILSFW_KIND": "drop", "TAILSFW_REASON": "Dropped outbound packet",
        "TAILSFW_FAMILY": "ipv4", "TAILSFW_SRC": "192.168.77.2",
        "TAILSFW_DST": "198.51.100.10", "TAILSFW_PROTO": "TCP", "TAILSFW_LEN": "60",
        "TAILSFW_OUTDEV": "eth0", "TAILSFW_USER": "amnesia", "TAILSFW_SPORT": "40000",
        "TAILSFW_DPORT": "42", "TAILSFW_UID": "1000", "TAILSFW_GID": "1000",
    }  # fmt: skip
    icmp = drop_entry(ICMP6, "root", "", "eth0")
    assert (icmp["TAILSFW_ICMP_TYPE"], icmp["TAILSFW_ICMP_CODE"]) == ("128", "0")
    assert "TAILSFW_DPORT" not in icmp


def test_summary_and_loss_entries() -> None:
    key = ("198.51.100.10", "Dropped outbound packet: ")
    summary = summary_entry(Summary(KEY, 1000, key, 1234, 1.0, 9.5), lambda uid: f"user{uid}")
    assert summary["MESSAGE_ID"] == SUMMARY_MESSAGE_ID
    assert summary["MESSAGE"] == (
        "1234 more like this suppressed in 8.5 s: user1000 to 198.51.100.10,"
        " Dropped outbound packet"
    )
    assert (summary["TAILSFW_SUPPRESSED"], summary["TAILSFW_UID"]) == ("1234", "1000")
    overflow = summary_entry(Summary(OVERFLOW, None, None, 5, 0.0, 1.0), lambda uid: "?")
    assert overflow["TAILSFW_REASON"] == "overflow" and overflow["TAILSFW_SUPPRESSED"] == "5"
    assert "TAILSFW_USER" not in overflow
    beyond = summary_entry(Summary(USER, 1000, None, 7, 0.0, 2.0), lambda uid: f"user{uid}")
    assert beyond["MESSAGE"].startswith("7 more refused packets of user1000 suppressed in 2.0 s")
    assert (beyond["TAILSFW_USER"], beyond["TAILSFW_UID"]) == ("user1000", "1000")
    loss = loss_entry(12)
    assert (loss["MESSAGE_ID"], loss["TAILSFW_LOST"]) == (LOSS_MESSAGE_ID, "12")
    assert loss_entry(7, 3.0)["MESSAGE"].startswith("7 more in 3.0 s refused packets")


def test_reason_from_prefix() -> None:
    assert reason("Dropped outbound packet: ") == "Dropped outbound packet"
    assert reason("") == "refused"
