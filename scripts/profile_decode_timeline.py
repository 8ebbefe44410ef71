"""Where an offloaded decode step loses the link: a device timeline (GPU machine; diagnostic).

    PYTHONPATH=. python3 scripts/profile_decode_timeline.py --out $OUT \
        --variants duoserve:prepare duoserve:launch lru

Builds the full-size Qwen3-30B-A3B topology (bf16, routing replayed from the shipped trace),
and for each variant (policy[:prefetch_at[:eviction]]) decodes at batch 1: TPOT over
`--steps` steps without the profiler, then 3 steps under torch.profiler with the host stages
marked (routing sync, acquire + misses, prefetch, graph replays). From the trace it prints,
per step: wall time, the time the host->device link is busy (union of the copies), the time
it idles, and what the host was doing while it idled; the same for the compute stream. One
Chrome trace per variant is written to --out (gzip).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from duoserve.bench.common import random_prompt
from duoserve.bench.prefill import union_spans
from duoserve.bench.replay import TraceReplay
from duoserve.config import EngineConfig
from duoserve.engine.llm_engine import LLMEngine
from duoserve.layers import moe
from duoserve.layers.sampler import SamplingParams
from duoserve.offload import backends, prefetch

TRACE = "duoserve/assets/traces/qwen3-30b-a3b-topology.heldout.safetensors"
LABELS = {  # (owner, method) -> host stage
    (moe, "sync_routed_experts"): "sync",
    (backends.CachedExperts, "prepare"): "prepare",
    (prefetch.PrefetchingExperts, "_issue_prefetches"): "prefetch",
    (backends.CachedExperts, "after_compute"): "after_compute",
    (torch.cuda.CUDAGraph, "replay"): "replay",
}


def instrument() -> None:
    for (owner, name), label in LABELS.items():
        fn = getattr(owner, name)

        def wrapper(*args, _fn=fn, _label=label, **kwargs):
            with record_function(f"ds::{_label}"):
                return _fn(*args, **kwargs)

        setattr(owner, name, wrapper)


def gaps(busy: list[tuple[float, float]], lo: float, hi: float) -> list[tuple[float, float]]:
    out, t = [], lo
    for a, b in busy:
        if a > t:
            out.append((t, min(a, hi)))
        t = max(t, b)
    if t < hi:
        out.append((t, hi))
    return [(a, b) for a, b in out if b > a]


def host_stage(stages: list[tuple[float, float, str]], t: float) -> str:
    """The innermost ds:: stage covering time t (or 'other')."""
    best = None
    for a, b, name in stages:
        if a <= t <= b and (best is None or b - a < best[1] - best[0]):
            best = (a, b, name)
    return best[2] if best else "other"


def analyse(trace_path: str) -> dict:
    """Per-step link and compute idle time (us), with the host stage during link idle."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    steps, stages, copies, kernels = [], [], [], []
    for e in events:
        if e.get("ph") != "X":
            continue
        a, b, name, cat = e["ts"], e["ts"] + e.get("dur", 0), e.get("name", ""), e.get("cat", "")
        if cat == "user_annotation" and name == "ds::step":  # host ranges (not their GPU twins)
            steps.append((a, b))
        elif cat == "user_annotation" and name.startswith("ds::"):
            stages.append((a, b, name[4:]))
        elif cat == "gpu_memcpy" and "HtoD" in name and e["args"].get("bytes", 0) >= 2**20:
            copies.append((a, b))  # expert copies (not the small inputs)
        elif cat == "kernel":
            kernels.append((a, b))
    link, comp = union_spans(copies), union_spans(kernels)
    out = defaultdict(float)
    for lo, hi in steps:
        out["wall"] += hi - lo
        for name, busy in (("link", link), ("compute", comp)):
            idle = gaps([(a, b) for a, b in busy if b > lo and a < hi], lo, hi)
            out[f"{name}_idle"] += sum(b - a for a, b in idle)
            if name == "link":
                for a, b in idle:
                    out[f"link_idle_during_{host_stage(stages, (a + b) / 2)}"] += b - a
    n = max(len(steps), 1)
    return {k: v / n for k, v in out.items()} | {"steps": len(steps)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variants", nargs="+", default=["duoserve:prepare", "duoserve:launch"])
    p.add_argument("--budget", type=float, default=12.0)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument(
        "--no-profile", action="store_true", help="TPOT only (the profiler slows the host)"
    )
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    engine = LLMEngine(
        "synthetic:qwen3-30b-a3b",
        EngineConfig(device="cuda", dtype="bfloat16", max_model_len=256, max_num_seqs=1,
                     max_num_batched_tokens=256, policy="lru", gpu_memory_budget=args.budget),
    )  # fmt: skip
    TraceReplay(TRACE, engine.device).attach(engine)
    instrument()
    prompt = random_prompt(engine.model_config.vocab_size, 128)
    print(f"{'variant':28s} {'TPOT ms':>8s} {'wall':>7s} {'link idle':>9s} {'comp idle':>9s}  "
          "link idle by host stage (ms)")  # fmt: skip
    for variant in args.variants:
        policy, _, rest = variant.partition(":")
        at, _, eviction = rest.partition(":")
        if eviction:
            engine.config = engine.config.replace(prefetch_eviction=eviction)
        engine.set_expert_policy(policy, args.budget)
        backend = getattr(engine.experts, "decode", engine.experts)
        if at:
            backend.prefetch_at = at
        params = SamplingParams(temperature=0, max_tokens=args.steps + 14, ignore_eos=True)
        engine.add_request(prompt, params)
        for _ in range(8):  # prefill, capture, warm
            engine.step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
        tpot = (time.perf_counter() - t0) / args.steps
        stats = backend.stats()
        backend = None  # the next set_expert_policy frees its cache
        copies = (stats["misses"] + stats.get("prefetches", 0)) / (args.steps + 8)
        if args.no_profile:
            while engine.has_unfinished_requests():
                engine.step()
            print(
                f"{variant:28s} {tpot * 1e3:8.1f}  ({copies:.0f} copies per step,"
                " prefill and warm-up included)",
                flush=True,
            )
            continue
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                with record_function("ds::step"):
                    engine.step()
                    torch.cuda.synchronize()
        while engine.has_unfinished_requests():
            engine.step()
        path = os.path.join(args.out, f"timeline-{variant.replace(':', '-')}.json")
        prof.export_chrome_trace(path)
        r = analyse(path)
        with open(path, "rb") as f, gzip.open(path + ".gz", "wb") as g:
            g.write(f.read())
        os.remove(path)
        by_stage = {k[len("link_idle_during_") :]: v / 1e3 for k, v in r.items()
                    if k.startswith("link_idle_during_")}  # fmt: skip
        stages = " ".join(f"{k}={v:.1f}" for k, v in sorted(by_stage.items(), key=lambda t: -t[1]))
        print(f"{variant:28s} {tpot * 1e3:8.1f} {r['wall'] / 1e3:7.1f} "
              f"{r['link_idle'] / 1e3:9.1f} {r['compute_idle'] / 1e3:9.1f}  {stages}",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
