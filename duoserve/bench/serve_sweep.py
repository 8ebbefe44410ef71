"""`duoserve bench serve-sweep`: goodput and p99 TTFT/TPOT against request rate, per policy.

One process. The engine is built once (a full-size synthetic model pins ~57 GB of experts
in ~60 s), its routing replayed from a trace of the trained model of the same topology
(bench/replay.py), and served over HTTP on 127.0.0.1 by the real server (server/app.py)
from a thread. For each policy the expert backend is rebuilt over the same host store
(`LLMEngine.set_expert_policy`, run on the engine thread while no request is in flight) and
warmed up; then for each request rate the load client of `duoserve bench serve` sends the
same workload (Poisson arrivals, random-length prompts, fixed output length) and the
vllm-bench-serve metrics are kept, with goodput under the stated SLOs.

    duoserve bench serve-sweep --out $OUT/serve_sweep.json              # the GPU run, ~8 min
    duoserve bench serve-sweep --smoke --out /tmp/sweep.json             # tiny model, CPU
    duoserve bench serve-sweep --report $OUT/serve_sweep.json \\
        --plot docs/figures/serve_sweep.png --doc docs/serving.md        # regenerate the docs
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from duoserve.bench.common import environment, write_json
from duoserve.bench.serve_client import RequestResult, compute_metrics, run_benchmark
from duoserve.bench.serve_report import plot_sweep, update_doc
from duoserve.config import EngineConfig
from duoserve.engine.llm_engine import LLMEngine
from duoserve.engine.scheduler import StepCostModel
from duoserve.server.app import build_app
from duoserve.server.background import start_background_server
from duoserve.server.cli import attach_replay
from duoserve.server.config import ServerConfig
from duoserve.server.metrics import expert_hit_rate, prefetch_accuracy

ASSETS = Path(__file__).resolve().parent.parent / "assets"
PERCENTILES = [50.0, 90.0, 99.0]
SLO_WHY = (
    "TTFT 3 s: an unloaded prefill of 64-192 tokens on the offloaded Qwen3-30B-A3B is "
    "copy-bound at about 1 s (nearly every expert crosses the ~54 GB/s link once; 1.08 s "
    "measured for 512 tokens), so 3 s allows waiting behind about one other prefill and a "
    "decode step. TPOT 400 ms: chosen when batch-1 offloaded decode was host-bound at "
    "150-200 ms/token; it is 58-79 ms/token with decode graphs (H100), and the SLO is kept so "
    "that sweeps compare; batched steps route to many more experts and are link-bound."
)
# Full-size GPU run and the CPU smoke run; flags left unset take these.
FULL = dict(
    model="synthetic:qwen3-30b-a3b",
    device="cuda",
    dtype="bfloat16",
    gpu_memory_budget=12.0,
    replay_trace=str(ASSETS / "traces" / "qwen3-30b-a3b-topology.heldout.safetensors"),
    request_rates="0.3,0.6,1.2",
    num_prompts=12,
    input_len=128,
    output_len=32,
    point_timeout_s=55.0,
    time_budget_s=480.0,
    max_model_len=512,
    max_num_batched_tokens=2048,
)
SMOKE = dict(
    model="synthetic:mixtral-8x7b:tiny",
    device="cpu",
    dtype="float32",
    gpu_memory_budget=0.0058,  # about half of the experts fit
    replay_trace="tiny",
    request_rates="4,16",
    num_prompts=4,
    input_len=16,
    output_len=4,
    point_timeout_s=30.0,
    time_budget_s=240.0,
    max_model_len=64,
    max_num_batched_tokens=256,
)
RESERVE_S = 20.0  # kept back from the time budget for shutdown and writing
MIN_POINT_S = 10.0


# ----------------------------------------------------------------------------- metrics


def summarize_point(
    per_request: dict[str, list], duration_s: float, slo_ms: dict[str, float]
) -> dict[str, Any]:
    """One point's metrics from the load client's per-request lists (vllm bench serve's keys).

    Adds `ttft_attainment` / `tpot_attainment`: requests sent meeting that one SLO. A request
    with an error counts as sent and failed; a one-token output meets any TPOT target.
    """
    results = [
        RequestResult(
            success=not error,
            prompt_len=n_in,
            output_tokens=n_out,
            ttft=ttft,
            itl=list(itl),
            latency=e2el,
            error=error,
        )
        for n_in, n_out, ttft, itl, e2el, error in zip(
            per_request["input_lens"],
            per_request["output_lens"],
            per_request["ttfts"],
            per_request["itls"],
            per_request["e2els"],
            per_request["errors"],
        )
    ]
    out = compute_metrics(results, duration_s, PERCENTILES, slo_ms)
    for key in ("ttft", "tpot"):
        if key in slo_ms:
            met = [r for r in results if r.success and _observed(r, key) <= slo_ms[key] / 1e3]
            out[f"{key}_attainment"] = len(met) / len(results) if results else None
    return out


def _observed(r: RequestResult, key: str) -> float:
    if key == "ttft":
        return r.ttft
    return (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0


def expert_delta(before: dict[str, float], after: dict[str, float], seconds: float) -> dict:
    """Expert traffic of one point from two `stats()` snapshots."""
    diff = {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], (int, float))}
    diff.pop("hit_rate", None)
    gb = diff.get("bytes_copied", 0) / 1e9
    return {
        "hit_rate": expert_hit_rate(diff),
        "prefetch_accuracy": prefetch_accuracy(diff),
        "gb_copied": gb,
        "link_gbps": gb / seconds if seconds > 0 else None,
        "wait_s": diff.get("wait_seconds"),
    }


# ----------------------------------------------------------------------------- the engine


def build_engine(args: argparse.Namespace) -> LLMEngine:
    """The engine, built once; `lru` first (always available), then switched per policy."""
    config = EngineConfig(
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        policy="lru",
        gpu_memory_budget=args.gpu_memory_budget,
    )
    return LLMEngine(args.model, config)


def tiny_trace(engine: LLMEngine, path: Path, num_tokens: int = 256, seed: int = 0) -> Path:
    """A random routing trace of the engine's topology (the smoke run's stand-in)."""
    cfg = engine.model_config
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(cfg.num_moe_layers, num_tokens, cfg.num_experts, generator=gen)
    ids = scores.argsort(dim=-1)[..., : cfg.num_experts_per_tok]  # [L, N, K] distinct
    save_file({"expert_ids": ids.to(torch.int16).contiguous()}, str(path))
    return path


def switch_policy(engine: LLMEngine, policy: str, budget: float | None) -> dict[str, Any]:
    """On the engine thread, idle: a fresh backend (cold cache), a fresh step-cost model."""
    assert not engine.has_unfinished_requests(), "switch policies only while idle"
    engine.set_expert_policy(policy, budget)
    engine.scheduler.prefill_cost = StepCostModel()  # step times of the previous policy
    engine.scheduler.decode_cost = StepCostModel()
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    plan = engine.memory_plan
    return {"expert_slots": plan.num_expert_slots if plan is not None else None}


def engine_snapshot(engine: LLMEngine) -> dict[str, Any]:
    """On the engine thread: the expert counters and the peak device memory so far."""
    stats = getattr(engine.experts, "stats", None)
    peak = None
    if engine.device.type == "cuda":
        peak = torch.cuda.max_memory_reserved(engine.device) / 2**30
    return {"stats": stats() if callable(stats) else {}, "peak_gib": peak}


# ----------------------------------------------------------------------------- the sweep


def client_args(args: argparse.Namespace, url: str, **changes: Any) -> argparse.Namespace:
    """Flags of `duoserve bench serve` for one point."""
    values = dict(
        base_url=url,
        endpoint="/v1/completions",
        model=None,
        api_key=None,
        num_prompts=args.num_prompts,
        request_rate=float("inf"),
        burstiness=1.0,
        max_concurrency=None,
        dataset_path=None,
        random_input_len=args.input_len,
        random_output_len=args.output_len,
        random_range_ratio=args.random_range_ratio,
        random_output_range_ratio=0.0,  # fixed output length
        vocab_size=None,
        temperature=0.0,
        ignore_eos=True,
        seed=args.seed,
        num_warmups=0,
        request_timeout=args.point_timeout_s + 30,
        percentiles=PERCENTILES,
        goodput_ms=slo_of(args),
        max_duration_s=None,
    )
    values.update(changes)
    return argparse.Namespace(**values)


def slo_of(args: argparse.Namespace) -> dict[str, float]:
    return {"ttft": args.ttft_slo_ms, "tpot": args.tpot_slo_ms}


class Sweep:
    """The server, the engine behind it, and the results so far (written after each point)."""

    def __init__(self, args: argparse.Namespace, engine: LLMEngine, server, result: dict):
        self.args, self.engine, self.server, self.result = args, engine, server, result
        self.t0 = args.t0

    def on_engine(self, fn, timeout_s: float = 120.0):
        """Run fn(engine) on the engine thread once it is idle; its result."""
        bridge, deadline = self.server.bridge, time.monotonic() + 60
        while not bridge.is_idle:  # cut requests are aborted at a step boundary
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not go idle within 60 s")
            time.sleep(0.05)
        return bridge.call_in_engine_thread(lambda: fn(self.engine)).result(timeout_s)

    def skip(self, reason: str, **where: Any) -> None:
        print(f"[serve-sweep] skipped {where}: {reason}", flush=True)
        self.result["skipped"].append({**where, "reason": reason})
        write_json(self.args.out, self.result)

    def run_policy(self, policy: str) -> None:
        args = self.args
        try:
            plan = self.on_engine(lambda e: switch_policy(e, policy, args.gpu_memory_budget))
        except Exception as exc:  # a policy still being built elsewhere: note it, go on
            self.skip(f"building the policy failed: {type(exc).__name__}: {exc}", policy=policy)
            return
        warm = client_args(args, self.server.url, num_prompts=args.num_warmups, seed=10**6)
        warm.random_output_len = min(args.output_len, 4)
        if args.num_warmups:
            asyncio.run(run_benchmark(warm))  # caches, allocator, kernels at serving shapes
        for rate in args.rates:
            cap = min(args.point_timeout_s, args.time_budget_s - RESERVE_S - self.elapsed())
            if cap < MIN_POINT_S:
                self.skip("out of time budget", policy=policy, request_rate=rate)
                continue
            try:
                self.run_point(policy, rate, cap, plan)
            except Exception as exc:  # keep the points measured so far and go on
                logging.exception("point failed")
                reason = f"the point failed: {type(exc).__name__}: {exc}"
                self.skip(reason, policy=policy, request_rate=rate)

    def run_point(self, policy: str, rate: float, cap_s: float, plan: dict) -> None:
        args = self.args
        before = self.on_engine(engine_snapshot)
        t0 = time.perf_counter()
        raw = asyncio.run(
            run_benchmark(
                client_args(args, self.server.url, request_rate=rate, max_duration_s=cap_s)
            )
        )
        seconds = time.perf_counter() - t0
        after = self.on_engine(engine_snapshot)
        point = {"policy": policy, "request_rate": rate, "cap_s": cap_s, **plan}
        point.update(summarize_point(raw, raw["duration"], slo_of(args)))
        point["expert"] = expert_delta(before["stats"], after["stats"], seconds)
        point["peak_gib"] = peak = after["peak_gib"]
        point["within_budget"] = None if peak is None else peak <= args.gpu_memory_budget
        point["errors"] = sorted({e for e in raw["errors"] if e})[:3]
        keep = ("input_lens", "output_lens", "ttfts", "e2els")
        point["per_request"] = {k: raw[k] for k in keep}
        self.result["points"].append(point)
        write_json(args.out, self.result)
        print(
            f"[serve-sweep] {policy:>9} rate {rate:5.2f} req/s: done {point['completed']}/"
            f"{len(raw['errors'])}, goodput {point['request_goodput']:.3f} req/s, SLO met "
            f"{100 * point['slo_attainment']:.0f}%, p99 TTFT {point['p99_ttft_ms']:.0f} ms, "
            f"p99 TPOT {point['p99_tpot_ms']:.0f} ms, expert hit rate "
            f"{point['expert']['hit_rate'] or 0:.3f}, "
            f"{point['expert']['gb_copied']:.1f} GB copied ({time.monotonic() - self.t0:.0f} s)",
            flush=True,
        )

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    """Build, serve, sweep every (policy, rate); the result as written to args.out."""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    engine = build_engine(args)
    print(f"[serve-sweep] engine loaded in {engine.load_seconds:.1f} s", flush=True)
    trace = args.replay_trace
    if trace == "tiny":
        trace = tiny_trace(engine, Path(args.out).with_suffix(".trace.safetensors"))
    replay = attach_replay(engine, str(trace)) if trace != "none" else None
    config = ServerConfig(
        ttft_slo_ms=args.ttft_slo_ms if args.slo_scheduler else None,
        tpot_slo_ms=args.tpot_slo_ms if args.slo_scheduler else None,
        log_interval=args.log_interval,
    )
    app = build_app(engine, config, model_name=args.model, replay=replay)
    result: dict[str, Any] = {
        "env": environment(),
        "args": {k: v for k, v in vars(args).items() if k not in ("rates", "t0")},
        "model": args.model,
        "routing": app.state.routing,
        "load_seconds": engine.load_seconds,
        "slo_ms": slo_of(args),
        "slo_why": SLO_WHY,
        "points": [],
        "skipped": [],
    }
    server = start_background_server(app)
    try:
        sweep = Sweep(args, engine, server, result)
        for policy in args.policies:
            sweep.run_policy(policy)
    finally:
        server.stop()
    result["total_seconds"] = time.monotonic() - args.t0
    write_json(args.out, result)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="duoserve bench serve-sweep", description=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, seconds")
    p.add_argument("--report", default=None, metavar="JSON", help="no run: plot / doc from JSON")
    p.add_argument("--out", default="bench/results/serve_sweep.json")
    p.add_argument("--plot", default=None, help="PNG path (default: next to --out)")
    p.add_argument("--doc", default=None, help="update this markdown file's sweep section")
    p.add_argument("--policies", default="duoserve,lru,uniform")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--random-range-ratio", type=float, default=0.5, help="prompt lengths")
    p.add_argument("--ttft-slo-ms", type=float, default=3000.0)
    p.add_argument("--tpot-slo-ms", type=float, default=400.0)
    p.add_argument("--slo-scheduler", type=int, default=1, help="1: the scheduler plans with SLOs")
    p.add_argument("--num-warmups", type=int, default=2)
    # seed 7: its 12 Poisson arrivals span 11.3 / rate s, near the nominal 12 / rate (seed 0's
    # span 17.5 / rate: a 0.3 req/s point would last a minute); prompts come from it too
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--log-interval", type=float, default=10.0)
    for key, value in FULL.items():
        flag = "--" + key.replace("_", "-")
        p.add_argument(
            flag, type=type(value), default=None, help=f"default {value} (smoke: {SMOKE[key]})"
        )
    args = p.parse_args(argv)
    for key, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.policies = [x for x in args.policies.split(",") if x]
    args.rates = [float(x) for x in args.request_rates.split(",") if x]
    assert args.rates and all(r > 0 for r in args.rates), "--request-rates: positive req/s"
    return args


def main(argv: list[str] | None = None) -> None:
    """Entry of `duoserve bench serve-sweep` (and `python -m duoserve.bench.serve_sweep`)."""
    t0 = time.monotonic()
    args = parse_args(argv)
    args.t0 = t0
    if args.report is None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request
        result = run_sweep(args)
        json_path = Path(args.out)
    else:
        import json

        json_path = Path(args.report)
        result = json.loads(json_path.read_text())
    plot = Path(args.plot) if args.plot else json_path.with_suffix(".png")
    drawn = plot_sweep(result, plot)
    print(f"[serve-sweep] plot: {plot if drawn else 'not drawn (no matplotlib)'}")
    if args.doc:
        update_doc(Path(args.doc), result, plot if drawn else None)
        print(f"[serve-sweep] updated {args.doc}")


if __name__ == "__main__":
    main()
