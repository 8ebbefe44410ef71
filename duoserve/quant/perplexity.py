"""Held-out perplexity through duoserve with bf16 vs int4 experts (docs/int4.md).

    python -m duoserve.quant.perplexity [--model DIR] [--expert-dtype int4] [--method clip]

The test half of the held-out split (its second half; the first half is the training run's
validation set, see training/presets.py) in non-overlapping windows of `seq_len` tokens, scored
like training/evaluate.py's `heldout_loss`: mean next-token NLL, perplexity = exp(NLL).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from duoserve import LLM
from duoserve.quant import loading

HELDOUT_TOKENS = ".carry/corpus/heldout.tokens.npy"


def test_windows(path: str, seq_len: int) -> torch.Tensor:
    """[W, seq_len + 1] windows of the second half of the held-out tokens."""
    ids = torch.from_numpy(np.load(path).astype(np.int64))
    test = ids[ids.numel() // 2 :]
    num = (test.numel() - 1) // seq_len
    starts = torch.arange(num) * seq_len
    return test[starts[:, None] + torch.arange(seq_len + 1)]  # [W, L + 1]


def heldout_nll(llm: LLM, windows: torch.Tensor) -> float:
    """Mean next-token NLL (nats) of `windows` [W, L + 1] scored with `llm.logits`."""
    total, count = 0.0, 0
    batch = llm.engine.kv.num_slots
    for start in range(0, windows.shape[0], batch):
        chunk = windows[start : start + batch]
        logits = llm.logits([w[:-1].tolist() for w in chunk])  # W x [L, V]
        for lg, w in zip(logits, chunk):
            total += float(F.cross_entropy(lg.float(), w[1:], reduction="sum"))
            count += w.numel() - 1
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model dir (default: the shipped model)")
    parser.add_argument("--tokens", default=HELDOUT_TOKENS)
    parser.add_argument("--expert-dtype", default="bf16", choices=loading.EXPERT_DTYPES)
    parser.add_argument("--method", default="rtn", choices=("rtn", "clip"))
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    loading.QUANT_METHOD = args.method
    torch.set_grad_enabled(False)
    windows = test_windows(args.tokens, args.seq_len)
    llm = LLM(
        args.model,
        device=args.device,
        dtype=args.dtype,
        expert_dtype=args.expert_dtype,
        max_model_len=args.seq_len + 1,
        max_num_seqs=8,
        max_num_batched_tokens=8 * args.seq_len,
    )
    t0 = time.perf_counter()
    nll = heldout_nll(llm, windows)
    layout = getattr(llm.engine.experts, "layout", None)
    result = {
        "expert_dtype": args.expert_dtype,
        "method": args.method if args.expert_dtype == "int4" else None,
        "group_size": None if layout is None else layout.group_size,
        "tokens": int(windows.shape[0] * args.seq_len),
        "nll": round(nll, 5),
        "ppl": round(math.exp(nll), 4),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
