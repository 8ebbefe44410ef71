"""The benchmark suite: named scenarios, every policy, the HF baseline, each figure by its bound.

    duoserve bench suite --scenario S1 [--cases b1-p512] [--policies lru duoserve] [--quick]

One process per call: the HF baseline (transformers + accelerate offload, same synthetic
weights, a time-boxed subprocess run before our engine exists, so their RAM never meets),
then one full-size synthetic model whose experts are pinned once; each policy is then built
over the same host store (`LLMEngine.set_expert_policy`), warmed up, rebuilt cold and
measured. Routing is replayed from the trained model of the same topology (bench/replay.py)
in every run of ours. A policy that cannot be built yet (its module missing) is skipped with
the reason, and runs as soon as it exists. JSON per scenario under --out; report.py turns
the JSON files into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from duoserve.bench import common
from duoserve.bench.metrics import case_bounds, finish_rows
from duoserve.config import EngineConfig, ModelConfig
from duoserve.engine.llm_engine import LLMEngine
from duoserve.offload.planner import BudgetError, dense_bytes, plan_memory
from duoserve.weights.synthetic import parse_synthetic_spec, synthetic_config

TRACES = Path(__file__).resolve().parents[1] / "assets" / "traces"
GiB = 2**30


@dataclass(frozen=True)
class Case:
    """One measured workload: `batch` requests of `prompt_len` tokens, `max_tokens` each."""

    name: str
    batch: int
    prompt_len: int
    max_tokens: int


@dataclass(frozen=True)
class Scenario:
    """A model, an expert format, a GPU budget rule and the cases measured under it."""

    name: str
    arch: str
    expert_dtype: str
    budget_gib: float | None  # None: budget_fraction of the bf16 model's bytes
    cases: tuple[Case, ...]
    description: str
    budget_fraction: float | None = None
    hf_timeout_s: float = 200.0


SCENARIOS = {
    "S1": Scenario(
        "S1",
        "mixtral-8x7b",
        "int4",
        None,
        (Case("b1-p512", 1, 512, 128),),
        "the paper's: Mixtral-8x7B topology, int4 experts, budget 15% of the model's bf16 "
        "bytes, batch 1, prompt 512, 128 generated",
        budget_fraction=0.15,
        hf_timeout_s=260.0,
    ),
    "S2": Scenario(
        "S2",
        "qwen3-30b-a3b",
        "bf16",
        12.0,
        (Case("b1-p512", 1, 512, 128),),
        "Qwen3-30B-A3B topology, bf16, budget 12 GiB, batch 1, prompt 512, 128 generated",
        hf_timeout_s=170.0,
    ),
    "S3": Scenario(
        "S3",
        "qwen3-30b-a3b",
        "bf16",
        12.0,
        (
            Case("b1-p128", 1, 128, 64),
            Case("b1-p2048", 1, 2048, 64),
            Case("b4-p512", 4, 512, 64),
        ),
        "S2's model and budget; prompts of 128 and 2048 tokens, and batch 4 (512-token "
        "prompts); 64 generated (so that each call fits ~9 minutes)",
        hf_timeout_s=200.0,
    ),
}
POLICIES = ("ondemand", "lru", "duoserve", "pipeline", "uniform", "gate-lookahead", "trace-match")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="duoserve bench suite", description=__doc__)
    p.add_argument("--scenario", required=True, help="S1, S2, S3, or several: S2,S3")
    p.add_argument("--cases", default=None, help="only these case names, comma separated")
    p.add_argument("--policies", nargs="+", default=list(POLICIES))
    p.add_argument("--quick", action="store_true", help="16 generated tokens, 1 HF decode step")
    p.add_argument("--out", default="bench/results", help="directory of the JSON files")
    p.add_argument("--device", default="cuda")
    p.add_argument("--time-budget-s", type=float, default=540.0, help="skip runs past this")
    p.add_argument("--hf", choices=("subprocess", "skip"), default="subprocess")
    p.add_argument("--hf-decode-tokens", type=int, default=3)
    p.add_argument("--no-reference", action="store_true", help="skip the unbudgeted full-gpu")
    g = p.add_argument_group("overrides (tests, smoke runs)")
    g.add_argument("--model", default=None, help="synthetic:ARCH:SCALE instead of the full size")
    g.add_argument("--trace", default=None, help="routing trace instead of the shipped one")
    g.add_argument("--budget-gib", type=float, default=None)
    g.add_argument("--prompt-len", type=int, default=None)
    g.add_argument("--max-tokens", type=int, default=None)
    g.add_argument("--bandwidth-gbps", type=float, default=None, help="nominal link (no GPU)")
    return p.parse_args(argv)


def resolve_cases(scn: Scenario, args: argparse.Namespace) -> list[Case]:
    wanted = None if args.cases is None else set(args.cases.split(","))
    cases = []
    for c in scn.cases:
        if wanted is not None and c.name not in wanted:
            continue
        prompt_len = args.prompt_len or c.prompt_len
        max_tokens = args.max_tokens or (16 if args.quick else c.max_tokens)
        name = c.name if prompt_len == c.prompt_len else f"b{c.batch}-p{prompt_len}"
        cases.append(Case(name, c.batch, prompt_len, max_tokens))
    assert cases, f"{scn.name}: no case left among {[c.name for c in scn.cases]}"
    return cases


def scenario_budget(scn: Scenario, cfg: ModelConfig, args) -> tuple[float, str]:
    """GiB and the rule that gave it."""
    if args.budget_gib is not None:
        return args.budget_gib, f"{args.budget_gib} GiB (command line)"
    if scn.budget_gib is not None:
        return scn.budget_gib, f"{scn.budget_gib} GiB"
    experts = cfg.num_moe_layers * cfg.num_experts * cfg.expert_numel * 2
    model_bytes = dense_bytes(cfg, torch.bfloat16) + experts
    gib = scn.budget_fraction * model_bytes / GiB
    rule = (
        f"{scn.budget_fraction:.0%} of the model's bf16 bytes ({model_bytes / 1e9:.1f} GB) = "
        f"{gib:.2f} GiB"
    )
    return gib, rule


def build_engine(model: str, scn: Scenario, cases: list[Case], budget: float, device: str):
    longest = max(c.prompt_len + c.max_tokens for c in cases)
    config = EngineConfig(
        device=device,
        dtype="bfloat16" if device.startswith("cuda") else "auto",  # fp32 on the CPU: faster
        max_model_len=longest + 16,
        max_num_seqs=max(c.batch for c in cases),
        max_num_batched_tokens=max(c.batch * c.prompt_len for c in cases) + 16,
        policy="lru",
        gpu_memory_budget=budget,
        expert_dtype=scn.expert_dtype,
    )
    t0 = time.perf_counter()
    engine = LLMEngine(model, config)
    store = engine.host_store
    timings = {
        "engine_build_s": time.perf_counter() - t0,
        "host_store_s": getattr(store, "load_seconds", None),
        "pin_s": getattr(store, "pin_seconds", None),
    }
    return engine, timings


class Deadline:
    """Wall-clock budget of the call: runs that would not fit are skipped and recorded."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.longest_run_s = 0.0  # the longest policy run so far: the estimate of the next

    def left(self) -> float:
        return self.end - time.monotonic()

    def fits_another_run(self) -> bool:
        return self.left() >= 1.2 * self.longest_run_s + 5

    def ran(self, row: dict) -> None:
        self.longest_run_s = max(self.longest_run_s, row.get("run_s") or 0.0)


def run_policy(engine, replay, policy: str, budget: float | None, case: Case, prompts) -> dict:
    """Warm up, rebuild cold, measure one case; a row with status ok/unavailable/error."""
    row: dict[str, Any] = {"policy": policy, "budget_gib": budget}
    t0 = time.perf_counter()
    try:
        engine.set_expert_policy(policy, budget)
    except BudgetError as exc:
        return {**row, "status": "does not fit", "reason": str(exc)}
    except (ImportError, ValueError, NotImplementedError) as exc:
        return {**row, "status": "unavailable", "reason": f"{type(exc).__name__}: {exc}"}
    try:
        vocab = engine.model_config.vocab_size
        warm = common.random_prompt(vocab, min(32, case.prompt_len), seed=7)
        common.run_batch(engine, [warm], 3)  # warm-up: a short request
        engine.set_expert_policy(policy, budget)  # cold cache: nothing resident before prefill
        cuda = engine.device.type == "cuda"
        if cuda:  # peak of this run only: drop blocks cached by earlier runs first
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        retries0 = torch.cuda.memory_stats().get("num_alloc_retries", 0) if cuda else 0
        r = common.run_batch(engine, prompts, case.max_tokens)
        r["peak_gib"] = torch.cuda.max_memory_reserved() / GiB if cuda else None
        if cuda:  # allocations that hit the budget cap and freed cached blocks (device syncs)
            r["alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries0
    except Exception as exc:  # a policy under construction may fail: record, go on
        for req_id in list(engine.requests):
            engine.abort_request(req_id)
        tb = traceback.format_exc(limit=4)
        print(f"[suite] {policy} failed:\n{tb}", file=sys.stderr, flush=True)
        return {**row, "status": "error", "reason": f"{type(exc).__name__}: {exc}"}
    plan = engine.memory_plan
    row.update(status="ok", run_s=time.perf_counter() - t0, routing_replayed=replay is not None)
    row.update(r)
    row["slots"] = plan.num_expert_slots if plan is not None else None
    row["ring_slots"] = plan.num_ring_slots if plan is not None else None
    row["backend"] = type(engine.experts).__name__
    return row


def full_gpu_rows(engine, replay, case: Case, prompts, budget: float, args) -> list[dict]:
    """full-gpu at the budget (a BudgetError names the bytes), and unbudgeted as reference."""
    cfg, dev = engine.model_config, engine.device
    at_budget = engine.config.replace(policy="full-gpu", gpu_memory_budget=budget)
    rows = []
    try:
        plan_memory(cfg, at_budget, engine.dtype, dev, "full-gpu")
        rows.append(run_policy(engine, replay, "full-gpu", budget, case, prompts))
    except BudgetError as exc:
        rows.append({"policy": "full-gpu", "budget_gib": budget, "status": "does not fit"})
        rows[-1]["reason"] = str(exc)
    if args.no_reference:
        return rows
    total = torch.cuda.get_device_properties(dev).total_memory / GiB if dev.type == "cuda" else 1e6
    try:
        plan_memory(cfg, at_budget.replace(gpu_memory_budget=total), engine.dtype, dev, "full-gpu")
    except BudgetError as exc:
        ref = {"policy": "full-gpu (reference)", "status": "does not fit", "reason": str(exc)}
        return [*rows, ref]
    ref = run_policy(engine, replay, "full-gpu", None, case, prompts)
    ref["policy"] = "full-gpu (reference)"
    ref["note"] = "no budget: all experts resident; its decode time is the compute-only time"
    return [*rows, ref]


def run_case(engine, replay, scn_budget: float, case: Case, args, deadline: Deadline) -> dict:
    prompts = common.case_prompts(engine.model_config.vocab_size, case.batch, case.prompt_len)
    print(f"[suite] case {case.name}: {case}", flush=True)
    rows = full_gpu_rows(engine, replay, case, prompts, scn_budget, args)
    for policy in args.policies:
        if policy == "full-gpu":
            continue
        if not deadline.fits_another_run():
            rows.append({"policy": policy, "status": "skipped", "reason": "time budget"})
            continue
        rows.append(run_policy(engine, replay, policy, scn_budget, case, prompts))
        deadline.ran(rows[-1])
        r = rows[-1]
        print(f"[suite] {case.name} {policy}: {r['status']} {_brief(r)}", flush=True)
    return {"case": case.name, "batch": case.batch, "prompt_len": case.prompt_len,
            "max_tokens": case.max_tokens, "rows": rows}  # fmt: skip


def _brief(r: dict) -> str:
    if r["status"] != "ok":
        return r.get("reason", "")
    return f"TTFT {r['ttft_s']:.3f} s, TPOT {r['tpot_s'] * 1e3:.1f} ms, E2E {r['e2e_s']:.2f} s"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    deadline = Deadline(args.time_budget_s)
    scenarios = [SCENARIOS[s] for s in args.scenario.split(",")]
    assert len({(s.arch, s.expert_dtype) for s in scenarios}) == 1, "one model per call"
    scn0 = scenarios[0]
    model = args.model or f"synthetic:{scn0.arch}"
    arch, scale = parse_synthetic_spec(model) or (None, None)
    assert arch is not None, "the suite builds synthetic models (synthetic:ARCH[:SCALE])"
    cfg = ModelConfig.from_dict(synthetic_config(arch, scale))
    plans = [(s, resolve_cases(s, args), *scenario_budget(s, cfg, args)) for s in scenarios]
    hf = run_hf(arch, scale, plans, args, deadline) if args.hf == "subprocess" else {}
    all_cases = [c for _, cases, _, _ in plans for c in cases]
    budget = max(b for *_, b, _ in plans)
    engine, timings = build_engine(model, scn0, all_cases, budget, args.device)
    from duoserve.bench.replay import TraceReplay

    trace = args.trace or TRACES / f"{scn0.arch}-topology.heldout.safetensors"
    replay = TraceReplay(trace, engine.device, window=engine.max_model_len)
    replay.attach(engine)
    expert_bytes = engine.host_store.expert_bytes
    link = {}
    if engine.device.type == "cuda":  # its 1 GiB buffers sit outside the budget: lift the cap
        torch.cuda.set_per_process_memory_fraction(1.0, engine.device)
        link = common.measure_link_bandwidth(engine.device, expert_bytes)
        torch.cuda.empty_cache()
        engine._cap_device_memory(engine.memory_plan)
    measured = [link[k] for k in ("copy_1gib_gbps", "copy_64_experts_gbps") if k in link]
    bw_gbps = args.bandwidth_gbps or max(measured, default=None)  # the faster: the lower bound
    print(f"[suite] routing: {replay.describe()}; link {link}", flush=True)
    command = "duoserve bench suite " + " ".join(sys.argv[1:] if argv is None else argv)
    for scn, cases, budget, rule in plans:
        doc = {
            "kind": "duoserve-bench-suite",
            "scenario": scn.name,
            "description": scn.description,
            "env": common.environment(),
            "args": vars(args),
            "command": command,
            "model": model,
            "expert_dtype": scn.expert_dtype,
            "expert_bytes": expert_bytes,
            "num_experts_total": cfg.num_moe_layers * cfg.num_experts,
            "budget_gib": budget,
            "budget_rule": rule + budget_note(engine, scn),
            "routing": replay.describe(),
            "routing_replayed": True,
            "link": link,
            "bandwidth_gbps": bw_gbps,
            "bandwidth_source": "nominal (--bandwidth-gbps)" if args.bandwidth_gbps else "measured",
            "timings": timings,
            "cases": [],
        }
        suffix = "" if args.cases is None else "-" + args.cases.replace(",", "_")
        out = Path(args.out) / f"suite-{scn.name}{suffix}.json"
        for case in cases:
            res = run_case(engine, replay, budget, case, args, deadline)
            res["bounds"] = case_bounds(replay, res["rows"], case, expert_bytes, bw_gbps)
            res["hf"] = hf.get((scn.name, case.name))
            finish_rows(res, expert_bytes, bw_gbps)
            doc["cases"].append(res)
            common.write_json(out, doc)  # after every case: a call cut short keeps the rest
        print_summary(doc)
        print(f"[suite] wrote {out}", flush=True)


def budget_note(engine, scn: Scenario) -> str:
    """For a fraction-of-the-model budget with int4 experts: why the bf16 bytes are the base."""
    if scn.budget_fraction is None or scn.expert_dtype != "int4":
        return ""
    cfg = engine.model_config
    served = dense_bytes(cfg, engine.dtype) + engine.host_store.num_bytes
    gib = scn.budget_fraction * served / GiB
    try:
        plan_memory(cfg, engine.config.replace(gpu_memory_budget=gib), engine.dtype,
                    engine.device, "lru")  # fmt: skip
        return f"; ({scn.budget_fraction:.0%} of the int4 model, {gib:.2f} GiB, would also fit)"
    except BudgetError as exc:
        return (
            f"; {scn.budget_fraction:.0%} of the model as served with int4 experts "
            f"({served / 1e9:.1f} GB) would be {gib:.2f} GiB, which the planner refuses: {exc}"
        )


def run_hf(arch: str, scale: str, plans, args, deadline: Deadline) -> dict:
    """The HF offload baseline for every case of the call, in one time-boxed child."""
    from duoserve.bench.hf_baseline import run_hf_subprocess

    out = {}
    for scn, cases, budget, _ in plans:
        gpu = args.device.startswith("cuda") and torch.cuda.is_available()
        timeout = min(scn.hf_timeout_s, max(deadline.left() - 240, 30))
        path = Path(args.out) / f".hf-{scn.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        r = run_hf_subprocess(
            arch,
            scale,
            budget if gpu else None,
            [(c.batch, c.prompt_len) for c in cases],
            1 if args.quick else args.hf_decode_tokens,
            timeout,
            path,
            warmup=not args.quick,
        )
        path.unlink(missing_ok=True)
        for c in cases:
            case_r = dict(r.get("cases", {}).get(f"{c.batch}x{c.prompt_len}", {}))
            case_r.pop("output_token_ids", None)
            info = {k: v for k, v in r.items() if k != "cases"}
            out[(scn.name, c.name)] = {**info, **case_r, "max_tokens": c.max_tokens}
    return out


def print_summary(doc: dict) -> None:
    print(f"\n{doc['scenario']}: {doc['description']}\nrouting: {doc['routing']}")
    cols = [
        ("policy", "policy", "s"),
        ("status", "status", "s"),
        ("ttft_s", "TTFT s", ".3f"),
        ("ttft_bound_ratio", "/bound", ".2f"),
        ("tpot_s", "TPOT s", ".4f"),
        ("tpot_bound_ratio", "/bound", ".2f"),
        ("e2e_s", "E2E s", ".2f"),
        ("decode_hit_rate", "hit rate", ".3f"),
        ("peak_gib", "peak GiB", ".2f"),
        ("speedup_e2e_vs_hf", "E2E x HF", ".2f"),
    ]
    for case in doc["cases"]:
        print(f"-- {case['case']} (bounds: {case['bounds']})")
        common.print_table(case["rows"], cols)


if __name__ == "__main__":
    main()
