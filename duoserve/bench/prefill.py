"""Prefill TTFT per expert policy and budget, next to the PCIe bound measured in the same run.

    python -m duoserve.bench.prefill --arch qwen3-30b-a3b --budgets 8 12 16
    python -m duoserve.bench.prefill --arch mixtral-8x7b --expert-dtype int4 \
        --budget-fractions 0.15 0.25
    python -m duoserve.bench.prefill --arch qwen3-30b-a3b --scale tiny --device cpu \
        --budgets 0.05 --prompts 64 128           # CPU smoke run

One process, one model: experts are pinned once, each (budget, prompt, policy) gets a fresh
backend (cold cache) over the same host store. Routing is replayed from the held-out trace of a
trained model of the same topology (`--trace auto`), so the routed sets are realistic. For each
run: TTFT (one prefill step, max_num_batched_tokens = the longest prompt), the bound = bytes of
routed experts that must cross PCIe (cold cache: every routed expert once) / link bandwidth
measured here, peak GPU memory (max_memory_reserved, reset per run) vs the budget, link
utilisation and wasted (speculative, unused) bytes. Also a timeline of copy and expert-compute
intervals (CUDA events) of one 512-token pipeline prefill, drawn as a PNG.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from duoserve.bench.common import environment, print_table, random_prompt, write_json
from duoserve.config import EngineConfig, ModelConfig
from duoserve.engine.llm_engine import LLMEngine
from duoserve.layers.sampler import SamplingParams
from duoserve.offload.planner import dense_bytes
from duoserve.offload.prefill import PrefillPipeline
from duoserve.weights.synthetic import synthetic_config

GB, GiB = 1e9, 2**30
TRACES = Path(__file__).resolve().parent.parent / "assets" / "traces"
BUDGET_FREE_POLICIES = ("ondemand",)  # no cache: measured at the first budget only


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m duoserve.bench.prefill", description=__doc__)
    p.add_argument("--arch", default="qwen3-30b-a3b")
    p.add_argument("--scale", default="full", help="full or tiny (a smoke run)")
    p.add_argument("--expert-dtype", default="bf16", choices=["bf16", "int4"])
    p.add_argument("--budgets", nargs="*", type=float, default=None, help="GiB")
    p.add_argument(
        "--budget-fractions",
        nargs="*",
        type=float,
        default=None,
        help="budgets as fractions of the model's bf16 bytes (the published checkpoint)",
    )
    p.add_argument("--prompts", nargs="+", type=int, default=[128, 512, 2048])
    p.add_argument("--policies", nargs="+", default=["pipeline", "lru", "ondemand", "uniform"])
    p.add_argument("--extra-policies", nargs="*", default=["duoserve"])
    p.add_argument("--trace", default="auto", help="auto, none, or a trace .safetensors")
    p.add_argument("--device", default="cuda")
    p.add_argument("--timeline", default="docs/figures/prefill_timeline.png")
    p.add_argument("--timeline-prompt", type=int, default=512)
    p.add_argument("--out", default=None, help="JSON (default bench/results/prefill-ARCH.json)")
    args = p.parse_args(argv)
    if args.budgets is None and args.budget_fractions is None:
        args.budgets = [8.0, 12.0, 16.0]
    return args


def build_engine(args: argparse.Namespace, budget: float) -> LLMEngine:
    longest = max([*args.prompts, args.timeline_prompt])
    config = EngineConfig(
        device=args.device,
        dtype="bfloat16" if args.device.startswith("cuda") else "float32",
        max_model_len=longest + 16,
        max_num_seqs=1,
        max_num_batched_tokens=longest,
        policy="pipeline",
        gpu_memory_budget=budget,  # re-planned per run by set_expert_policy
        expert_dtype=args.expert_dtype,
        enforce_eager=1,
    )
    t0 = time.perf_counter()
    engine = LLMEngine(f"synthetic:{args.arch}:{args.scale}", config)
    print(f"model built and experts stored in {time.perf_counter() - t0:.1f} s", flush=True)
    return engine


def attach_trace(engine: LLMEngine, spec: str, arch: str) -> str:
    """Install trace replay; the routing description (every result must say which)."""
    path = None
    if spec == "auto":
        candidate = TRACES / f"{arch}-topology.heldout.safetensors"
        path = candidate if candidate.is_file() else None
        if path is None:
            print(f"note: no shipped trace for {arch} ({candidate}); own routing", flush=True)
    elif spec != "none":
        path = Path(spec)
    if path is None:
        return "the synthetic model's own (random weights)"
    from duoserve.bench.replay import TraceReplay

    replay = TraceReplay(path, engine.device)
    try:
        replay.attach(engine)
    except ValueError as exc:
        hint = "(pass --trace none to use the model's own routing)"
        raise SystemExit(f"error: {exc}\n{hint}") from None
    return replay.describe()


def model_bytes_bf16(cfg: ModelConfig) -> int:
    """Bytes of the model as published in bf16: dense weights + every expert."""
    experts = cfg.num_moe_layers * cfg.num_experts * cfg.expert_numel * 2
    return dense_bytes(cfg, torch.bfloat16) + experts


def link_bandwidth(device: torch.device, expert_bytes: int) -> dict:
    """Pinned host->device GB/s: one 1 GiB copy, and the same bytes as expert-size copies."""
    big = torch.empty(GiB, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(big, device=device)
    n = max(1, GiB // expert_bytes)
    out = {}
    for name, chunks in (("copy_1gib_gbps", 1), ("copy_experts_gbps", n)):
        step = GiB // chunks
        times = []
        for _ in range(4):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for i in range(chunks):
                dst[i * step : (i + 1) * step].copy_(big[i * step : (i + 1) * step], True)
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        out[name] = chunks * step / min(times[1:]) / GB
    del big, dst
    torch.cuda.empty_cache()
    return out


def routed_bytes(engine: LLMEngine, prompt: list[int]) -> int:
    """Bytes of the distinct (layer, expert) pairs the prompt routes to (an untimed pass that
    also warms kernels at this shape): with a cold cache each must cross the link once."""
    routed: set[tuple[int, int]] = set()
    blocks = engine.model.moe_blocks()
    inner = [b.routing_hook for b in blocks]

    def recorder(hook):
        def record(layer_id, x, ids, weights):
            if hook is not None:
                ids, weights = hook(layer_id, x, ids, weights)
            routed.update((layer_id, e) for e in ids.unique().tolist())
            return ids, weights

        return record

    for b, hook in zip(blocks, inner):
        b.routing_hook = recorder(hook)
    try:
        generate_one(engine, prompt)
    finally:
        for b, hook in zip(blocks, inner):
            b.routing_hook = hook
    return len(routed) * engine.host_store.expert_bytes


def generate_one(engine: LLMEngine, prompt: list[int]) -> float:
    """TTFT (s) of one greedy request with a single output token."""
    req = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    return req.first_token_time - req.arrival_time


def run_one(
    engine: LLMEngine, policy: str, budget: float, prompt: list[int], broken: dict[str, str]
) -> dict:
    """One cold-cache prefill under `policy` and `budget` (GiB); a row of the table. A policy
    whose build raises is skipped with a note (and not tried again if its module is missing)."""
    cuda = engine.device.type == "cuda"
    row: dict = {"policy": policy, "budget_gib": budget, "prompt_tokens": len(prompt)}
    if policy in broken:
        row["note"] = broken[policy]
        return row
    try:
        engine.set_expert_policy(policy, budget)
    except Exception as exc:  # another helper's policy may not build yet: say so, go on
        row["note"] = f"skipped: {type(exc).__name__}: {exc}"
        print(f"note: {policy} at {budget:.2f} GiB {row['note']}", flush=True)
        if isinstance(exc, ImportError):
            broken[policy] = row["note"]
        return row
    pipeline = getattr(engine.experts, "prefill", None)
    if isinstance(pipeline, PrefillPipeline):
        # serving state: per-layer expert counts from earlier prompts order the speculative
        # copies; a prefill leaves the decode cache as it was (cold), which is checked
        primer = random_prompt(engine.model_config.vocab_size, min(len(prompt), 128), seed=2)
        generate_one(engine, primer)
        assert not pipeline.cache.slot_of, "a prefill must not fill the decode cache"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = engine.experts.stats()
    retries0 = torch.cuda.memory_stats().get("num_alloc_retries", 0) if cuda else 0
    row["ttft_s"] = generate_one(engine, prompt)
    after = engine.experts.stats()
    diff = {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], (int, float))}
    row.update(
        copied_gb=diff.get("bytes_copied", 0) / GB,
        wasted_gb=diff.get("prefill_wasted_bytes", 0) / GB,
        wait_s=diff.get("wait_seconds", 0),
        copy_s=diff.get("copy_seconds", 0),
        ring_slots=engine.memory_plan.num_ring_slots,
        cache_slots=engine.memory_plan.num_expert_slots,
        peak_gib=torch.cuda.max_memory_reserved() / GiB if cuda else None,
        # allocations that hit the budget cap and freed cached blocks (each syncs the device)
        alloc_retries=torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries0
        if cuda
        else 0,
    )
    row["within_budget"] = None if row["peak_gib"] is None else row["peak_gib"] <= budget
    return row


def timeline(engine: LLMEngine, budget: float, prompt: list[int], path: str, title: str) -> dict:
    """Copy and expert-compute intervals of one pipeline prefill; drawn to `path`."""
    engine.set_expert_policy("pipeline", budget)
    generate_one(engine, prompt)  # warm
    pre = engine.experts.prefill
    pre.start_timeline()
    ttft = generate_one(engine, prompt)
    intervals = pre.timeline_intervals()
    pre.timeline = None
    copy = union_spans([(i["start_ms"], i["end_ms"]) for i in intervals if i["kind"] == "copy"])
    comp = union_spans([(i["start_ms"], i["end_ms"]) for i in intervals if i["kind"] == "compute"])
    both = sum(max(0.0, min(b, d) - max(a, c)) for a, b in copy for c, d in comp)
    span = max((i["end_ms"] for i in intervals), default=0.0)
    summary = {
        "ttft_s": ttft,
        "span_ms": span,
        "copy_busy_ms": _length(copy),
        "compute_busy_ms": _length(comp),
        "overlap_ms": both,
        "num_copies": sum(i["kind"] == "copy" for i in intervals),
    }
    _plot(copy, comp, summary, path, title)
    return {"summary": summary, "intervals": intervals}


def union_spans(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The disjoint, sorted union of (start, end) spans."""
    out: list[list[float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _length(spans: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in spans)


def _plot(copy, comp, summary: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 2.6))
    ax.broken_barh([(a, b - a) for a, b in copy], (10, 8), color="tab:blue", label="H2D copy")
    ax.broken_barh([(a, b - a) for a, b in comp], (0, 8), color="tab:orange", label="experts")
    ax.set_yticks([4, 14], ["compute stream\n(expert GEMMs)", "copy stream"])
    ax.set_xlabel("ms since the prefill step started")
    s = summary
    ax.set_title(
        f"{title}: copy busy {s['copy_busy_ms']:.0f} ms, expert compute {s['compute_busy_ms']:.0f}"
        f" ms, overlapping {s['overlap_ms']:.0f} ms, TTFT {s['ttft_s'] * 1e3:.0f} ms",
        fontsize=9,
    )
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    print(f"timeline -> {path}", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = ModelConfig.from_dict(synthetic_config(args.arch, args.scale))
    model_bytes = model_bytes_bf16(cfg)
    budgets = list(args.budgets or [])
    budgets += [round(f * model_bytes / GiB, 4) for f in args.budget_fractions or []]
    print(f"budgets (GiB): {budgets}; model bytes (bf16): {model_bytes / GiB:.1f} GiB", flush=True)
    engine = build_engine(args, max(budgets))
    routing = attach_trace(engine, args.trace, args.arch)
    print(f"routing: {routing}", flush=True)
    expert_bytes = engine.host_store.expert_bytes
    cuda = engine.device.type == "cuda"
    link = link_bandwidth(engine.device, expert_bytes) if cuda else {}
    bw = max(link.values()) * GB if link else None
    vocab = engine.model_config.vocab_size
    rows, broken = [], {}
    for n in args.prompts:
        prompt = random_prompt(vocab, n)
        engine.set_expert_policy("pipeline", budgets[0])
        needed = routed_bytes(engine, prompt)
        for budget in budgets:
            for policy in args.policies + args.extra_policies:
                if policy in BUDGET_FREE_POLICIES and budget != budgets[0]:
                    continue
                row = run_one(engine, policy, budget, prompt, broken)
                row["needed_gb"] = needed / GB
                row["bound_s"] = needed / bw if bw else None
                if row.get("ttft_s") and row["bound_s"]:
                    row["ttft_over_bound"] = row["ttft_s"] / row["bound_s"]
                    row["link_util"] = row["copied_gb"] * GB / row["ttft_s"] / bw
                rows.append(row)
                print({k: v for k, v in row.items() if v is not None}, flush=True)
    _add_speedups(rows)
    label = f"{args.arch}{'-int4' if args.expert_dtype == 'int4' else ''}"
    budget_mid = budgets[len(budgets) // 2]
    title = f"{label}, {args.timeline_prompt}-token prefill, pipeline, {budget_mid:.1f} GiB"
    prompt = random_prompt(vocab, args.timeline_prompt, seed=1)
    tl = timeline(engine, budget_mid, prompt, args.timeline, title) if args.timeline else None
    out = args.out or f"bench/results/prefill-{label}.json"
    write_json(
        out,
        {
            "env": environment(),
            "args": vars(args),
            "routing": routing,
            "link": link,
            "model_bytes_bf16": model_bytes,
            "expert_bytes": expert_bytes,
            "host_store_seconds": engine.host_store.load_seconds,
            "rows": rows,
            "timeline": tl,
        },
    )
    print(f"link (pinned host->GPU): {link}\nrouting: {routing}\nJSON -> {out}")
    print_table(rows, COLUMNS)


COLUMNS = [
    ("policy", "policy", "s"),
    ("budget_gib", "budget GiB", ".4g"),
    ("prompt_tokens", "prompt", "d"),
    ("ttft_s", "TTFT s", ".3f"),
    ("bound_s", "bound s", ".3f"),
    ("ttft_over_bound", "x bound", ".2f"),
    ("speedup_vs_ondemand", "x ondemand", ".2f"),
    ("needed_gb", "needed GB", ".2f"),
    ("copied_gb", "copied GB", ".2f"),
    ("wasted_gb", "wasted GB", ".2f"),
    ("link_util", "link util", ".2f"),
    ("wait_s", "waited s", ".3f"),
    ("peak_gib", "peak GiB", ".2f"),
    ("ring_slots", "ring", "d"),
]


def _add_speedups(rows: list[dict]) -> None:
    """TTFT of ondemand (same prompt) / TTFT of the row."""
    ondemand = {r["prompt_tokens"]: r["ttft_s"] for r in rows if r["policy"] == "ondemand"}
    for r in rows:
        base = ondemand.get(r["prompt_tokens"])
        if base and r.get("ttft_s"):
            r["speedup_vs_ondemand"] = base / r["ttft_s"]


if __name__ == "__main__":
    main(sys.argv[1:])
