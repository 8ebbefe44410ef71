"""Predictor-driven decode prefetch: outputs equal full-gpu, exact accounting, protection."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from duoserve import LLM, SamplingParams
from duoserve.offload import prefetch
from duoserve.offload.prefetch import PrefetchingExperts
from duoserve.predictor import online
from duoserve.predictor.model import Predictor, PredictorConfig

from .conftest import FAMILIES, budget_for_slots
from .test_parity import PROMPTS

SMALL = dict(
    device="cpu", dtype="float32", max_model_len=64, max_num_seqs=3, max_num_batched_tokens=64
)
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
HAS_PIPELINE = importlib.util.find_spec("duoserve.offload.prefill") is not None
POLICIES = ["uniform", "gate-lookahead", "trace-match", "duoserve"]


def decode_backend(llm: LLM) -> PrefetchingExperts:
    experts = llm.engine.experts
    backend = getattr(experts, "decode", experts)
    assert isinstance(backend, PrefetchingExperts)
    return backend


def budget_for(resident: LLM, num_slots: int) -> float:
    """A budget (GiB) whose plan has exactly `num_slots` expert slots (no prefill ring)."""
    return budget_for_slots(resident, num_slots)


def slots_for(resident: LLM, fraction: float) -> int:
    cfg = resident.engine.model_config
    K, E = cfg.num_experts_per_tok, cfg.num_experts
    need = min(3 * K, E) + 2 * K  # a decode group of 3 sequences, plus room to prefetch
    return max(need, int(fraction * cfg.num_moe_layers * E))


@pytest.fixture(scope="module")
def references(hf_checkpoints):
    """full-gpu logits and greedy tokens per family (the oracle)."""
    out = {}
    for family in FAMILIES:
        resident = LLM(str(hf_checkpoints[family][0]), **SMALL)
        tokens = [o.output_token_ids for o in resident.generate(PROMPTS, GREEDY)]
        out[family] = (resident, resident.logits(PROMPTS), tokens)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("policy", POLICIES)
def test_prefetch_outputs_equal_full_gpu(hf_checkpoints, references, family, policy):
    if policy != "uniform" and not HAS_PIPELINE:
        pytest.skip("needs duoserve.offload.prefill (the prefill pipeline)")
    resident, want_logits, want_tokens = references[family]
    ring = 0 if policy == "uniform" else 2  # pipeline policies: a 2-slot prefill ring
    budget = budget_for(resident, slots_for(resident, 0.5) + ring)
    llm = LLM(str(hf_checkpoints[family][0]), policy=policy, gpu_memory_budget=budget,
              prefetch_distance=2, prefill_ring_slots=ring, **SMALL)  # fmt: skip
    for got, want in zip(llm.logits(PROMPTS), want_logits):
        assert torch.equal(got, want), (family, policy)
    assert [o.output_token_ids for o in llm.generate(PROMPTS, GREEDY)] == want_tokens
    stats = llm.engine.experts.stats()
    assert stats["evictions"] > 0, "the budget must be small enough for evictions"
    if policy != "trace-match":  # trace-match has no library yet here
        assert stats["prefetches"] > 0 and stats["prefetch_hits"] > 0
    assert stats["prefetches"] == (
        stats["prefetch_hits"] + stats["prefetch_evicted_unused"] + stats["prefetch_still_unused"]
    )


# ---------------------------------------------------------------- brute-force accounting


def brute_force_replay(log: list[tuple], capacity: int) -> dict:
    """Replay accesses and prefetches on a plain residency model: LRU victims recomputed from
    the whole history, never pinned (the group) nor protected; raises if none is left."""
    history: list[tuple[int, tuple]] = []  # (time, key) of every insert and access
    resident: list[tuple] = []
    unused: set[tuple] = set()
    out = dict(hits=0, misses=0, prefetches=0, prefetch_hits=0, evicted_unused=0, failed=0)
    now = 0

    def victim(pinned, protected):
        cands = [k for k in resident if k not in pinned and k not in protected]
        if not cands:
            return None
        return min(cands, key=lambda k: (max(t for t, h in history if h == k), k))

    def insert(key, pinned, protected) -> bool:
        if len(resident) == capacity:
            v = victim(pinned, protected)
            if v is None:
                return False
            resident.remove(v)
            if v in unused:
                unused.discard(v)
                out["evicted_unused"] += 1
        resident.append(key)
        history.append((now, key))
        return True

    for event in log:
        if event[0] == "access":
            _, layer, ids, protected = event
            pinned = {(layer, e) for e in ids}
            for e in sorted(ids):
                key = (layer, e)
                if key in resident:
                    out["hits"] += 1
                    if key in unused:
                        unused.discard(key)
                        out["prefetch_hits"] += 1
                else:
                    out["misses"] += 1
                    assert insert(key, pinned, protected), "no victim for a demand miss"
                history.append((now, key))
                now += 1
        else:
            _, key, protected, pinned = event
            if insert(key, set(pinned), protected):
                out["prefetches"] += 1
                unused.add(key)
            else:
                out["failed"] += 1
    out["still_unused"] = len(unused)
    out["resident"] = sorted(resident)
    return out


@pytest.mark.parametrize("prefetch_at", ["prepare", "launch"])
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_prefetch_accounting_matches_brute_force(
    hf_checkpoints, references, family, prefetch_at, monkeypatch
):
    monkeypatch.setattr(prefetch, "PREFETCH_AT", prefetch_at)
    resident = references[family][0]
    path = str(hf_checkpoints[family][0])
    budget = budget_for(resident, slots_for(resident, 0.4))
    llm = LLM(
        path,
        policy="uniform",
        gpu_memory_budget=budget,
        prefetch_distance=2,
        prefetch_eviction="lru",  # the brute force ranks victims as LRU
        **SMALL,
    )
    backend = decode_backend(llm)
    backend.event_log = []
    evicted = []
    cache = backend.cache
    on_evict = cache.policy.on_evict

    def checked_evict(key):  # predictor-aware eviction: never a protected or pinned key
        assert key not in cache.protected, f"protected {key} evicted"
        assert cache.pins[cache.slot_of.get(key, 0)] == 0 or key not in cache.slot_of
        evicted.append(key)
        on_evict(key)

    cache.policy.on_evict = checked_evict
    llm.generate([*PROMPTS, [256, 7, 7, 7], [256, 3]], GREEDY)
    sim = brute_force_replay(backend.event_log, cache.num_slots)
    c = cache.stats
    assert (sim["hits"], sim["misses"]) == (c.hits, c.misses)
    assert (sim["prefetches"], sim["prefetch_hits"]) == (c.prefetches, c.prefetch_hits)
    assert sim["evicted_unused"] == c.prefetch_unused
    assert sim["still_unused"] == len(cache.unused_prefetched)
    assert sim["resident"] == sorted(cache.slot_of)
    assert evicted and c.prefetches > 0 and c.prefetch_unused + sim["still_unused"] > 0
    stats = backend.stats()
    assert stats["bytes_copied"] == (c.misses + c.prefetches) * llm.engine.memory_plan.expert_bytes
    assert stats["prefetch_unused_bytes"] == (
        (c.prefetch_unused + sim["still_unused"]) * llm.engine.memory_plan.expert_bytes
    )
    assert stats["predictor_calls"] > 0 and stats["predictor_host_s"] > 0
    deferred = backend.counters["deferred"]  # split decode layers prefetch after their launch
    assert (deferred > 0) == (prefetch_at == "launch"), (prefetch_at, deferred)


# ---------------------------------------------------------------- predictor files


def save_predictor(path, L, E, K, distances=(1, 2)) -> None:
    torch.manual_seed(0)
    p = Predictor(PredictorConfig(L, E, K, distances=distances, hidden=8, lookahead_width=2))
    p.save(path)


def test_trained_predictor_file_prefetches_and_outputs_match(hf_checkpoints, references, tmp_path):
    resident, _, want_tokens = references["olmoe"]
    cfg = resident.engine.model_config
    path = tmp_path / "p.safetensors"
    save_predictor(path, cfg.num_moe_layers, cfg.num_experts, cfg.num_experts_per_tok)
    budget = budget_for(resident, slots_for(resident, 0.5))
    llm = LLM(str(hf_checkpoints["olmoe"][0]), policy="uniform", gpu_memory_budget=budget,
              predictor=str(path), prefetch_distance=2, **SMALL)  # fmt: skip
    assert isinstance(decode_backend(llm).predictor, online.Learned)
    assert [o.output_token_ids for o in llm.generate(PROMPTS, GREEDY)] == want_tokens
    assert llm.engine.experts.stats()["prefetches"] > 0


def test_predictor_topology_mismatch_is_a_clear_error(hf_checkpoints, references, tmp_path):
    resident = references["olmoe"][0]
    cfg = resident.engine.model_config
    path = tmp_path / "wrong.safetensors"
    save_predictor(path, cfg.num_moe_layers + 1, cfg.num_experts, cfg.num_experts_per_tok)
    budget = budget_for(resident, slots_for(resident, 0.5))
    with pytest.raises(ValueError, match=r"trained for \d+ MoE layers x \d+ experts"):
        LLM(str(hf_checkpoints["olmoe"][0]), policy="uniform", gpu_memory_budget=budget,
            predictor=str(path), **SMALL)  # fmt: skip
    near = tmp_path / "d1.safetensors"
    save_predictor(near, cfg.num_moe_layers, cfg.num_experts, cfg.num_experts_per_tok, (1,))
    with pytest.raises(ValueError, match="predicts distances"):
        LLM(str(hf_checkpoints["olmoe"][0]), policy="uniform", gpu_memory_budget=budget,
            predictor=str(near), prefetch_distance=2, **SMALL)  # fmt: skip


def test_auto_without_a_shipped_file_uses_gate_lookahead(hf_checkpoints, references, capsys):
    resident = references["mixtral"][0]
    online._NOTICES.clear()
    budget = budget_for(resident, slots_for(resident, 0.5))
    llm = LLM(str(hf_checkpoints["mixtral"][0]), policy="uniform", gpu_memory_budget=budget,
              **SMALL)  # fmt: skip
    assert isinstance(decode_backend(llm).predictor, online.GateLookahead)
    err = capsys.readouterr().err
    assert err.count("prefetching with gate-lookahead") == 1


def test_trace_match_library_online_and_given(hf_checkpoints, references):
    """Without a file, finished requests fill the library; a given library is used at once."""
    resident, _, _ = references["qwen3_moe"]
    path = str(hf_checkpoints["qwen3_moe"][0])
    budget = budget_for(resident, slots_for(resident, 0.5))
    llm = LLM(path, policy="uniform", gpu_memory_budget=budget, **SMALL)
    backend = decode_backend(llm)
    backend.predictor = online.TraceMatch(
        backend.cfg, backend.blocks, backend.state, torch.device("cpu"), 4
    )
    prompts = [*PROMPTS, [256, 5, 6, 7], [256, 11, 12], [256, 1, 2]]  # more than 3 slots
    want = [o.output_token_ids for o in resident.generate(prompts, GREEDY)]
    assert [o.output_token_ids for o in llm.generate(prompts, GREEDY)] == want
    assert backend.predictor.library.shape[0] >= 1 and backend.cache.stats.prefetches > 0
    cfg = backend.cfg
    backend.predictor.set_library(torch.rand(5, cfg.num_moe_layers, cfg.num_experts))
    before = backend.cache.stats.prefetches
    assert [o.output_token_ids for o in llm.generate(PROMPTS, GREEDY)] == references["qwen3_moe"][2]
    assert backend.cache.stats.prefetches > before


@pytest.mark.gpu
@pytest.mark.parametrize("policy", POLICIES)
def test_prefetch_outputs_equal_full_gpu_on_cuda(policy):
    kw = dict(device="cuda", dtype="bfloat16", max_model_len=96, max_num_seqs=3,
              max_num_batched_tokens=96, enforce_eager=1)  # fmt: skip
    model = "synthetic:qwen3-30b-a3b:tiny"
    prompts = [[256, *range(1, 40)], [256, 9, 10], [256, 40, 41, 42, 43]]
    resident = LLM(model, **kw)
    want = [o.output_token_ids for o in resident.generate(prompts, GREEDY)]
    want_logits = resident.logits(prompts)
    budget = budget_for(resident, 64)
    del resident
    llm = LLM(model, policy=policy, gpu_memory_budget=budget, prefetch_distance=2, **kw)
    assert [o.output_token_ids for o in llm.generate(prompts, GREEDY)] == want
    for got, ref in zip(llm.logits(prompts), want_logits):
        assert torch.equal(got, ref), policy
    stats = llm.engine.experts.stats()
    assert stats["misses"] > 0
    assert stats["prefetches"] == (
        stats["prefetch_hits"] + stats["prefetch_evicted_unused"] + stats["prefetch_still_unused"]
    )
