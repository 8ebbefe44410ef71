"""Trained checkpoints load in duoserve with logits equal to transformers' (fp32, same GPU).

python scripts/check_trained.py DIR [DIR ...]
"""

from __future__ import annotations

import sys

import torch
import transformers

from duoserve import LLM

TEXT = ["The list comprehension builds a new list.", "import os\nprint(os.getcwd())"]


def main(dirs: list[str]) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for path in dirs:
        llm = LLM(path, device=device, dtype="float32", max_model_len=256, enforce_eager=1)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
        ids = [llm.tokenizer.encode(t) for t in TEXT]
        worst = 0.0
        for seq, ours in zip(ids, llm.logits(ids)):
            with torch.no_grad():
                want = hf(torch.tensor([seq], device=device)).logits[0].float().cpu()
            worst = max(worst, ((ours - want).abs().max() / want.abs().max()).item())
        cfg = llm.engine.model_config
        print(
            f"{path}: {cfg.architecture} {cfg.num_layers}x{cfg.num_experts} "
            f"top-{cfg.num_experts_per_tok}"
            f": max |ours - transformers| / max|logit| = {worst:.2e}"
        )
        del llm, hf
        torch.cuda.empty_cache() if device == "cuda" else None


if __name__ == "__main__":
    main(sys.argv[1:])
