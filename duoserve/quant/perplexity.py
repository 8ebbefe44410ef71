"""Held-out perplexity through duoserve with bf16 vs int4 experts (docs/int4.md).

    python -m duoserve.quant.perplexity [--model DIR] [--expert-dtype int4] [--method clip]
        [--device cuda] [--max-windows N] [--json PATH]

The test part of the held-out split, cut exactly as training does it (`training/train.py:
split_heldout`: the validation part runs to the first eos after the middle, the test part is
the rest; eval.json's `heldout_perplexity` is measured on the same tokens), in non-overlapping
windows of `seq_len` tokens, scored like training/evaluate.py's `heldout_loss`: mean next-token
NLL, perplexity = exp(NLL). The tokens file must come from the model's tokenizer: token ids
past the model's vocabulary, or a corpus tokenizer (`<tokens dir>/tokenizer/tokenizer.json`)
that encodes differently from the model's, raise.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as HFTokenizer

from duoserve import LLM
from duoserve.quant import loading
from duoserve.training.corpus import EOS_TOKEN
from duoserve.training.train import split_heldout

HELDOUT_TOKENS = ".carry/corpus/heldout.tokens.npy"


def read_tokens(path: str | Path) -> torch.Tensor:
    """int64 ids [N] of a corpus tokens file (never unpickles); a clear error when missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: held-out tokens not found (build them with scripts/build_corpus.sh; on the "
            "GPU machine carry .carry/corpus)"
        )
    return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))


def check_tokenizer(llm: LLM, ids: torch.Tensor, tokens_path: str | Path) -> str:
    """Refuse ids the model cannot embed or a corpus tokenizer unlike the model's; says what held.

    The corpus tokenizer (`<tokens dir>/tokenizer/tokenizer.json`, written by
    build_corpus.sh) and the model's tokenizer must encode a decoded held-out passage alike.
    """
    vocab = llm.engine.model_config.vocab_size
    if int(ids.max()) >= vocab:
        raise ValueError(f"{tokens_path}: token id {int(ids.max())} >= the model's vocab {vocab}")
    corpus_tok_path = Path(tokens_path).parent / "tokenizer" / "tokenizer.json"
    if not corpus_tok_path.is_file():
        return f"ids < vocab {vocab}; no corpus tokenizer to compare"
    corpus_tok = HFTokenizer.from_file(str(corpus_tok_path))
    text = corpus_tok.decode(ids[-2048:].tolist(), skip_special_tokens=False)
    expected = corpus_tok.encode(text, add_special_tokens=False).ids
    if llm.tokenizer.encode(text, add_special_tokens=False) != expected:
        raise ValueError(f"{corpus_tok_path} encodes held-out text unlike the model's tokenizer")
    return f"ids < vocab {vocab}; model tokenizer encodes like {corpus_tok_path}"


def eos_id_of(llm: LLM) -> int:
    """Id of the corpus's end-of-text token in the model's tokenizer (the split needs it)."""
    ids = llm.tokenizer.encode(EOS_TOKEN, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"the model's tokenizer has no {EOS_TOKEN} token: not a corpus model")
    return ids[0]


def heldout_windows(
    ids: torch.Tensor, eos_id: int, seq_len: int, max_windows: int = 0
) -> torch.Tensor:
    """[W, seq_len + 1] windows of the test part of held-out ids [N] (at most max_windows > 0)."""
    _, test = split_heldout(ids, eos_id)
    num = (test.numel() - 1) // seq_len
    if max_windows > 0:
        num = min(num, max_windows)
    assert num > 0, f"need more than {seq_len} test tokens, have {test.numel()}"
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


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def measure(
    model: str | None = None,
    tokens: str | Path = HELDOUT_TOKENS,
    expert_dtype: str = "bf16",
    method: str = "rtn",
    seq_len: int = 512,
    device: str = "cpu",
    dtype: str = "auto",
    max_windows: int = 0,
) -> dict:
    """Held-out NLL and perplexity of one model and expert format, with what produced them."""
    ids = read_tokens(tokens)  # before the (slow) model load
    saved_method, loading.QUANT_METHOD = loading.QUANT_METHOD, method
    t0 = time.perf_counter()
    try:
        llm = LLM(
            model,
            device=device,
            dtype=dtype,
            expert_dtype=expert_dtype,
            max_model_len=seq_len + 1,
            max_num_seqs=8,
            max_num_batched_tokens=8 * seq_len,
        )
    finally:
        loading.QUANT_METHOD = saved_method
    load_s = time.perf_counter() - t0
    check = check_tokenizer(llm, ids, tokens)
    windows = heldout_windows(ids, eos_id_of(llm), seq_len, max_windows)
    t0 = time.perf_counter()
    with torch.inference_mode():
        nll = heldout_nll(llm, windows)  # its float() of each loss waits for the device
    layout = getattr(llm.engine.experts, "layout", None)
    return {
        "model": llm.engine.model_name,
        "expert_dtype": expert_dtype,
        "method": method if layout is not None else None,
        "group_size": None if layout is None else layout.group_size,
        "dtype": str(llm.engine.dtype).removeprefix("torch."),
        "device": str(llm.engine.device),
        "device_name": _device_name(llm.engine.device),
        "seq_len": seq_len,
        "windows": int(windows.shape[0]),
        "tokens": int(windows.shape[0] * seq_len),
        "nll": round(nll, 6),
        "ppl": round(math.exp(nll), 4),
        "load_seconds": round(load_s, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "tokenizer_check": check,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model dir (default: the shipped model)")
    parser.add_argument("--tokens", default=HELDOUT_TOKENS)
    parser.add_argument("--expert-dtype", default="bf16", choices=loading.EXPERT_DTYPES)
    parser.add_argument("--method", default="rtn", choices=("rtn", "clip"))
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-windows", type=int, default=0, help="0: every test window")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args()
    try:
        result = measure(
            args.model,
            args.tokens,
            args.expert_dtype,
            args.method,
            args.seq_len,
            args.device,
            args.dtype,
            args.max_windows,
        )
    except (FileNotFoundError, ValueError) as exc:  # a wrong input, not a bug: no traceback
        raise SystemExit(f"error: {exc}") from exc
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
