"""Where the host time of an offloaded decode step goes (GPU machine; a diagnostic).

    PYTHONPATH=. python3 scripts/profile_decode_host.py --policies lru duoserve

Builds the full-size Qwen3-30B-A3B topology (bf16) with replayed routing, decodes with each
policy, and wraps the host-side stages of a step in wall-clock timers: graph replays, the
routing sync (.tolist(), a wait for the device), cache bookkeeping, copy issue, prefetch
issue, expert-compute launches. Prints ms per step for each stage, and the CUDA allocator's
retries (each one a device sync).
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections import defaultdict

import torch

from duoserve.bench.common import random_prompt
from duoserve.bench.replay import TraceReplay
from duoserve.config import EngineConfig
from duoserve.engine.llm_engine import LLMEngine
from duoserve.layers import moe
from duoserve.layers.sampler import SamplingParams
from duoserve.offload import backends, prefetch, transfer
from duoserve.offload.expert_cache import ExpertCache

TIMES: dict[str, float] = defaultdict(float)
COUNTS: dict[str, int] = defaultdict(int)


def timed(owner, name: str, label: str) -> None:
    fn = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[label] += time.perf_counter() - t0
            COUNTS[label] += 1

    setattr(owner, name, wrapper)


def instrument() -> None:
    timed(torch.cuda.CUDAGraph, "replay", "graph replay")
    timed(moe, "sync_routed_experts", "routing sync (.tolist)")
    timed(backends.CachedExperts, "compute", "backend.compute (all)")
    timed(ExpertCache, "acquire_group", "  cache.acquire_group")
    timed(ExpertCache, "release", "  cache.release")
    timed(transfer.TransferEngine, "copy_in", "  transfer.copy_in")
    timed(transfer.TransferEngine, "flush", "  transfer.flush")
    timed(backends, "grouped_mlp_views", "    grouped_mlp_views")
    timed(transfer.TransferEngine, "mark_read_slots", "  transfer.mark_read_slots")
    timed(transfer.TransferEngine, "wait_ready_slots", "  transfer.wait_ready_slots")
    timed(backends.CachedExperts, "_grouped_wave", "  _grouped_wave (incl. waits)")
    timed(backends.CachedExperts, "_sort_keys", "    _sort_keys")
    timed(prefetch.PrefetchingExperts, "after_misses_issued", "  after_misses_issued")
    timed(moe.MoEBlock, "run_experts", "run_experts (sync+compute)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--policies", nargs="+", default=["lru", "duoserve"])
    p.add_argument("--budget", type=float, default=12.0)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--eager", action="store_true")
    args = p.parse_args()
    engine = LLMEngine(
        "synthetic:qwen3-30b-a3b",
        EngineConfig(
            device="cuda",
            dtype="bfloat16",
            max_model_len=256,
            max_num_seqs=1,
            max_num_batched_tokens=256,
            policy="lru",
            gpu_memory_budget=args.budget,
            enforce_eager=int(args.eager),
        ),
    )
    trace = "duoserve/assets/traces/qwen3-30b-a3b-topology.heldout.safetensors"
    TraceReplay(trace, engine.device).attach(engine)
    instrument()
    prompt = random_prompt(engine.model_config.vocab_size, 128)
    for policy in args.policies:
        engine.set_expert_policy(policy, args.budget)
        params = SamplingParams(temperature=0, max_tokens=args.steps + 8, ignore_eos=True)
        engine.add_request(prompt, params)
        for _ in range(8):  # prefill, capture, warm
            engine.step()
        torch.cuda.synchronize()
        TIMES.clear()
        COUNTS.clear()
        retries0 = torch.cuda.memory_stats().get("num_alloc_retries", 0)
        t0 = time.perf_counter()
        n = 0
        while engine.has_unfinished_requests():
            engine.step()
            n += 1
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        retries = torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries0
        print(f"\n{policy}: {n} steps, {wall / n * 1e3:.1f} ms/step, alloc retries {retries}")
        for label, s in TIMES.items():
            print(f"  {label:36s} {s / n * 1e3:8.2f} ms/step  {COUNTS[label] / n:7.1f} calls/step")
        print_syncs(engine, prompt)


def print_syncs(engine, prompt) -> None:
    """Device-synchronizing calls of one decode step (torch's sync debug mode), by place."""
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    engine.step()
    engine.step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    places: dict[str, int] = defaultdict(int)
    for w in caught:
        places[f"{w.filename}:{w.lineno} {str(w.message)[:60]}"] += 1
    print(f"  synchronizing calls in one decode step: {len(caught)}")
    for place, n in sorted(places.items(), key=lambda t: -t[1]):
        print(f"    {n:4d}  {place}")
    while engine.has_unfinished_requests():
        engine.step()


if __name__ == "__main__":
    main()
