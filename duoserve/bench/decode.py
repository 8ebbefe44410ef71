"""Decode prefetch benchmark: TPOT per policy next to the Belady and compute-only bounds.

    python -m duoserve.bench.decode --budgets 8 12 16 --out decode.json

One full-size synthetic model (bf16) is built once; routing is replayed from a held-out trace
of the trained model of the same topology (bench/replay.py), so every policy sees the same
expert accesses. Per (batch, budget, policy): a 128-token prompt per sequence, then N decode
tokens. Printed next to TPOT:
- Belady bound: the decode-part misses of Belady-optimal eviction at the same cache size over
  the same access groups (prefill + decode, recorded in the `lru` run), times the expert
  size, over the link bandwidth measured in this run, per decode step;
- compute-only TPOT: `full-gpu` (every expert resident) when it fits;
- time compute waited on copies, bytes prefetched but unused, predictor time per step as %
  of TPOT: host time of its calls and CUDA events around them when decode runs eagerly
  (`--eager`); with segmented decode graphs (the default) its calls are captured, cost the
  host nothing, and their device time is measured apart (`predictor_graph_ms`: one step's
  calls in one graph, timed over replays); host time per MoE layer (TPOT minus
  routing-sync waits, over the MoE layers).

Prefetching policies run once per `--prefetch-budgets` value (0: the engine's default).
"""

from __future__ import annotations

import argparse
import time

import torch

from duoserve.bench.common import (
    environment,
    measure_link_bandwidth,
    print_table,
    random_prompt,
    write_json,
)
from duoserve.config import EngineConfig
from duoserve.engine.llm_engine import LLMEngine
from duoserve.layers.sampler import SamplingParams
from duoserve.offload.simulate import belady_misses

POLICIES = ["lru", "uniform", "duoserve", "gate-lookahead", "trace-match"]
PREFETCHING = ("uniform", "duoserve", "gate-lookahead", "trace-match")
TRACE = "duoserve/assets/traces/qwen3-30b-a3b-topology.heldout.safetensors"
GB = 1e9


def decode_backend(engine: LLMEngine):
    experts = engine.experts
    return getattr(experts, "decode", experts)


def run_once(engine: LLMEngine, prompts: list[list[int]], max_tokens: int, log: bool) -> dict:
    """Generate greedily for all prompts at once; per-step decode wall times and sync waits."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    backend = decode_backend(engine)
    if log and hasattr(backend, "access_log"):
        backend.access_log = []
    reqs = [engine.add_request(p, params) for p in prompts]
    step_s, sync_s, before, prefill_groups = [], [], None, 0
    stats_of = getattr(engine.experts, "stats", lambda: {})
    while engine.has_unfinished_requests():
        decoding = all(r.output_token_ids for r in reqs)
        if decoding and before is None:
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            before = stats_of()
            prefill_groups = len(backend.access_log or []) if log else 0
        t0 = time.perf_counter()
        engine.step()
        if decoding:
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            step_s.append(time.perf_counter() - t0)
            sync_s.append(engine.runner.last_stats.get("routing_sync_s", 0.0))
    after = stats_of()
    diff = {
        k: after[k] - (before or {}).get(k, 0) for k in after if isinstance(after[k], float | int)
    }
    groups = list(backend.access_log) if log and getattr(backend, "access_log", None) else None
    if log and hasattr(backend, "access_log"):
        backend.access_log = None
    return dict(step_s=step_s, sync_s=sync_s, stats=diff, groups=groups, split=prefill_groups)


def predictor_graph_ms(engine, backend, batch: int, repeats: int = 20) -> float | None:
    """Device ms of one decode step's predictor calls (every MoE layer and distance) for
    `batch` rows, captured in one CUDA graph and timed over replays (on the scratch slot)."""
    from duoserve.engine.context import step_context
    from duoserve.engine.cuda_graphs import static_context, static_inputs

    if engine.device.type != "cuda" or not hasattr(backend, "predictor"):
        return None
    cfg, dev = engine.model_config, engine.device
    inputs = static_inputs(engine.kv, batch, dev)
    inputs[1] = 7  # a position inside every replayed sequence
    ctx = static_context(inputs, engine.kv)
    ctx.capturing = True
    x = torch.randn(batch, cfg.hidden_size, device=dev, dtype=engine.dtype)
    L = cfg.num_moe_layers

    def calls() -> None:
        for li in range(L):
            for d in range(1, backend.distance + 1):
                if li + d < L:
                    backend.predictor.predict(li, d, x, backend.budget)

    with torch.inference_mode(), step_context(ctx):
        backend.state.begin(ctx)
        calls()  # warm-up: lazily built call plans
        torch.cuda.synchronize(dev)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            calls()
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            graph.replay()
        end.record()
        end.synchronize()
    backend.state.ctx = None  # the next step adopts its own context
    return start.elapsed_time(end) / repeats


def measure(
    engine,
    policy,
    budget,
    prompts,
    args,
    link_gbps,
    library,
    prefetch=0,
    eviction="next-use",
    prefetch_at=None,
) -> dict:
    engine.config = engine.config.replace(prefetch_budget=prefetch, prefetch_eviction=eviction)
    engine.set_expert_policy(policy, budget)
    backend = decode_backend(engine)
    if prefetch_at is not None and hasattr(backend, "prefetch_at"):
        backend.prefetch_at = prefetch_at
    if library is not None and getattr(getattr(backend, "predictor", None), "name", "") == (
        "trace-match"
    ):
        backend.predictor.set_library(library)
    run_once(engine, [p[: args.prompt_len // 2] for p in prompts], 4, False)  # warm-up
    r = run_once(engine, prompts, args.max_tokens, policy == "lru")
    steps, s, L = len(r["step_s"]), r["stats"], engine.model_config.num_moe_layers
    tpot = sorted(r["step_s"])[steps // 2] if steps else None  # median decode step
    mean = sum(r["step_s"]) / max(steps, 1)
    row = dict(
        policy=policy
        if not hasattr(backend, "budget")
        else f"{policy} b={backend.budget} {backend.cache.policy.name} {backend.prefetch_at}",
        prefetch_budget=getattr(backend, "budget", None),
        prefetch_at=getattr(backend, "prefetch_at", None),
        eviction=backend.cache.policy.name if hasattr(backend, "cache") else None,
        cuda_graphs=engine.runner.graphs is not None,
        budget_gib=budget,
        batch=len(prompts),
        tpot_ms=tpot * 1e3 if tpot else None,
        tpot_mean_ms=mean * 1e3,
        slots=engine.memory_plan.num_expert_slots if engine.memory_plan else None,
        hit_rate=s["hits"] / max(s["hits"] + s["misses"], 1) if "hits" in s else None,
        decode_gb_per_step=s.get("bytes_copied", 0) / GB / max(steps, 1),
        wait_ms_per_step=s.get("wait_seconds", 0) * 1e3 / max(steps, 1),
        unused_gb=s.get("prefetch_unused_bytes", 0) / GB,
        prefetches=s.get("prefetches"),
        prefetch_hits=s.get("prefetch_hits"),
        host_ms_per_layer=(mean - sum(r["sync_s"]) / max(steps, 1)) * 1e3 / L,
    )
    if "predictor_host_s" in s and steps:
        row["predictor_host_pct"] = 100 * s["predictor_host_s"] / steps / mean
        row["predictor_cuda_pct"] = 100 * s.get("predictor_device_s", 0) / steps / mean
        if engine.runner.graphs is not None:
            ms = predictor_graph_ms(engine, backend, len(prompts))
            row["predictor_graph_ms"] = ms
            row["predictor_cuda_pct"] = 100 * ms / 1e3 / mean if ms is not None else None
    if r["groups"] is not None and link_gbps:
        slots = engine.memory_plan.num_expert_slots
        sim = belady_misses(r["groups"], slots)
        decode_misses = sum(len(m) for m in sim.group_miss_ids[r["split"] :])
        expert_bytes = engine.memory_plan.expert_bytes
        row["belady_ms"] = decode_misses * expert_bytes / (link_gbps * GB) / steps * 1e3
        row["belady_misses_per_step"] = decode_misses / steps
    return row


def build_engine(args) -> tuple[LLMEngine, object]:
    engine = LLMEngine(
        f"synthetic:{args.arch}:{args.scale}",
        EngineConfig(
            device=args.device,
            dtype=args.dtype,
            max_model_len=args.prompt_len + args.max_tokens + 16,
            max_num_seqs=max(args.batches),
            max_num_batched_tokens=args.prompt_len * max(args.batches),
            policy="ondemand",  # one slot until the link is measured
            gpu_memory_budget=max(args.budgets),
            predictor=args.predictor,
            prefetch_distance=args.distance,
            enforce_eager=int(args.eager),
        ),
    )
    from duoserve.bench.replay import TraceReplay

    replay = TraceReplay(args.trace, engine.device)
    replay.attach(engine)
    return engine, replay


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m duoserve.bench.decode", description=__doc__)
    p.add_argument("--arch", default="qwen3-30b-a3b")
    p.add_argument("--scale", default="full")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--trace", default=TRACE)
    p.add_argument("--budgets", nargs="+", type=float, default=[8, 12, 16])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    p.add_argument("--policies", nargs="+", default=POLICIES)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--predictor", default="auto")
    p.add_argument("--distance", type=int, default=1)
    p.add_argument("--no-full-gpu", action="store_true")
    p.add_argument("--eager", action="store_true", help="no decode CUDA graphs")
    p.add_argument("--prefetch-budgets", nargs="+", type=int, default=[0])
    p.add_argument(
        "--evictions", nargs="+", default=["next-use"], help="prefetching policies' evictions"
    )
    p.add_argument(
        "--prefetch-at",
        nargs="+",
        default=[None],
        choices=["prepare", "launch"],
        help="when a split decode layer issues its prefetches (offload/prefetch.py PREFETCH_AT)",
    )
    p.add_argument("--repeats", type=int, default=1, help="measure each prefetching run N times")
    p.add_argument("--out", default="bench/results/decode.json")
    args = p.parse_args(argv)
    policies = ["lru", *[x for x in args.policies if x != "lru"]]  # lru logs the accesses
    engine, replay = build_engine(args)
    print(replay.describe(), flush=True)
    cfg = engine.model_config
    cuda = engine.device.type == "cuda"
    expert_bytes = cfg.expert_numel * torch.empty((), dtype=engine.dtype).element_size()
    link = measure_link_bandwidth(engine.device, expert_bytes) if cuda else {}
    link_gbps = link.get("copy_64_experts_gbps") or (None if cuda else 50.0)
    from duoserve.predictor.online import library_from_trace

    bases = frozenset(replay.slot_bases(engine.kv.num_slots + 1))
    library = library_from_trace(args.trace, cfg.num_experts, exclude_starts=bases)
    rows = []
    for batch in args.batches:
        prompts = [random_prompt(cfg.vocab_size, args.prompt_len, seed=i) for i in range(batch)]
        budgets = args.budgets if batch == 1 else [sorted(args.budgets)[len(args.budgets) // 2]]
        for budget in budgets:
            belady = None
            runs = [
                (policy, b, ev, at)
                for _ in range(args.repeats)
                for policy in policies
                for b in (args.prefetch_budgets if policy in PREFETCHING else [0])
                for ev in (args.evictions if policy in PREFETCHING else ["lru"])
                for at in (args.prefetch_at if policy in PREFETCHING else [None])
                if policy in PREFETCHING or _ == 0
            ]
            for policy, b, ev, at in runs:
                try:
                    row = measure(
                        engine, policy, budget, prompts, args, link_gbps, library, b, ev, at
                    )
                except (ValueError, ImportError, RuntimeError) as err:  # not buildable here
                    row = dict(policy=policy, budget_gib=budget, batch=batch, error=str(err))
                belady = row.get("belady_ms", belady)
                row.setdefault("belady_ms", belady)
                rows.append(row)
                print(row, flush=True)
        if not args.no_full_gpu:
            try:
                rows.append(measure(engine, "full-gpu", None, prompts, args, None, None))
            except (ValueError, RuntimeError) as err:
                rows.append(dict(policy="full-gpu", batch=batch, error=str(err)[:200]))
            compute = rows[-1].get("tpot_ms")
            for r in rows:
                if r.get("batch") == batch:
                    r["compute_only_ms"] = compute
            print(rows[-1], flush=True)
    meta = {"env": environment(), "args": vars(args), "routing": replay.describe(), "link": link}
    write_json(args.out, {**meta, "rows": rows})
    print(f"link (pinned host->GPU): {link}")
    print_table(rows, COLUMNS)


COLUMNS = [
    ("policy", "policy", "s"),
    ("batch", "B", "d"),
    ("budget_gib", "GiB", ".1f"),
    ("tpot_ms", "TPOT ms", ".1f"),
    ("belady_ms", "Belady ms", ".1f"),
    ("compute_only_ms", "compute ms", ".1f"),
    ("hit_rate", "hit rate", ".3f"),
    ("wait_ms_per_step", "wait ms", ".2f"),
    ("unused_gb", "unused GB", ".3f"),
    ("predictor_host_pct", "pred host%", ".1f"),
    ("predictor_cuda_pct", "pred cuda%", ".1f"),
    ("predictor_graph_ms", "pred graph ms", ".2f"),
    ("host_ms_per_layer", "host ms/L", ".3f"),
    ("slots", "slots", "d"),
]


if __name__ == "__main__":
    main()
