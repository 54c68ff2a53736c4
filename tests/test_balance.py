import random
from collections import Counter
from dataclasses import dataclass

from gateway.upstream.balance import ConsistentHash, LeastConnections, PowerOfTwoChoices, SmoothWeightedRoundRobin


@dataclass(eq=False)
class T:
    name: str
    weight: int = 1
    in_flight: int = 0


def test_smooth_weighted_round_robin_interleaves():
    a, b, c = T("a", 5), T("b", 1), T("c", 1)
    balancer = SmoothWeightedRoundRobin([a, b, c])
    picks = [balancer.pick().name for _ in range(7)]
    assert picks == ["a", "a", "b", "a", "c", "a", "a"]  # nginx's sequence for 5:1:1


def test_round_robin_distribution_follows_weights_exactly():
    a, b = T("a", 2), T("b", 1)
    balancer = SmoothWeightedRoundRobin([a, b])
    counts = Counter(balancer.pick().name for _ in range(300))
    assert counts == {"a": 200, "b": 100}


def test_excluded_targets_are_skipped():
    a, b = T("a"), T("b")
    for balancer in (SmoothWeightedRoundRobin([a, b]), LeastConnections([a, b]), PowerOfTwoChoices([a, b]),
                     ConsistentHash([a, b], ["a", "b"])):
        assert {balancer.pick("k", frozenset({a})) for _ in range(10)} == {b}
        assert balancer.pick("k", frozenset({a, b})) is None


def test_least_connections_prefers_the_idlest_relative_to_weight():
    a, b, c = T("a", 1, 3), T("b", 2, 3), T("c", 1, 1)
    balancer = LeastConnections([a, b, c])
    assert balancer.pick() is c
    c.in_flight = 2
    assert balancer.pick() is b  # 3/2 beats 2/1


def test_least_connections_spreads_ties():
    targets = [T(str(i)) for i in range(3)]
    balancer = LeastConnections(targets)
    assert {balancer.pick().name for _ in range(3)} == {"0", "1", "2"}


def test_power_of_two_choices_avoids_the_busy_target():
    a, b, c = T("a", 1, 100), T("b"), T("c")
    balancer = PowerOfTwoChoices([a, b, c], rng=random.Random(7))
    counts = Counter(balancer.pick().name for _ in range(3000))
    assert counts["a"] == 0  # a loses every draw it is part of
    assert abs(counts["b"] - counts["c"]) < 300


def test_power_of_two_choices_follows_weights_when_idle():
    a, b = T("a", 3), T("b", 1)
    balancer = PowerOfTwoChoices([a, b, T("c", 1)], rng=random.Random(1))
    counts = Counter(balancer.pick().name for _ in range(4000))
    assert counts["a"] > counts["b"]


def test_consistent_hash_is_sticky_and_moves_about_one_nth_of_keys():
    names = [f"http://10.0.0.{i}" for i in range(4)]
    targets = [T(name) for name in names]
    before = ConsistentHash(targets, names)
    keys = [f"user-{i}" for i in range(4000)]
    first = {key: before.pick(key).name for key in keys}
    assert first == {key: before.pick(key).name for key in keys}
    shares = Counter(first.values())
    assert min(shares.values()) > 600  # roughly even: 1000 each
    grown = ConsistentHash(targets + [T("http://10.0.0.9")], names + ["http://10.0.0.9"])
    moved = sum(1 for key in keys if grown.pick(key).name != first[key])
    assert 0.1 * len(keys) < moved < 0.3 * len(keys)  # about 1/5
    assert all(grown.pick(key).name in (first[key], "http://10.0.0.9") for key in keys)


def test_consistent_hash_without_a_key_falls_back_to_round_robin():
    a, b = T("a"), T("b")
    balancer = ConsistentHash([a, b], ["a", "b"])
    assert Counter(balancer.pick(None).name for _ in range(10)) == {"a": 5, "b": 5}
