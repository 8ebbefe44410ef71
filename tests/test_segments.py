"""Segmented decode (engine/cuda_graphs.py): the model run in segments between routing syncs.

On the CPU, driving MoELM.segments by hand gives the logits of the plain forward pass for
every family and for offloaded policies; on the GPU, captured segment graphs give the
logits, tokens and cache accounting of eager decode.
"""

from __future__ import annotations

import pytest
import torch

from duoserve import LLM, SamplingParams
from duoserve.engine.context import build_step_context, step_context

from .conftest import FAMILIES, budget_for_slots, graphed_and_eager_decode
from .test_parity import PROMPTS

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _segmented_logits(engine, token_ids, slots, starts) -> tuple[torch.Tensor, int]:
    """One decode step through MoELM.segments, experts run between segments; (logits,
    number of MoE points the generator stopped at)."""
    ctx = build_step_context("decode", slots, starts, [1] * len(slots), engine.device)
    ids = torch.tensor(token_ids, dtype=torch.long, device=engine.device)
    stops = 0
    with torch.inference_mode(), step_context(ctx):
        for block, point in engine.model.segments(ids, ctx.positions_dev, engine.kv):
            if block is None:
                return point, stops
            block.run_experts(point)
            stops += 1
    raise AssertionError("segments ended without logits")


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("policy", ["full-gpu", "lru", "duoserve"])
def test_segments_equal_forward(hf_checkpoints, family, policy):
    path, _ = hf_checkpoints[family]
    kw = dict(device="cpu", max_model_len=64, max_num_seqs=3)
    llm = LLM(str(path), **kw)
    if policy != "full-gpu":
        llm = LLM(str(path), policy=policy, gpu_memory_budget=budget_for_slots(llm, 12), **kw)
    engine = llm.engine
    slots = [engine.kv.allocate_slot() for _ in PROMPTS]
    engine.runner.forward("prefill", PROMPTS, slots, [0] * len(PROMPTS))
    starts, last = [len(p) for p in PROMPTS], [p[-1] for p in PROMPTS]
    # the same step twice (its K/V rows are rewritten with the same values)
    want = engine.runner.forward("decode", [[t] for t in last], slots, starts)
    got, stops = _segmented_logits(engine, last, slots, starts)
    assert stops == engine.model_config.num_moe_layers
    assert torch.equal(got, want), (family, policy)


gpu = pytest.mark.gpu


def _offloaded(policy: str, eager: bool, num_slots: int = 24, **kw) -> LLM:
    base = dict(device="cuda", dtype="bfloat16", max_model_len=128, max_num_seqs=3, **kw)
    probe = LLM(None, **base)
    budget = budget_for_slots(probe, num_slots)
    del probe
    return LLM(None, policy=policy, gpu_memory_budget=budget, enforce_eager=int(eager), **base)


@gpu
@pytest.mark.parametrize("policy", ["lru", "duoserve", "ondemand"])
def test_segment_graphs_match_eager_decode(policy):
    """The built-in (trained) model offloaded: greedy tokens and cache counters of graphed
    decode equal eager decode's; the runner really used segment graphs."""
    from duoserve.engine.cuda_graphs import SegmentedDecode

    prompts = ["A list is", "To open a file for reading,", "def f(x):"]
    eager = _offloaded(policy, eager=True)
    want = [o.output_token_ids for o in eager.generate(prompts, GREEDY)]
    want_stats = eager.engine.experts.stats()
    graphed = _offloaded(policy, eager=False)
    assert isinstance(graphed.engine.runner.graphs, SegmentedDecode)
    got = [o.output_token_ids for o in graphed.generate(prompts, GREEDY)]
    got_stats = graphed.engine.experts.stats()
    assert graphed.engine.runner.graphs.steps, "no decode step ran through the graphs"
    assert got == want, policy
    # the same routing: the same accesses; without a predictor (whose bf16 scores may part
    # at near-ties between the two attention paths), the same hits and copies too
    keys = ("hits", "misses", "bytes_copied") if policy != "duoserve" else ("predictor_calls",)
    for key in keys:
        print(f"{policy} {key}: eager {want_stats[key]} graphed {got_stats[key]}")
        assert got_stats[key] == want_stats[key], (policy, key)
    total = lambda s: s["hits"] + s["misses"]  # noqa: E731
    assert total(got_stats) == total(want_stats), policy
    if policy == "duoserve":
        assert got_stats["prefetches"] > 0


@gpu
def test_segment_graph_logits_close_to_eager(hf_checkpoints):
    """Random weights (near-tied logits): one graphed step's logits against eager's."""
    path, _ = hf_checkpoints["qwen3_moe"]
    kw = dict(device="cuda", dtype="bfloat16", max_model_len=64, max_num_seqs=3)
    budget = budget_for_slots(LLM(str(path), **kw), 12)
    llm = LLM(str(path), policy="duoserve", gpu_memory_budget=budget, **kw)
    graphed, graphed_again, eager = graphed_and_eager_decode(llm, PROMPTS)
    diff, scale = (graphed - eager).abs().max().item(), eager.abs().max().item()
    print(f"segment graphs vs eager decode logits: max diff {diff:.4g}, scale {scale:.4g}")
    assert torch.equal(graphed, graphed_again)  # a replay is deterministic
    assert diff <= 2e-2 * scale


def test_split_decode_over_several_pool_windows(hf_checkpoints, monkeypatch):
    """A cache of more slots than one grouped GEMM takes: the split decode stage runs one
    pass per window of slots and keeps each row from its own window."""
    from duoserve.offload import backends

    path, _ = hf_checkpoints["qwen3_moe"]
    kw = dict(device="cpu", max_model_len=64, max_num_seqs=3)
    resident = LLM(str(path), **kw)
    want = [o.output_token_ids for o in resident.generate(PROMPTS, GREEDY)]
    llm = LLM(str(path), policy="lru", gpu_memory_budget=budget_for_slots(resident, 14), **kw)
    monkeypatch.setattr(backends, "MAX_GROUPS", 4)  # 14 slots: windows of 4, 4, 4, 2
    calls = []
    device_compute = backends.CachedExperts.device_compute
    monkeypatch.setattr(
        backends.CachedExperts,
        "device_compute",
        lambda self, *a: calls.append(1) or device_compute(self, *a),
    )
    assert [o.output_token_ids for o in llm.generate(PROMPTS, GREEDY)] == want
    assert calls, "decode never ran the split stage"


@gpu
def test_policy_switches_do_not_grow_device_memory():
    """Captures warm up on one side stream per device: a new stream per capture left a cuBLAS
    workspace behind at every policy switch (32 MiB each on an H100), against the budget."""
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    kw = dict(device="cuda", dtype="bfloat16", max_model_len=128)
    llm = LLM(None, policy="lru", gpu_memory_budget=0.3, **kw)
    allocated = []
    for policy in ("lru", "duoserve", "uniform", "lru", "duoserve", "uniform"):
        llm.engine.set_expert_policy(policy, 0.3)
        assert llm.engine.runner.graphs is not None, policy
        llm.generate(["A list is", "To open a file for reading, " * 4], greedy)
        allocated.append(torch.cuda.memory_allocated() / 2**20)
    print("MiB allocated after each policy's generation:", [f"{a:.1f}" for a in allocated])
    assert allocated[3:] == pytest.approx(allocated[:3], abs=2.0)
