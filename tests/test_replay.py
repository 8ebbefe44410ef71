"""Trace replay forces the recorded routing, token by token."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from duoserve import LLM, SamplingParams
from duoserve.bench.replay import TraceReplay


def test_replay_forces_trace_routing(tmp_path):
    # synthetic qwen1.5-moe tiny: 24 MoE layers x 60 experts, top-4
    gen = torch.Generator().manual_seed(0)
    trace = torch.stack([torch.randperm(60, generator=gen)[:4] for _ in range(24 * 64)])
    trace = trace.view(24, 64, 4).to(torch.int16)
    path = tmp_path / "trace.safetensors"
    save_file({"expert_ids": trace}, str(path))
    kw = dict(device="cpu", max_model_len=48, max_num_seqs=2, max_num_batched_tokens=48)
    llm = LLM("synthetic:qwen1.5-moe-a2.7b:tiny", policy="lru", gpu_memory_budget=0.05, **kw)
    replay = TraceReplay(path, torch.device("cpu"), window=16)
    replay.attach(llm.engine)
    backend = llm.engine.experts
    backend.access_log = []
    prompt = [256, 5, 6, 7, 8]
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    slot = 0  # the only request gets the first KV slot
    base = slot * 16
    groups = backend.access_log
    # prefill: one group per layer with the union of the prompt tokens' experts
    for layer in range(24):
        want = sorted(set(trace[layer, base : base + len(prompt)].flatten().tolist()))
        assert groups[layer] == (layer, tuple(want))
    # decode step i: token at position len(prompt) + i
    decode = groups[24:]
    for i in range(3):
        for layer in range(24):
            pos = base + len(prompt) + i
            assert decode[i * 24 + layer] == (layer, tuple(sorted(trace[layer, pos].tolist())))
    assert "replayed" in replay.describe()


def test_replay_refuses_a_trace_of_another_topology(tmp_path):
    import pytest

    path = tmp_path / "t.safetensors"
    save_file({"expert_ids": torch.zeros(3, 8, 2, dtype=torch.int16)}, str(path))
    llm = LLM("synthetic:qwen1.5-moe-a2.7b:tiny", device="cpu", max_model_len=32)
    with pytest.raises(ValueError, match="does not match"):
        TraceReplay(path, torch.device("cpu")).attach(llm.engine)
