"""Offloading baselines at several GPU memory budgets, next to the full-GPU upper bound.

    python -m duoserve.bench.offload --arch qwen3-30b-a3b --budgets 8 16 32 --out results.json

One process: experts are pinned in host memory once, then each (budget, policy) gets a fresh
backend (cold cache) over the same host store. Prints TTFT, decode tokens/s, bytes copied,
achieved link bandwidth next to the bandwidth measured in the same run, and peak memory.
"""

from __future__ import annotations

import argparse

import torch

from duoserve.bench.common import (
    environment,
    measure_link_bandwidth,
    print_table,
    random_prompt,
    run_generation,
    write_json,
)
from duoserve.config import EngineConfig
from duoserve.engine.llm_engine import LLMEngine

GB = 1e9


def run_policy(engine: LLMEngine, policy: str, budget: float | None, prompt, max_tokens) -> dict:
    engine.set_expert_policy(policy, budget)
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    r = run_generation(engine, prompt, max_tokens)
    pre, dec = r.pop("prefill"), r.pop("decode")
    r.pop("output_token_ids")
    copied = pre.get("bytes_copied", 0) + dec.get("bytes_copied", 0)
    copy_s = pre.get("copy_seconds", 0) + dec.get("copy_seconds", 0)
    r.update(
        policy=policy,
        budget_gib=budget,
        prefill_gb=pre.get("bytes_copied", 0) / GB,
        decode_gb_per_tok=dec.get("bytes_copied", 0) / GB / max(r["output_tokens"] - 1, 1),
        copy_gbps=copied / copy_s / GB if copy_s else None,
        prefill_link_gbps=pre.get("bytes_copied", 0) / r["ttft_s"] / GB,
        decode_hit_rate=(dec["hits"] / (dec["hits"] + dec["misses"]))
        if dec.get("hits", 0) + dec.get("misses", 0)
        else None,
        wait_s=pre.get("wait_seconds", 0) + dec.get("wait_seconds", 0),
        peak_gib=torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        slots=engine.memory_plan.num_expert_slots if engine.memory_plan else None,
    )
    r["within_budget"] = (
        None if budget is None or r["peak_gib"] is None else r["peak_gib"] <= budget
    )
    return r


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="duoserve bench offload", description=__doc__)
    p.add_argument("--arch", default="qwen3-30b-a3b")
    p.add_argument("--scale", default="full")
    p.add_argument("--budgets", nargs="+", type=float, default=[8, 16, 32])
    p.add_argument("--policies", nargs="+", default=["ondemand", "lru"])
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-full-gpu", action="store_true", help="skip the full-gpu upper bound")
    p.add_argument("--trace", default=None, help="replay routing from this trace (safetensors)")
    p.add_argument("--out", default="bench/results/offload.json")
    args = p.parse_args(argv)
    engine = LLMEngine(
        f"synthetic:{args.arch}:{args.scale}",
        EngineConfig(
            device=args.device,
            dtype="bfloat16",
            max_model_len=args.prompt_len + args.max_tokens + 16,
            max_num_seqs=1,
            max_num_batched_tokens=args.prompt_len + 16,
            policy=args.policies[0],
            gpu_memory_budget=max(args.budgets),
        ),
    )
    routing = "the synthetic model's own (random weights)"
    if args.trace:
        from duoserve.bench.replay import TraceReplay

        replay = TraceReplay(args.trace, engine.device)
        replay.attach(engine)
        routing = replay.describe()
    print(f"routing: {routing}", flush=True)
    expert_bytes = engine.model_config.expert_numel * 2
    link = measure_link_bandwidth(engine.device, expert_bytes) if args.device == "cuda" else {}
    prompt = random_prompt(engine.model_config.vocab_size, args.prompt_len)
    warm = random_prompt(engine.model_config.vocab_size, args.prompt_len, seed=1)
    for policy in args.policies:  # warm up kernels and allocator at the measured shapes
        engine.set_expert_policy(policy, max(args.budgets))
        run_generation(engine, warm, 4)
    rows = []
    for budget in args.budgets:
        for policy in args.policies:
            rows.append(run_policy(engine, policy, budget, prompt, args.max_tokens))
            print(rows[-1], flush=True)
    if not args.no_full_gpu:
        rows.append(run_policy(engine, "full-gpu", None, prompt, args.max_tokens))
    bw = link.get("copy_1gib_gbps")
    for r in rows:
        r["prefill_bound_s"] = rows[0]["prefill_gb"] / bw if bw else None  # ondemand: each once
    env = environment()
    write_json(
        args.out, {"env": env, "args": vars(args), "routing": routing, "link": link, "rows": rows}
    )
    print(f"link (pinned host->GPU): {link}")
    print_table(
        rows,
        [
            ("policy", "policy", "s"),
            ("budget_gib", "budget GiB", ".0f"),
            ("ttft_s", "TTFT s", ".3f"),
            ("prefill_bound_s", "bound s", ".3f"),
            ("decode_tok_s", "tok/s", ".2f"),
            ("prefill_gb", "prefill GB", ".1f"),
            ("decode_gb_per_tok", "GB/token", ".3f"),
            ("decode_hit_rate", "hit rate", ".3f"),
            ("copy_gbps", "copy GB/s", ".1f"),
            ("prefill_link_gbps", "eff GB/s", ".1f"),
            ("wait_s", "waited s", ".2f"),
            ("peak_gib", "peak GiB", ".2f"),
            ("slots", "slots", "d"),
        ],
    )


if __name__ == "__main__":
    main()
