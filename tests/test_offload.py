"""Offloaded expert policies against the all-resident model, and the cache against its simulator."""

from __future__ import annotations

import random

import pytest
import torch

from duoserve import LLM, SamplingParams
from duoserve.offload.expert_cache import ExpertCache
from duoserve.offload.planner import BudgetError
from duoserve.offload.simulate import simulate

from .conftest import FAMILIES
from .test_parity import PROMPTS

SMALL = dict(
    device="cpu", dtype="float32", max_model_len=64, max_num_seqs=3, max_num_batched_tokens=64
)
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def budget_for(llm_resident: LLM, num_slots: int) -> float:
    """A budget (GiB) that leaves room for about `num_slots` expert slots."""
    from duoserve.offload.planner import plan_memory

    engine = llm_resident.engine
    cfg = engine.model_config
    probe = plan_memory(
        cfg, engine.config.replace(gpu_memory_budget=1.0), engine.dtype, engine.device, "lru"
    )
    fixed = probe.dense_bytes + probe.kv_cache_bytes + probe.activation_bytes + probe.slack_bytes
    return (fixed + (num_slots + 0.5) * probe.expert_bytes) / 2**30 * 1.04


@pytest.mark.parametrize("family", list(FAMILIES))
def test_offloaded_outputs_equal_resident(hf_checkpoints, family):
    path, _ = hf_checkpoints[family]
    resident = LLM(str(path), **SMALL)
    want_logits = resident.logits(PROMPTS)
    want_tokens = [o.output_token_ids for o in resident.generate(PROMPTS, GREEDY)]
    top_k = resident.engine.model_config.num_experts_per_tok
    total = resident.engine.model_config.num_moe_layers * resident.engine.model_config.num_experts
    for policy, slots in [("ondemand", 1), ("lru", top_k), ("lru", total // 2), ("lfu", total)]:
        llm = LLM(str(path), policy=policy, gpu_memory_budget=budget_for(resident, slots), **SMALL)
        for got, want in zip(llm.logits(PROMPTS), want_logits):
            assert torch.equal(got, want), (family, policy, slots)
        got_tokens = [o.output_token_ids for o in llm.generate(PROMPTS, GREEDY)]
        assert got_tokens == want_tokens, (family, policy, slots)
        stats = llm.engine.experts.stats()
        assert stats["bytes_copied"] == stats["misses"] * llm.engine.memory_plan.expert_bytes


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "next-use"])
def test_engine_cache_matches_simulator(hf_checkpoints, policy):
    """Replay the access groups the real engine produced through the simulator."""
    path, _ = hf_checkpoints["qwen3_moe"]
    resident = LLM(str(path), **SMALL)
    llm = LLM(str(path), policy=policy, gpu_memory_budget=budget_for(resident, 9), **SMALL)
    backend = llm.engine.experts
    backend.access_log = []
    backend.cache.record_misses = True
    llm.generate(PROMPTS, GREEDY)
    sim = simulate(backend.access_log, backend.cache.num_slots, policy)
    assert (sim.num_hits, sim.num_misses) == (backend.cache.stats.hits, backend.cache.stats.misses)
    assert sim.group_miss_ids == tuple(ids for _, ids in backend.cache.stats.miss_log)
    assert sim.num_misses > 0 and sim.num_hits > 0


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "lfu-decay", "next-use"])
def test_expert_cache_matches_simulator_on_random_traces(policy):
    """The cache's victim picks (lazy heaps, next-use's per-layer tops) against the simulator's
    choose_victim over all candidates, also with protected keys stepped over."""
    rng = random.Random(7)
    for _ in range(60):
        num_layers, num_experts, k = rng.randint(1, 4), rng.randint(2, 12), rng.randint(1, 3)
        k = min(k, num_experts)
        capacity = rng.randint(k, num_layers * num_experts)
        trace = [
            (layer, tuple(sorted(rng.sample(range(num_experts), k))))
            for _ in range(rng.randint(5, 40))
            for layer in range(num_layers)
        ]
        keys = [(layer, e) for layer in range(num_layers) for e in range(num_experts)]
        protected = set(rng.sample(keys, rng.randint(0, max(0, capacity - k - 1))))
        cache = ExpertCache(
            capacity, 4, torch.float32, torch.device("cpu"), policy, True, num_layers=num_layers
        )
        cache.protected = set(protected)
        for layer, ids in trace:
            cache.release(cache.acquire_group(layer, list(ids)))
        sim = simulate(trace, capacity, policy, protected)
        assert (cache.stats.hits, cache.stats.misses) == (sim.num_hits, sim.num_misses)
        assert tuple(ids for _, ids in cache.stats.miss_log) == sim.group_miss_ids
        assert tuple(sorted(cache.slot_of)) == sim.resident_keys


def test_pinned_slots_are_never_evicted():
    cache = ExpertCache(2, 4, torch.float32, torch.device("cpu"), "lru")
    held = cache.acquire_group(0, [0, 1])
    with pytest.raises(RuntimeError, match="pinned"):
        cache.acquire_group(1, [0])
    cache.release(held)
    assert [s.is_hit for s in cache.acquire_group(1, [0])] == [False]


def test_budget_below_minimum_names_the_minimum(hf_checkpoints):
    path, _ = hf_checkpoints["mixtral"]
    with pytest.raises(BudgetError, match=r"below the minimum \d+\.\d+ GiB"):
        LLM(str(path), policy="lru", gpu_memory_budget=0.0001, **SMALL)
    with pytest.raises(BudgetError, match="full-gpu needs"):
        LLM(str(path), policy="full-gpu", gpu_memory_budget=0.0001, **SMALL)
    with pytest.raises(ValueError, match="unknown policy"):
        LLM(str(path), policy="magic", gpu_memory_budget=1, **SMALL)


def test_planner_splits_budget_and_prints_table(hf_checkpoints, capsys):
    path, _ = hf_checkpoints["olmoe"]
    llm = LLM(str(path), policy="lru", gpu_memory_budget=0.01, **SMALL)
    plan = llm.engine.memory_plan
    parts = (
        plan.dense_bytes
        + plan.kv_cache_bytes
        + plan.activation_bytes
        + plan.staging_bytes
        + plan.slack_bytes
        + plan.expert_cache_bytes
    )
    assert parts <= plan.budget_bytes < parts + plan.expert_bytes or (
        plan.num_expert_slots == plan.num_experts_total
    )
    assert llm.engine.experts.cache.num_slots == plan.num_expert_slots
    assert "expert slots" in capsys.readouterr().err


def test_large_slot_pool_uses_windows_of_groups():
    """More slots than one grouped GEMM takes (1024): rows are split by slot window."""
    kw = dict(device="cpu", max_model_len=48, max_num_seqs=2, max_num_batched_tokens=48)
    prompts = [[256, 1, 2, 3, 4, 5, 6, 7, 8], [256, 9, 10]]
    resident = LLM("synthetic:qwen3-30b-a3b:tiny", **kw)
    want = [o.output_token_ids for o in resident.generate(prompts, GREEDY)]
    llm = LLM("synthetic:qwen3-30b-a3b:tiny", policy="lru", gpu_memory_budget=0.02, **kw)
    assert llm.engine.experts.cache.num_slots > 2048
    assert [o.output_token_ids for o in llm.generate(prompts, GREEDY)] == want
