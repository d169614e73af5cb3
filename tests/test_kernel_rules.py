"""The kernel data path's pure parts (python/fastlb/kernel_path.py): the maglev table, the weighted
sequences, slot numbers, conntrack lines, and the shape of the nftables ruleset."""

from __future__ import annotations

from collections import Counter

import pytest

from fastlb.kernel_path import (
    MARK_BASE,
    Plan,
    Slots,
    Target,
    active_flows,
    maglev_size,
    maglev_table,
    primes_from,
    ranges,
    ruleset,
    scaled,
    smooth_sequence,
)

NAMES = [f"app/10.0.0.{i}:80" for i in range(1, 6)]


def test_maglev_fills_the_table_in_proportion_to_weights() -> None:
    size = maglev_size(len(NAMES))
    assert size == primes_from(1021) == 1021
    table = maglev_table(NAMES, [1000, 1000, 1000, 1000, 4000], size)
    share = Counter(table)
    assert sum(share.values()) == size and -1 not in share
    assert abs(share[4] / size - 0.5) < 0.02 and all(abs(share[i] / size - 0.125) < 0.02 for i in range(4))
    assert maglev_table(NAMES, [0] * 5, size) == []


def test_maglev_moves_little_beyond_a_removed_backend() -> None:
    size = maglev_size(len(NAMES))
    before = maglev_table(NAMES, [1] * 5, size)
    after = maglev_table(NAMES, [1, 1, 0, 1, 1], size)
    moved = sum(1 for a, b in zip(before, after, strict=True) if a != b and a != 2)
    assert 2 not in after and moved / size < 0.05, moved


def test_round_robin_sequence_is_smooth_and_weights_scale_down() -> None:
    assert smooth_sequence([5, 1, 1]) == [0, 0, 1, 0, 2, 0, 0]
    assert scaled([1000, 500, 0]) == [2, 1, 0]
    big = scaled([1000, 999, 1], limit=100)
    assert sum(big) <= 100 and big[2] == 1


def test_ranges_merge_runs() -> None:
    assert ranges([0, 0, 1, 1, 1, 0]) == [(0, 1, 0), (2, 4, 1), (5, 5, 0)]


def test_slots_are_stable_and_reused_once_freed() -> None:
    s = Slots()
    first = s.assign([("l", "a"), ("l", "b")])
    assert first == {("l", "a"): 0, ("l", "b"): 1}
    assert s.assign([("l", "b"), ("l", "c")]) == {("l", "b"): 1, ("l", "c"): 0}


def test_active_flows_counts_fastlb_marks_and_skips_closing_tcp() -> None:
    line = "ipv4 2 {p} {n} 100 {state} src=10.0.0.9 dst=10.0.0.1 sport=1 dport=80 mark={m} zone=0 use=2"
    lines = [
        line.format(p="tcp", n=6, state="ESTABLISHED", m=MARK_BASE | 3),
        line.format(p="tcp", n=6, state="TIME_WAIT", m=MARK_BASE | 3),
        line.format(p="tcp", n=6, state="ESTABLISHED", m=7),  # another's mark
        f"ipv4 2 udp 17 29 src=10.0.0.9 dst=10.0.0.1 sport=5 dport=53 mark={MARK_BASE | 4} zone=0 use=2",
    ]
    assert active_flows(lines) == {3: 1, 4: 1}


@pytest.mark.parametrize("algorithm", ["round_robin", "random", "ip_hash", "maglev"])
def test_ruleset_dispatches_to_every_weighted_backend_and_counts_them(algorithm: str) -> None:
    targets = (Target(0, "app", "a:80", "10.0.0.1", 80), Target(1, "app", "b:80", "10.0.0.2", 80))
    plan = Plan("l4", "0.0.0.0:80", "app", "tcp", None, 80, algorithm, True, targets, (1000, 0))
    cmds, chains, counters = ruleset([plan])
    text = repr(cmds)
    assert {"prerouting", "output", "services", "l0", "b0", "b1", "masquerade"} <= chains
    assert counters == {"flows0", "in0", "out0", "flows1", "in1", "out1"}
    assert "'goto': {'target': 'b0'}" in text and "'goto': {'target': 'b1'}" not in text
    assert "{'fib': {'result': 'type', 'flags': ['daddr']}}" in text  # 0.0.0.0: every local address


def test_a_listener_with_nothing_to_give_has_no_dispatch() -> None:
    plan = Plan(
        "l4",
        "10.0.0.1:53",
        "p",
        "udp",
        "10.0.0.1",
        53,
        "round_robin",
        False,
        (Target(0, "p", "a:53", "10.0.0.5", 53),),
        (0,),
    )
    cmds, chains, _ = ruleset([plan])
    assert not any(c["add"].get("rule", {}).get("chain") == "l0" for c in cmds)
    assert "masquerade" not in chains
