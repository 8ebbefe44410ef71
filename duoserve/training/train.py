"""Train one preset from scratch and write an HF checkpoint, logs and evaluation.

    python -m duoserve.training.train --preset default --corpus .carry/corpus --out DIR \
        [--max-minutes M] [--device cuda] [--any-config-field VALUE ...]

Run folder ``DIR``: ``model/`` (HF checkpoint, bf16), ``train_log.json`` (configs, loss
curve, summary), ``eval.json`` and ``routing_trace.safetensors`` (see ``evaluate``),
``train_state.{safetensors,json}`` (resume: run the same command again). SIGTERM/SIGINT
end the loop early but still save, export and evaluate.

Recipe: fp32 master weights under bf16 autocast on CUDA (fp32 on CPU), AdamW
(beta2 0.95, weight decay on matrices), linear warmup then cosine decay over the run's
progress, where progress is the largest of elapsed/max_minutes, tokens/max_epochs and
steps/max_steps; loss = cross-entropy + aux_loss_coef * mean per-layer balance loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from duoserve.training.checkpoint import load_train_state, save_hf_checkpoint, save_train_state
from duoserve.training.corpus import read_documents
from duoserve.training.evaluate import evaluate_model, heldout_loss
from duoserve.training.model import MoeConfig, MoeForCausalLM, grouped_mm_works
from duoserve.training.presets import PRESETS, TrainConfig
from duoserve.training.tokenizer import (
    encode_documents,
    eos_token_id,
    load_corpus_tokens,
    train_tokenizer,
)


def progress_of(
    step: int, tokens_seen: int, elapsed_s: float, train_tokens: int, tc: TrainConfig
) -> float:
    """Fraction of the run done: the largest of the three limits' fractions."""
    parts = [0.0]
    if tc.max_minutes > 0:
        parts.append(elapsed_s / (60 * tc.max_minutes))
    if tc.max_epochs > 0:
        parts.append(tokens_seen / (tc.max_epochs * train_tokens))
    if tc.max_steps > 0:
        parts.append(step / tc.max_steps)
    return max(parts)


def lr_at(step: int, progress: float, tc: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from peak_lr to peak_lr*min_lr_ratio."""
    warmup = min(1.0, (step + 1) / max(1, tc.warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return tc.peak_lr * warmup * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * cosine)


def get_batch(ids: torch.Tensor, step: int, tc: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows ``[B, S]`` of inputs and targets; deterministic in (seed, step, device)."""
    # Drawn on ids' device: a host-to-device copy of pageable memory waits for the queue.
    gen = torch.Generator(device=ids.device).manual_seed(tc.seed * 1_000_003 + step)
    high = ids.numel() - tc.seq_len - 1
    starts = torch.randint(0, high, (tc.batch_size,), generator=gen, device=ids.device)
    index = starts[:, None] + torch.arange(tc.seq_len + 1, device=ids.device)
    window = ids[index]  # [B, S+1]
    return window[:, :-1], window[:, 1:]


def build_optimizer(model: MoeForCausalLM, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm weights are 1-D)."""
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = params[0].device.type == "cuda"
    return torch.optim.AdamW(groups, lr=tc.peak_lr, betas=(0.9, tc.beta2), fused=fused)


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop finishes the step and saves."""

    requested = False

    @classmethod
    def install(cls) -> None:
        def handler(signum: int, frame: object) -> None:
            print(f"signal {signum}: stopping after this step", flush=True)
            cls.requested = True

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def _train_step(model, optimizer, x, y, tc: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step; returns the detached cross-entropy and balance loss."""
    use_amp = x.device.type == "cuda"
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_amp):
        out = model(x)
        ce = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten())
    (ce + tc.aux_loss_coef * out.aux_loss).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return ce.detach(), out.aux_loss.detach()


class _LossMeter:
    """Sums losses on the device; reading them is the only host sync of the loop."""

    def __init__(self, device: torch.device, tokens: int) -> None:
        self.device = device
        self._reset(tokens)

    def _reset(self, tokens: int) -> None:
        self.tokens, self.time = tokens, time.perf_counter()
        self.ce = self.aux = torch.zeros((), device=self.device)
        self.count = 0

    def add(self, ce: torch.Tensor, aux: torch.Tensor) -> None:
        self.ce, self.aux, self.count = self.ce + ce, self.aux + aux, self.count + 1

    def read_and_reset(self, tokens: int) -> dict[str, float]:
        record = {
            "train_loss": float(self.ce) / self.count,
            "aux_loss": float(self.aux) / self.count,
        }
        now = time.perf_counter()  # after float(): the device has finished these steps
        record["tokens_per_s"] = (tokens - self.tokens) / (now - self.time)
        self._reset(tokens)
        return record


def train_model(
    model: MoeForCausalLM,
    tc: TrainConfig,
    train_ids: torch.Tensor,
    valid_ids: torch.Tensor,
    run_dir: Path,
    save_state: bool = True,
    steps_this_run: int = 0,
) -> dict:
    """Train (resuming from run_dir's train_state if present); returns the log dict."""
    device = model.lm_head.weight.device
    optimizer = build_optimizer(model, tc)
    log: dict = {"step": 0, "tokens_seen": 0, "elapsed_s": 0.0, "records": []}
    if (run_dir / "train_state.json").exists():
        log = load_train_state(run_dir, model, optimizer)
        print(f"resumed at step {log['step']} ({log['tokens_seen']} tokens)", flush=True)
    model.residual_dropout = tc.residual_dropout
    model.train()
    step, tokens, steps_done, lr = log["step"], log["tokens_seen"], 0, 0.0
    meter, start_time, start_elapsed = (
        _LossMeter(device, tokens),
        time.perf_counter(),
        log["elapsed_s"],
    )
    best: dict = {"step": 0, "heldout_loss": math.inf, "weights": None}

    def elapsed_s() -> float:
        return start_elapsed + time.perf_counter() - start_time

    while not _StopFlag.requested and (steps_this_run <= 0 or steps_done < steps_this_run):
        progress = progress_of(step, tokens, elapsed_s(), train_ids.numel(), tc)
        if progress >= 1.0:
            break
        lr = lr_at(step, progress, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        meter.add(*_train_step(model, optimizer, *get_batch(train_ids, step, tc), tc))
        step, steps_done, tokens = step + 1, steps_done + 1, tokens + tc.batch_size * tc.seq_len
        record = meter.read_and_reset(tokens) if step % tc.log_every_steps == 0 else {}
        if step % tc.eval_every_steps == 0:
            loss = heldout_loss(model, valid_ids, tc.seq_len, 16, tc.heldout_eval_seqs)
            record["heldout_loss"] = loss
            if tc.keep_best and loss < best["heldout_loss"]:
                weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best = {"step": step, "heldout_loss": loss, "weights": weights}
        if record:
            record = {"step": step, "tokens": tokens, "elapsed_s": elapsed_s(), "lr": lr, **record}
            log["records"].append(record)
            shown = " ".join(f"{k}={v:.4g}" for k, v in record.items())
            print(f"epoch={tokens / train_ids.numel():.2f} {shown}", flush=True)
    log.update(step=step, tokens_seen=tokens, elapsed_s=elapsed_s())
    if meter.count:
        log["records"].append(
            {"step": step, "tokens": tokens, "elapsed_s": log["elapsed_s"], "lr": lr}
            | meter.read_and_reset(tokens)
        )
    if save_state:
        save_train_state(run_dir, model, optimizer, log)
    if best["weights"] is not None:
        _keep_best(model, best, valid_ids, step, tc, log)
    return log


def _keep_best(model, best: dict, valid_ids, step: int, tc: TrainConfig, log: dict) -> None:
    """Restore the best periodic weights unless the final ones validate at least as well."""
    final_loss = heldout_loss(model, valid_ids, tc.seq_len, 16, tc.heldout_eval_seqs)
    if final_loss > best["heldout_loss"]:
        # NOTE: after the train state is saved, so a resumed run continues from the last step.
        model.load_state_dict(best["weights"])
    else:
        best = {"step": step, "heldout_loss": final_loss}
    log["best"] = {"step": best["step"], "heldout_loss": best["heldout_loss"]}
    print(f"keeping the weights of step {best['step']} (validation {best['heldout_loss']:.4f})")


def split_heldout(ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation (first half) and test (second half) of the held-out ids, cut after an eos."""
    eos_positions = (ids[ids.numel() // 2 :] == eos_id).nonzero()
    cut = ids.numel() // 2 + (int(eos_positions[0]) + 1 if eos_positions.numel() else 0)
    return ids[:cut], ids[cut:]


def load_corpus(corpus_dir: Path, vocab_size: int) -> tuple[Tokenizer, torch.Tensor, torch.Tensor]:
    """Tokenizer and int64 ids of both splits; a corpus tokenizer of another size is rebuilt."""
    tokenizer_path = corpus_dir / "tokenizer" / "tokenizer.json"
    if tokenizer_path.exists():
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        if tokenizer.get_vocab_size() == vocab_size:
            train = load_corpus_tokens(corpus_dir, "train").astype("int64")
            heldout = load_corpus_tokens(corpus_dir, "heldout").astype("int64")
            return tokenizer, torch.from_numpy(train), torch.from_numpy(heldout)
    print(f"training a {vocab_size}-token tokenizer for this run", flush=True)
    docs = read_documents(corpus_dir, "train")
    tokenizer = train_tokenizer([t for i, t in docs if "#chat" not in i], vocab_size)
    train_docs = [t for _, t in docs]
    heldout_docs = [t for _, t in read_documents(corpus_dir, "heldout")]
    train = torch.from_numpy(encode_documents(tokenizer, train_docs).astype("int64"))
    return (
        tokenizer,
        train,
        torch.from_numpy(encode_documents(tokenizer, heldout_docs).astype("int64")),
    )


def _add_field_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One optional flag per dataclass field, so each knob is declared once."""
    kinds = {
        "int": int,
        "float": float,
        "str": str,
        "bool": lambda s: s.lower() in ("1", "true", "yes"),
    }
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(
            flag,
            type=kinds[str(field.type)],
            default=None,
            help=f"override {cls.__name__}.{field.name}",
        )


def _overrides(args: argparse.Namespace, cfg: object) -> object:
    names = {f.name for f in dataclasses.fields(cfg)}  # type: ignore[arg-type]
    changes = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--corpus", type=Path, default=Path(".carry/corpus"))
    parser.add_argument("--out", type=Path, required=True, help="run folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-save-state", action="store_true", help="skip train_state")
    parser.add_argument("--steps-this-run", type=int, default=0, help="stop after N steps")
    _add_field_flags(parser, TrainConfig)
    _add_field_flags(parser, MoeConfig)
    return parser.parse_args()


def _summary(args, model_cfg, log, backend, checkpoint_bytes, num_train_tokens) -> dict:
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    train_records = [r for r in log["records"] if "tokens_per_s" in r]
    return {
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device) if on_cuda else "cpu",
        "expert_backend": backend,
        "num_params": model_cfg.num_params,
        "checkpoint_bytes": checkpoint_bytes,
        "steps": log["step"],
        "tokens_seen": log["tokens_seen"],
        "epochs": log["tokens_seen"] / num_train_tokens,
        "train_minutes": log["elapsed_s"] / 60,
        "tokens_per_s": log["tokens_seen"] / max(log["elapsed_s"], 1e-9),
        "peak_tokens_per_s": max((r["tokens_per_s"] for r in train_records), default=0.0),
        "final_train_loss": log["records"][-1]["train_loss"] if log["records"] else None,
        "kept_step": log.get("best", {}).get("step", log["step"]),
        "heldout_perplexity": None,  # filled after evaluation
        "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else 0.0,
    }


def main() -> None:
    """CLI entry point: train, export, evaluate, write logs."""
    args = _parse_args()
    model_cfg, tc = PRESETS[args.preset]
    model_cfg, tc = _overrides(args, model_cfg), _overrides(args, tc)
    assert isinstance(model_cfg, MoeConfig) and isinstance(tc, TrainConfig)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the few fp32 matmuls
    torch.manual_seed(tc.seed)
    _StopFlag.install()
    tokenizer, train_ids, heldout_ids = load_corpus(args.corpus, model_cfg.vocab_size)
    eos_id = eos_token_id(tokenizer)
    valid_ids, test_ids = split_heldout(heldout_ids.to(device), eos_id)
    train_ids = train_ids.to(device)
    args.out.mkdir(parents=True, exist_ok=True)
    model = MoeForCausalLM(model_cfg)
    model.init_weights(seed=tc.seed)
    model.to(device)
    # CPU: the loop (torch's CPU grouped GEMM is a slow fallback); CUDA: grouped if it works.
    backend = "grouped" if device.type == "cuda" and grouped_mm_works(device) else "loop"
    model.set_expert_backend(backend)
    print(
        f"preset {args.preset}: {model_cfg.num_params / 1e6:.2f}M params, experts via {backend}, "
        f"{train_ids.numel()} train tokens, device {device}",
        flush=True,
    )
    save_state = not args.no_save_state
    log = train_model(model, tc, train_ids, valid_ids, args.out, save_state, args.steps_this_run)
    start = time.perf_counter()
    checkpoint_bytes = save_hf_checkpoint(
        model, tokenizer, args.out / "model", router_aux_loss_coef=tc.aux_loss_coef
    )
    print(f"saved {checkpoint_bytes / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s")
    summary = _summary(args, model_cfg, log, backend, checkpoint_bytes, train_ids.numel())
    result = {
        "summary": summary,
        "model_config": dataclasses.asdict(model_cfg),
        "train_config": dataclasses.asdict(tc),
        "records": log["records"],
    }
    log_path = args.out / "train_log.json"
    log_path.write_text(json.dumps(result, indent=1) + "\n")  # kept if evaluation fails
    start = time.perf_counter()
    evaluation = evaluate_model(model, tokenizer, eos_id, test_ids, tc.seq_len, args.out)
    print(f"evaluated in {time.perf_counter() - start:.1f} s", flush=True)
    summary["heldout_perplexity"] = evaluation["heldout_perplexity"]
    log_path.write_text(json.dumps(result, indent=1) + "\n")
    for sample in evaluation["samples"]:
        print(f"--- {sample['prompt']!r} -> {sample['sampled']!r}", flush=True)
    print("summary " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
