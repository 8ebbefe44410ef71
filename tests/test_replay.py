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
    # the old format has no lookahead signal
    assert replay.lookahead_distances == () and replay.lookahead_probs(0, 1, torch.zeros(1)) is None


def test_replay_refuses_a_trace_of_another_topology(tmp_path):
    import pytest

    path = tmp_path / "t.safetensors"
    save_file({"expert_ids": torch.zeros(3, 8, 2, dtype=torch.int16)}, str(path))
    llm = LLM("synthetic:qwen1.5-moe-a2.7b:tiny", device="cpu", max_model_len=32)
    with pytest.raises(ValueError, match="does not match"):
        TraceReplay(path, torch.device("cpu")).attach(llm.engine)


# ------------------------------------------------------------------ replay format with lookahead


def lookahead_trace(num_layers: int, num_experts: int, top_k: int, lengths: list[int], D: int):
    """A RoutingTrace of random routing and random top-M lookahead (M = 2K), -1 past L."""
    from duoserve.predictor.trace import RoutingTrace

    gen = torch.Generator().manual_seed(1)
    N, M = sum(lengths), 2 * top_k
    order = torch.rand(N, num_layers, num_experts, generator=gen).argsort(-1)
    ids = torch.full((N, num_layers, D, M), -1, dtype=torch.int16)
    probs = torch.zeros(N, num_layers, D, M, dtype=torch.float16)
    for d in range(1, D + 1):
        ids[:, : num_layers - d, d - 1] = order[:, : num_layers - d, :M].to(torch.int16)
        p = torch.rand(N, num_layers - d, M, generator=gen).sort(-1, descending=True).values
        probs[:, : num_layers - d, d - 1] = (p * 0.5).half()
    seq_id = torch.cat([torch.full((n,), s) for s, n in enumerate(lengths)]).to(torch.int32)
    position = torch.cat([torch.arange(n) for n in lengths]).to(torch.int32)
    return RoutingTrace(
        expert_ids=order[:, :, -top_k:].to(torch.int16),
        seq_id=seq_id,
        position=position,
        is_prefill=position < 5,
        step=torch.arange(N, dtype=torch.int32),
        num_experts=num_experts,
        lookahead_ids=ids,
        lookahead_probs=probs,
        meta={"model": "test"},
    )


def test_replay_file_round_trips(tmp_path):
    from duoserve.predictor.replay_file import bytes_per_token, read_replay, write_replay
    from duoserve.predictor.trace import load_trace

    trace = lookahead_trace(5, 8, 2, [30, 12, 40, 25], D=3)
    path = tmp_path / "r.safetensors"
    summary = write_replay(trace, path, max_bytes=1 << 20, distances=(1, 2))
    assert summary["tokens"] == 107 and summary["sequences"] == 4
    data = read_replay(path)
    assert data.distances == (1, 2) and data.num_experts == 8
    assert data.seq_start.tolist() == [0, 30, 42, 82]
    assert torch.equal(data.expert_ids, trace.expert_ids.permute(1, 0, 2).long())
    want_ids = trace.lookahead_ids[:, :, :2].permute(1, 0, 2, 3).long()
    assert torch.equal(data.lookahead_ids, want_ids) and (data.lookahead_ids[-1] == -1).all()
    want = trace.lookahead_probs[:, :, :2].permute(1, 0, 2, 3).float()
    valid = want_ids >= 0
    rel = (data.lookahead_probs - want).abs() / want.clamp_min(1e-4)
    assert float(rel[valid].max()) <= 0.019 and (data.lookahead_probs[~valid] == 0).all()
    back = load_trace(path)  # the predictor tools read it as a trace
    for name in ("expert_ids", "seq_id", "position", "is_prefill"):
        assert torch.equal(getattr(back, name), getattr(trace, name)), name
    assert torch.equal(back.lookahead_ids, trace.lookahead_ids[:, :, :2])
    # a byte budget keeps whole sequences, spread over the trace
    small = write_replay(
        trace, tmp_path / "s.safetensors", 8192 + 60 * (bytes_per_token(trace, 1, 4) + 1)
    )
    assert small["sequences"] == 2 and small["tokens"] <= 60
    assert read_replay(tmp_path / "s.safetensors").seq_start.tolist() == [0, 30]  # seqs 0, 3


class _Spy:
    """Wraps a TraceReplay: records lookahead_probs(d=1, d=3) at every routed layer."""

    def __init__(self, replay) -> None:
        self.replay, self.calls = replay, []

    def __call__(self, layer_id, x, topk_ids, topk_weights):
        from duoserve.engine.context import get_step_context

        ctx = get_step_context()
        slots, positions = ctx.token_slots_dev.clone(), ctx.positions_dev.clone()
        probs = self.replay.lookahead_probs(layer_id, 1, x)
        assert self.replay.lookahead_probs(layer_id, 3, x) is None  # d=3 not recorded
        self.calls.append((layer_id, slots, positions, probs))
        return self.replay(layer_id, x, topk_ids, topk_weights)


def test_replay_lookahead_probs_follow_the_replayed_tokens(tmp_path):
    from duoserve.predictor.replay_file import read_replay, write_replay

    # synthetic qwen1.5-moe tiny: 24 MoE layers x 60 experts, top-4
    trace = lookahead_trace(24, 60, 4, [20, 16, 24], D=2)
    path = tmp_path / "r.safetensors"
    write_replay(trace, path, distances=(1, 2))
    data = read_replay(path)
    kw = dict(device="cpu", max_model_len=48, max_num_seqs=2, max_num_batched_tokens=48)
    llm = LLM("synthetic:qwen1.5-moe-a2.7b:tiny", **kw)
    replay = TraceReplay(path, torch.device("cpu"))
    replay.attach(llm.engine)
    assert replay.lookahead_distances == (1, 2) and "lookahead" in replay.describe()
    spy = _Spy(replay)
    for block in llm.engine.model.moe_blocks():
        block.routing_hook = spy
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    llm.generate([[256, 5, 6, 7], [256, 9, 10]], params)
    assert len(spy.calls) >= 24 * 3
    layer_of = {lid: i for i, lid in enumerate(llm.engine.model_config.moe_layer_ids)}
    bases = replay.slot_bases(llm.engine.kv.num_slots + 1)
    assert bases == [int(data.seq_start[(s * 3) // len(bases)]) for s in range(len(bases))]
    for layer_id, slots, positions, probs in spy.calls:
        layer = layer_of[layer_id]
        for t in range(probs.shape[0]):
            row = (bases[int(slots[t])] + int(positions[t])) % data.expert_ids.shape[1]
            want = torch.zeros(60)
            ids = data.lookahead_ids[layer, row, 0]
            want[ids[ids >= 0]] = data.lookahead_probs[layer, row, 0][ids >= 0]
            assert torch.equal(probs[t], want), (layer, t)
        if layer == 23:
            assert (probs == 0).all()  # no layer 24 to look ahead to
