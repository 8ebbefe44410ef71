"""Quality and routing evidence for a trained model: perplexity, routing statistics, samples.

Routing statistics on the held-out split, each against uniform random routing:

- load entropy per layer (nats; uniform = log E) and the most-loaded expert's share x E;
- consecutive-token reuse: mean |S_t ∩ S_t+1| of the top-k sets at one layer
  (uniform: K*K/E);
- inter-layer predictability: layer l's set predicts layer l+1's through a co-occurrence
  table fitted on the first half of the tokens and scored on the second half; also the
  popularity-only predictor (the K most-loaded experts) and gate-lookahead (layer l+1's
  router applied to the residual stream after layer l). Reported as the mean fraction of
  the K experts hit, the exact-set rate and the at-least-half-right rate.
"""

from __future__ import annotations

import argparse
import json
import math
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from duoserve.training.model import MoeForCausalLM, grouped_mm_works

SAMPLE_PROMPTS = (
    "The Python programming language",
    "A list is",
    "To open a file for reading,",
    "<|user|>\nWhat is a dictionary?<|endoftext|>\n<|assistant|>\n",
)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _windows(ids: torch.Tensor, length: int, max_windows: int) -> torch.Tensor:
    num = min((ids.numel() - 1) // length, max_windows)
    assert num > 0, f"need more than {length} held-out tokens"
    return ids[: num * length + 1]


@torch.no_grad()
def heldout_loss(
    model: MoeForCausalLM,
    ids: torch.Tensor,
    seq_len: int,
    batch_size: int,
    max_windows: int = 1 << 30,
) -> float:
    """Mean next-token NLL (nats) over non-overlapping windows of ``ids [N]``."""
    was_training = model.training
    model.eval()
    ids = _windows(ids, seq_len, max_windows)
    num = (ids.numel() - 1) // seq_len
    inputs = ids[:-1].view(num, seq_len)
    targets = ids[1:].view(num, seq_len)
    total, count = 0.0, 0
    for start in range(0, num, batch_size):
        x = inputs[start : start + batch_size].to(model.lm_head.weight.device)
        y = targets[start : start + batch_size].to(x.device)
        with _autocast(x.device):
            logits = model(x).logits
        nll = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), y.flatten(), reduction="sum"
        )
        total += float(nll)
        count += y.numel()
    model.train(was_training)
    return total / count


@torch.no_grad()
def collect_routing(
    model: MoeForCausalLM, ids: torch.Tensor, seq_len: int, max_tokens: int, batch_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ids ``[L, N, K]`` and gate-lookahead ids ``[L-1, N, K]`` (int64, CPU)."""
    model.eval()
    ids = _windows(ids, seq_len, max(1, max_tokens // seq_len))
    windows = ids[:-1].view(-1, seq_len)
    chosen, lookahead = [], []
    for start in range(0, windows.shape[0], batch_size):
        x = windows[start : start + batch_size].to(model.lm_head.weight.device)
        with _autocast(x.device):
            out = model(x, keep_layer_outputs=True)
            ahead = []
            for layer in range(model.cfg.num_layers - 1):
                nxt = model.layers[layer + 1]
                hidden = nxt.post_attn_norm(out.layer_outputs[layer]).flatten(0, 1)
                ahead.append(nxt.moe.route(hidden)[0].top_ids.cpu())
        chosen.append(torch.stack([r.top_ids.cpu() for r in out.routings]))
        lookahead.append(torch.stack(ahead) if ahead else torch.zeros(0, 0, model.cfg.top_k))
    return torch.cat(chosen, dim=1), torch.cat(lookahead, dim=1).long()


def _one_hot(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[N, K]`` ids -> ``[N, E]`` float membership."""
    out = torch.zeros(ids.shape[0], num_experts)
    return out.scatter_(1, ids, 1.0)


def _set_match(predicted: torch.Tensor, actual: torch.Tensor, top_k: int) -> dict[str, float]:
    hits = (predicted * actual).sum(-1)  # [N] experts of the true set that were predicted
    return {
        "hit_fraction": float(hits.mean() / top_k),
        "exact_rate": float((hits == top_k).float().mean()),
        "half_rate": float((hits >= math.ceil(top_k / 2)).float().mean()),
    }


def _uniform_match(num_experts: int, top_k: int) -> dict[str, float]:
    """Same numbers for a random K-set (hypergeometric)."""
    total = math.comb(num_experts, top_k)

    def p_hits(h: int) -> float:
        return math.comb(top_k, h) * math.comb(num_experts - top_k, top_k - h) / total

    half = sum(p_hits(h) for h in range(math.ceil(top_k / 2), top_k + 1))
    return {"hit_fraction": top_k / num_experts, "exact_rate": 1 / total, "half_rate": half}


def routing_statistics(
    top_ids: torch.Tensor, lookahead_ids: torch.Tensor, num_experts: int, seq_len: int
) -> dict[str, object]:
    """Per-layer load, reuse and inter-layer predictability of ``top_ids [L, N, K]``."""
    num_layers, num_tokens, top_k = top_ids.shape
    valid_pair = (torch.arange(1, num_tokens) % seq_len) != 0  # pairs inside one window
    half = num_tokens // 2
    layers = []
    nxt = _one_hot(top_ids[0], num_experts)  # [N, E]
    for layer in range(num_layers):
        cur = nxt
        load = cur.sum(0) / (num_tokens * top_k)  # [E]
        entropy = float(-(load * load.clamp_min(1e-12).log()).sum())
        shared = (cur[:-1] * cur[1:]).sum(-1)[valid_pair]
        stats: dict[str, object] = {
            "layer": layer,
            "load_entropy": entropy,
            "max_load_x_experts": float(load.max() * num_experts),
            "min_load_x_experts": float(load.min() * num_experts),
            "consecutive_overlap": float(shared.mean()),
        }
        if layer + 1 < num_layers:
            nxt = _one_hot(top_ids[layer + 1], num_experts)
            table = cur[:half].T @ nxt[:half]  # [E, E] co-occurrence on the fit half
            table = table / table.sum(-1, keepdim=True).clamp_min(1.0)
            scores = cur[half:] @ table  # [N/2, E]
            predicted = _one_hot(scores.topk(top_k, dim=-1).indices, num_experts)
            popular = nxt[:half].sum(0).topk(top_k).indices
            popular_set = _one_hot(popular.expand(num_tokens - half, top_k), num_experts)
            ahead = _one_hot(lookahead_ids[layer][half:], num_experts)
            stats["next_layer_cooccurrence"] = _set_match(predicted, nxt[half:], top_k)
            stats["next_layer_popularity"] = _set_match(popular_set, nxt[half:], top_k)
            stats["next_layer_gate_lookahead"] = _set_match(ahead, nxt[half:], top_k)
        layers.append(stats)

    def mean_of(key: str, sub: str | None = None) -> float:
        values = [s[key] if sub is None else s[key][sub] for s in layers if key in s]
        return sum(values) / len(values)  # type: ignore[arg-type]

    predictors = ("cooccurrence", "popularity", "gate_lookahead")
    return {
        "num_tokens": num_tokens,
        "num_experts": num_experts,
        "top_k": top_k,
        "uniform": {
            "load_entropy": math.log(num_experts),
            "consecutive_overlap": top_k * top_k / num_experts,
            "next_layer": _uniform_match(num_experts, top_k),
        },
        "mean": {
            "load_entropy": mean_of("load_entropy"),
            "max_load_x_experts": mean_of("max_load_x_experts"),
            "consecutive_overlap": mean_of("consecutive_overlap"),
            **{
                f"next_layer_{p}": {
                    m: mean_of(f"next_layer_{p}", m)
                    for m in ("hit_fraction", "exact_rate", "half_rate")
                }
                for p in predictors
            },
        }
        if num_layers > 1
        else {},
        "layers": layers,
    }


@torch.no_grad()
def generate(
    model: MoeForCausalLM,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    seed: int = 0,
) -> tuple[list[int], list[int]]:
    """Greedy and sampled continuations of one prompt (no KV cache: tiny models)."""
    model.eval()
    device = model.lm_head.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    seqs = torch.tensor([prompt_ids, prompt_ids], device=device)  # row 0 greedy, row 1 sampled
    max_context = model.cfg.max_position_embeddings
    for _ in range(max_new_tokens):
        with _autocast(device):
            logits = model(seqs[:, -max_context:]).logits[:, -1].float()  # [2, V]
        greedy = logits[0].argmax()
        top = (logits[1] / temperature).topk(top_k)
        pick = torch.multinomial(top.values.softmax(-1), 1, generator=gen)
        seqs = torch.cat([seqs, torch.stack([greedy, top.indices[pick[0]]])[:, None]], dim=1)
    new = seqs[:, len(prompt_ids) :].tolist()
    return new[0], new[1]


def sample_generations(
    model: MoeForCausalLM, tokenizer: Tokenizer, eos_id: int, max_new_tokens: int = 80
) -> list[dict[str, str]]:
    """Greedy and sampled (T=0.8, top-40) text for SAMPLE_PROMPTS, cut at eos."""
    samples = []
    for prompt in SAMPLE_PROMPTS:
        greedy, sampled = generate(model, tokenizer.encode(prompt).ids, max_new_tokens, 0.8, 40)
        texts = []
        for ids in (greedy, sampled):
            ids = ids[: ids.index(eos_id)] if eos_id in ids else ids
            texts.append(tokenizer.decode(ids))
        samples.append({"prompt": prompt, "greedy": texts[0], "sampled": texts[1]})
    return samples


def evaluate_model(
    model: MoeForCausalLM,
    tokenizer: Tokenizer,
    eos_id: int,
    heldout_ids: torch.Tensor,
    seq_len: int,
    out_dir: Path,
    max_routing_tokens: int = 65536,
    trace_tokens: int = 16384,
) -> dict:
    """Write eval.json (perplexity, routing statistics, samples) and routing_trace.safetensors."""
    nll = heldout_loss(model, heldout_ids, seq_len, batch_size=16)
    top_ids, lookahead = collect_routing(model, heldout_ids, seq_len, max_routing_tokens)
    stats = routing_statistics(top_ids, lookahead, model.cfg.num_experts, seq_len)
    n = min(trace_tokens, top_ids.shape[1])
    save_file(
        {
            "expert_ids": top_ids[:, :n]
            .to(torch.uint8 if model.cfg.num_experts <= 256 else torch.int16)
            .contiguous(),
            "token_ids": heldout_ids[:n].to("cpu", torch.int32).contiguous(),
        },
        str(out_dir / "routing_trace.safetensors"),
        metadata={"seq_len": str(seq_len), "layout": "expert_ids [L, N, K]; windows of seq_len"},
    )
    result: dict = {
        "heldout_nll": nll,
        "heldout_perplexity": math.exp(nll),
        "heldout_tokens": int(heldout_ids.numel()),
        "routing": stats,
        "samples": [],
    }
    eval_path = out_dir / "eval.json"
    eval_path.write_text(json.dumps(result, indent=1) + "\n")  # kept if sampling fails
    result["samples"] = sample_generations(model, tokenizer, eos_id)
    eval_path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return result


def main() -> None:
    """CLI: re-evaluate a saved HF checkpoint on the held-out split."""
    from duoserve.training.checkpoint import load_hf_checkpoint
    from duoserve.training.tokenizer import eos_token_id, load_corpus_tokens

    parser = argparse.ArgumentParser(description="Evaluate a trained MoE checkpoint.")
    parser.add_argument("--model", type=Path, required=True, help="HF checkpoint folder")
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for eval.json")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    model = load_hf_checkpoint(args.model, args.device)
    if model.lm_head.weight.is_cuda and grouped_mm_works(model.lm_head.weight.device):
        model.set_expert_backend("grouped")
    tokenizer = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    heldout = torch.from_numpy(load_corpus_tokens(args.corpus, "heldout").astype("int64"))
    args.out.mkdir(parents=True, exist_ok=True)
    result = evaluate_model(
        model, tokenizer, eos_token_id(tokenizer), heldout, args.seq_len, args.out
    )
    print(json.dumps({k: v for k, v in result.items() if k != "routing"}, indent=1))


if __name__ == "__main__":
    main()
