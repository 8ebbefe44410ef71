"""Cache simulators and eviction policies against brute-force oracles and hand-worked traces."""

from __future__ import annotations

import random

import pytest
import torch

from duoserve.offload.policies import (
    EVICTION_POLICIES,
    PERIOD_PER_SLOT,
    DecayedLFUPolicy,
    make_eviction_policy,
)
from duoserve.offload.simulate import (
    AccessGroup,
    belady_brute_force,
    belady_misses,
    brute_force_simulate,
    simulate,
    trace_from_routing,
)

POLICY_NAMES = ["lru", "lfu", "fifo", "lfu-decay", "next-use"]


def random_trace(
    rng: random.Random,
    num_steps: int,
    num_layers: int,
    num_experts: int,
    top_k: int,
    zipf_s: float,
    is_ragged: bool = False,
) -> list[AccessGroup]:
    """Per-layer Zipf(zipf_s) popularity over a random expert order; top_k distinct per group."""
    weights_per_layer = []
    for _ in range(num_layers):
        order = rng.sample(range(num_experts), num_experts)
        weights_per_layer.append({e: 1.0 / (rank + 1) ** zipf_s for rank, e in enumerate(order)})
    trace = []
    for _ in range(num_steps):
        for layer, weights in enumerate(weights_per_layer):
            num_ids = rng.randint(1, top_k) if is_ragged else top_k
            # Weighted sampling without replacement (Efraimidis-Spirakis keys).
            keyed = sorted(weights, key=lambda e: rng.random() ** (1.0 / weights[e]))
            trace.append((layer, tuple(sorted(keyed[-num_ids:]))))
    return trace


def random_case(seed: int, max_steps: int = 14) -> tuple[list[AccessGroup], int]:
    rng = random.Random(seed)
    num_layers, num_experts = rng.randint(1, 4), rng.randint(2, 10)
    top_k = rng.randint(1, min(4, num_experts))
    trace = random_trace(
        rng,
        rng.randint(1, max_steps),
        num_layers,
        num_experts,
        top_k,
        zipf_s=rng.choice([0.0, 0.8, 1.5]),
        is_ragged=rng.random() < 0.3,
    )
    capacity = rng.randint(top_k, num_layers * num_experts + 1)
    return trace, capacity


@pytest.mark.parametrize("policy_name", POLICY_NAMES)
def test_simulate_matches_brute_force(policy_name: str) -> None:
    for seed in range(150):
        trace, capacity = random_case(seed)
        expected = brute_force_simulate(trace, capacity, policy_name)
        assert simulate(trace, capacity, policy_name) == expected, (seed, capacity, trace)


@pytest.mark.parametrize("policy_name", POLICY_NAMES)
def test_simulate_matches_brute_force_with_protected(policy_name: str) -> None:
    for seed in range(60):
        rng = random.Random(1000 + seed)
        num_layers, num_experts, top_k = rng.randint(1, 3), rng.randint(3, 8), rng.randint(1, 3)
        trace = random_trace(rng, rng.randint(2, 12), num_layers, num_experts, top_k, 1.0)
        keys = [(layer, e) for layer in range(num_layers) for e in range(num_experts)]
        protected = set(rng.sample(keys, rng.randint(1, 3)))
        capacity = top_k + len(protected) + rng.randint(0, 4)
        result = simulate(trace, capacity, policy_name, protected)
        assert result == brute_force_simulate(trace, capacity, policy_name, protected), seed
        assert not protected & set(result.evictions)


def test_belady_matches_exhaustive_optimum() -> None:
    for seed in range(120):
        rng = random.Random(2000 + seed)
        num_experts, top_k = rng.randint(2, 4), rng.randint(1, 2)
        trace = random_trace(rng, rng.randint(1, 6), rng.randint(1, 2), num_experts, top_k, 0.7)
        capacity = rng.randint(top_k, 4)
        optimum = belady_brute_force(trace, capacity)
        assert belady_misses(trace, capacity).num_misses == optimum, (seed, capacity, trace)


def test_belady_lower_bounds_every_policy() -> None:
    for seed in range(100):
        trace, capacity = random_case(3000 + seed, max_steps=40)
        bound = belady_misses(trace, capacity)
        for policy_name in POLICY_NAMES:
            assert bound.num_misses <= simulate(trace, capacity, policy_name).num_misses, seed


def layer0(ids: list[int]) -> list[AccessGroup]:
    return [(0, (e,)) for e in ids]


# Capacity 2. Expert 0 is popular early; 1 earns 3 accesses over two residencies, so LFU keeps
# it over 0 at t8 (tie on count 3, 0 less recent) only because counts survive eviction.
LFU_TRACE = layer0([0, 0, 0, 1, 1, 2, 3, 1, 4, 0])


@pytest.mark.parametrize(
    ("policy_name", "num_hits", "evictions"),
    [
        ("lru", 3, [0, 1, 2, 3, 1]),
        ("fifo", 3, [0, 1, 2, 3, 1]),
        ("lfu", 3, [1, 2, 3, 0, 4]),
    ],
)
def test_hand_worked_single_layer(policy_name: str, num_hits: int, evictions: list[int]) -> None:
    for simulator in (simulate, brute_force_simulate):
        result = simulator(LFU_TRACE, 2, policy_name)
        assert (result.num_hits, result.num_misses) == (num_hits, 10 - num_hits)
        assert list(result.evictions) == [(0, e) for e in evictions]


def test_hand_worked_policies_differ() -> None:
    # Capacity 3: 1 2 3 1 4 1 2. LRU evicts 2 then 3; FIFO evicts 1, 2, 3 in insertion order.
    trace = layer0([1, 2, 3, 1, 4, 1, 2])
    lru, fifo = simulate(trace, 3, "lru"), simulate(trace, 3, "fifo")
    assert (lru.num_hits, lru.num_misses, lru.evictions) == (2, 5, ((0, 2), (0, 3)))
    assert (fifo.num_hits, fifo.num_misses) == (1, 6)
    assert fifo.evictions == ((0, 1), (0, 2), (0, 3))
    # Capacity 2: 1 1 2 3 1. LFU keeps the twice-used 1; LRU and FIFO evict it.
    trace = layer0([1, 1, 2, 3, 1])
    assert simulate(trace, 2, "lfu").num_hits == 2
    assert simulate(trace, 2, "lru").num_hits == 1
    assert simulate(trace, 2, "fifo").num_hits == 1


def test_hand_worked_belady() -> None:
    result = belady_misses(LFU_TRACE, 2)
    assert (result.num_hits, result.num_misses) == (4, 6)
    assert list(result.evictions) == [(0, 0), (0, 2), (0, 1), (0, 3)]
    assert belady_brute_force(LFU_TRACE, 2) == 6


def test_group_keys_are_pinned() -> None:
    # Capacity 3: [3] [1] [2] then [0, 3]. Missing 0, LRU would pick 3, but 3 is in the
    # current group (accessed next), so 1 is evicted and 3 hits.
    trace = [(0, (3,)), (0, (1,)), (0, (2,)), (0, (0, 3))]
    for policy_name in POLICY_NAMES:
        result = simulate(trace, 3, policy_name)
        assert (result.num_hits, result.num_misses) == (1, 4)
        assert result.evictions == ((0, 1),)
        assert result.group_miss_ids == ((3,), (1,), (2,), (0,))
        assert result.resident_keys == ((0, 0), (0, 2), (0, 3))


def test_layers_share_capacity() -> None:
    # Capacity 3, two layers. Missing (1, 1) evicts (0, 0), the least recent. Back in layer 0,
    # missing (0, 0) cannot evict (0, 1) (pinned: same group), so the LRU of layer 1 goes.
    trace = [(0, (0, 1)), (1, (0, 1)), (0, (0, 1))]
    result = simulate(trace, 3, "lru")
    assert result.group_miss_ids == ((0, 1), (0, 1), (0,))
    assert result.evictions == ((0, 0), (1, 0))
    assert result.resident_keys == ((0, 0), (0, 1), (1, 1))


def test_protected_keys_are_never_evicted() -> None:
    result = simulate(layer0([5, 1, 2, 3, 4]), 2, "lru", protected={(0, 5)})
    assert result.evictions == ((0, 1), (0, 2), (0, 3))
    assert result.resident_keys == ((0, 4), (0, 5))
    with pytest.raises(ValueError, match="pinned by the current group or protected"):
        simulate(layer0([5, 1, 2]), 1, "lru", protected={(0, 5)})


def test_errors() -> None:
    with pytest.raises(
        ValueError, match=r"unknown eviction policy 'mru'.*fifo, lfu, lfu-decay, lru, next-use"
    ):
        make_eviction_policy("mru")
    with pytest.raises(ValueError, match="unknown eviction policy"):
        simulate(layer0([1]), 2, "mru")
    with pytest.raises(ValueError, match="unknown eviction policy"):
        brute_force_simulate(layer0([1]), 2, "mru")
    trace = [(0, (1,)), (1, (0, 2, 3))]
    for run in (
        lambda: simulate(trace, 2, "lru"),
        lambda: brute_force_simulate(trace, 2, "lfu"),
        lambda: belady_misses(trace, 2),
        lambda: belady_brute_force(trace, 2),
    ):
        with pytest.raises(ValueError, match=r"capacity 2 .* group size 3"):
            run()


def test_registry_names() -> None:
    assert sorted(EVICTION_POLICIES) == sorted(POLICY_NAMES)
    for name in POLICY_NAMES:
        assert make_eviction_policy(name).name == name


def test_prefetched_key_counts_from_insertion() -> None:
    # A key inserted without an access (a prefetch) has recency = insertion time, 0 accesses.
    keys = [(0, 0), (0, 1)]
    lru, lfu, fifo = (make_eviction_policy(n) for n in ("lru", "lfu", "fifo"))
    for policy in (lru, lfu, fifo):
        policy.on_insert((0, 0), 0)
        policy.on_access((0, 0), 0)
        policy.on_insert((0, 1), 5)  # prefetch
        policy.on_access((0, 0), 6)
    assert lru.choose_victim(keys, 7) == (0, 1)
    assert lfu.choose_victim(keys[::-1], 7) == (0, 1)
    assert fifo.choose_victim(keys[::-1], 7) == (0, 0)
    lru.on_evict((0, 1))
    lru.on_insert((0, 1), 8)  # re-insert refreshes recency
    assert lru.choose_victim(keys, 9) == (0, 0)


def test_lfu_decay_counts_age() -> None:
    # Period 8: A is used 3 times, B once, all in epoch 0. Counts halve at each epoch boundary
    # (3 -> 1 -> 0, 1 -> 0); once both are 0, recency decides: LFU would still evict B.
    policy = DecayedLFUPolicy(period=8)
    A, B = (0, 0), (0, 1)
    policy.on_insert(A, 0)
    for now in range(3):
        policy.on_access(A, now)
    policy.on_insert(B, 4)
    policy.on_access(B, 4)
    assert [policy.aged_count(k) for k in (A, B)] == [3, 1]
    assert policy.choose_victim([A, B], 5) == B
    assert policy.choose_victim([A, B], 8) == B  # epoch 1: 1 against 0
    assert policy.pick_victim(lambda k: True, [A, B], 16) == A  # epoch 2: 0 and 0, A older
    assert make_eviction_policy("lfu-decay", 10).period == PERIOD_PER_SLOT * 10
    with pytest.raises(AssertionError, match="period must be >= 1"):
        DecayedLFUPolicy(period=-1)


def test_trace_from_routing() -> None:
    # [steps=2, layers=2, k=2], with duplicates and unsorted ids.
    expert_ids = torch.tensor([[[3, 1], [2, 2]], [[0, 5], [7, 4]]])
    expected = [(0, (1, 3)), (1, (2,)), (0, (0, 5)), (1, (4, 7))]
    assert list(trace_from_routing(expert_ids)) == expected
    assert list(trace_from_routing(expert_ids.numpy())) == expected
    assert list(trace_from_routing(expert_ids.tolist())) == expected
    # A ragged batch: per layer a [tokens, k] list is flattened into one group.
    assert list(trace_from_routing([[[[1, 0], [0, 4]], [2]]])) == [(0, (0, 1, 4)), (1, (2,))]
    with pytest.raises(ValueError, match=">= 0"):
        list(trace_from_routing([[[-1]]]))


@pytest.mark.parametrize("policy_name", POLICY_NAMES)
def test_ties_go_to_smallest_key(policy_name: str) -> None:
    # Two prefetches at the same time, never accessed: a full tie on every rank component
    # (next-use: layer 0's group is being served, so layer 0 runs last and loses anyway).
    policy = make_eviction_policy(policy_name, capacity=2, num_layers=2)
    for key in [(1, 0), (0, 7)]:
        policy.on_insert(key, 3)
    assert policy.choose_victim([(1, 0), (0, 7)], 4) == (0, 7)
    assert policy.choose_victim([(0, 7), (1, 0)], 4) == (0, 7)


@pytest.mark.parametrize("policy_name", POLICY_NAMES)
def test_pick_victim_breaks_recency_ties_by_smallest_key(policy_name: str) -> None:
    # Prefetches inserted at the same time, larger key first: pick_victim (the heap or bucket
    # path the cache uses) must agree with choose_victim over every evictable candidate.
    policy = make_eviction_policy(policy_name, capacity=4, num_layers=2)
    keys = [(1, 5), (1, 2), (1, 9)]
    for key in keys:
        policy.on_insert(key, 3)
    for barred in [set(), {(1, 2)}, {(1, 2), (1, 5)}]:
        allowed = [k for k in keys if k not in barred]
        want = policy.choose_victim(allowed, 4)
        assert policy.pick_victim(lambda k, b=barred: k not in b, keys, 4) == want
        assert want == min(allowed), (policy_name, barred)


def test_eviction_bench_reuse_stats_by_hand() -> None:
    # Two sequences, one layer, top-1 of 4 experts: decode rows 0,0,1 | 2,2. Next-token pairs
    # within a sequence: (0,0) reused, (0,1) not, (2,2) reused -> 2/3; the top-1 expert of the
    # layer (0 or 2, 2 uses each) catches 2 of the 5 uses.
    from types import SimpleNamespace

    from duoserve.bench.eviction import reuse_stats

    trace = SimpleNamespace(
        expert_ids=torch.tensor([[[0]], [[0]], [[1]], [[2]], [[2]], [[3]]]),
        is_prefill=torch.tensor([False] * 5 + [True]),
        seq_id=torch.tensor([0, 0, 0, 1, 1, 1]),
        num_experts=4,
    )
    r = reuse_stats(trace, slots=1)
    assert r == pytest.approx(dict(reuse_next=2 / 3, base_rate=0.25, static_top=0.4, per_layer=1))


def test_eviction_bench_batch_steps_by_hand() -> None:
    # Decode rows: sequence 0 -> 0, 1, 2; sequence 1 -> 3, 4; sequence 2 -> 5, 6, 7 (row 8 is
    # a prompt token). Batch 2: stream 0 serves sequences 0 then 2, stream 1 sequence 1; the
    # steps end with the shorter stream.
    from types import SimpleNamespace

    from duoserve.bench.eviction import batch_steps

    trace = SimpleNamespace(
        is_prefill=torch.tensor([False] * 8 + [True]),
        seq_id=torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2]),
    )
    assert batch_steps(trace, 1) == [[r] for r in range(8)]
    assert batch_steps(trace, 2) == [[0, 3], [1, 4]]
    assert batch_steps(trace, 3) == [[0, 3, 5], [1, 4, 6]]
