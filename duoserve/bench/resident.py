"""Full-GPU upper bound: our engine vs transformers' generate on the same synthetic weights.

    python -m duoserve.bench.resident --archs olmoe-1b-7b qwen3-30b-a3b --out results.json

Batch 1, bf16, every weight resident; TTFT and decode tokens/s of each, in the same run.
"""

from __future__ import annotations

import argparse
import gc

import torch

from duoserve.bench.common import (
    environment,
    print_table,
    random_prompt,
    run_generation,
    write_json,
)
from duoserve.config import EngineConfig
from duoserve.engine.llm_engine import LLMEngine
from duoserve.weights.synthetic import synthetic_config


def bench_arch(arch: str, scale: str, prompt_len: int, max_tokens: int, device: str) -> list[dict]:
    spec = f"synthetic:{arch}:{scale}"
    engine = LLMEngine(
        spec,
        EngineConfig(
            device=device,
            dtype="bfloat16",
            max_model_len=prompt_len + max_tokens + 16,
            max_num_seqs=1,
            max_num_batched_tokens=prompt_len + 16,
            policy="full-gpu",
        ),
    )
    prompt = random_prompt(engine.model_config.vocab_size, prompt_len)
    run_generation(engine, random_prompt(engine.model_config.vocab_size, prompt_len, 1), 4)
    ours = run_generation(engine, prompt, max_tokens)
    engine.runner.enable_cuda_graphs(False)
    eager = run_generation(engine, prompt, max_tokens)
    peak = torch.cuda.max_memory_reserved() / 2**30 if device == "cuda" else None
    del engine
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    from duoserve.bench.hf_baseline import build_hf_model, time_hf_generate

    hf_model = build_hf_model(synthetic_config(arch, scale), seed=0, device=device)
    hf = time_hf_generate(hf_model, prompt, max_tokens, device)
    del hf_model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    same = 0
    for a, b in zip(ours["output_token_ids"], hf["output_token_ids"]):
        if a != b:
            break
        same += 1
    rows = []
    systems = (
        ("duoserve full-gpu", ours),
        ("duoserve full-gpu eager", eager),
        ("transformers generate", hf),
    )
    for system, r in systems:
        row = {k: v for k, v in r.items() if k != "output_token_ids"}
        rows.append(
            {
                "arch": arch,
                "system": system,
                **row,
                "peak_gib": peak if r is ours else None,
                "greedy_prefix_agree": same,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="duoserve bench resident", description=__doc__)
    p.add_argument("--archs", nargs="+", default=["olmoe-1b-7b", "qwen3-30b-a3b"])
    p.add_argument("--scale", default="full")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="bench/results/resident.json")
    args = p.parse_args(argv)
    rows = []
    for arch in args.archs:
        rows += bench_arch(arch, args.scale, args.prompt_len, args.max_tokens, args.device)
    write_json(args.out, {"env": environment(), "args": vars(args), "rows": rows})
    print_table(
        rows,
        [
            ("arch", "arch", "s"),
            ("system", "system", "s"),
            ("ttft_s", "TTFT s", ".4f"),
            ("decode_tok_s", "decode tok/s", ".1f"),
            ("tpot_s", "TPOT s", ".4f"),
            ("peak_gib", "peak GiB", ".2f"),
            ("greedy_prefix_agree", "same greedy", "d"),
        ],
    )


if __name__ == "__main__":
    main()
