"""Record routing from a loaded engine: a hook on every MoE block, one record per step.

    with RoutingTracer(engine.model, lookahead=4) as tracer:
        ... run the engine ...
        rows = tracer.drain()  # dict of ROW_FIELDS + LOOKAHEAD_FIELDS tensors (trace.py)

The hook returns the router's choice unchanged; it only copies it (and the lookahead gate
signal: router l+d applied to layer l's MoE input) and, at the last MoE layer of a step,
moves the step to the host in one transfer. `trace_prompts` drives an engine over a prompts
file and writes a trace folder in chunks.
"""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from duoserve.engine.context import get_step_context
from duoserve.layers.sampler import SamplingParams
from duoserve.models.moe_lm import MoELM
from duoserve.predictor.trace import TraceWriter


class RoutingTracer:
    """Installs `routing_hook`s on a model's MoE blocks and records every routed token.

    `seq_id_of_slot` maps a KV slot (StepContext.slot_ids) to the id of the sequence in it
    (default: the slot itself). Steps must run every MoE layer in order (one forward each).
    """

    def __init__(
        self,
        model: MoELM,
        lookahead: int = 4,
        lookahead_width: int | None = None,
        seq_id_of_slot: Callable[[int], int] | None = None,
    ) -> None:
        self.blocks = model.moe_blocks()
        assert self.blocks, "the model has no MoE blocks"
        self.moe_index = {b.layer_id: i for i, b in enumerate(self.blocks)}
        self.num_experts, self.top_k = self.blocks[0].num_experts, self.blocks[0].top_k
        self.lookahead = lookahead
        self.lookahead_width = min(lookahead_width or 2 * self.top_k, self.num_experts)
        self.seq_id_of_slot = seq_id_of_slot or (lambda slot: slot)
        self.num_steps = 0
        self._step: dict[str, Any] | None = None
        self._done: list[dict[str, torch.Tensor]] = []

    def __enter__(self) -> RoutingTracer:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def install(self) -> None:
        for block in self.blocks:
            assert block.routing_hook is None, f"layer {block.layer_id} already has a hook"
            block.routing_hook = self._hook

    def remove(self) -> None:
        for block in self.blocks:
            if block.routing_hook == self._hook:
                block.routing_hook = None
        self._step = None

    def drain(self) -> dict[str, torch.Tensor] | None:
        """All rows recorded since the last drain, concatenated (None if there are none)."""
        if not self._done:
            return None
        rows = {k: torch.cat([d[k] for d in self._done]) for k in self._done[0]}
        self._done = []
        return rows

    def _begin_step(self) -> None:
        ctx = get_step_context()
        seq_ids, positions = [], []
        for slot, start, n in zip(ctx.slot_ids, ctx.start_positions, ctx.num_new_tokens):
            seq_ids += [self.seq_id_of_slot(slot)] * n
            positions += range(start, start + n)
        self._step = {
            "is_prefill": ctx.phase == "prefill",
            "seq_id": torch.tensor(seq_ids, dtype=torch.int32),
            "position": torch.tensor(positions, dtype=torch.int32),
            "ids": [],
            "weights": [],
            "ahead_ids": [],
            "ahead_probs": [],
        }

    def _gate_lookahead(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-M ids [T, D, M] and probs of routers layer+1..layer+D on x [T, H]; -1 past L."""
        # T tokens, D distances, M lookahead width
        T, D, M = x.shape[0], self.lookahead, self.lookahead_width
        ids = torch.full((T, D, M), -1, dtype=torch.int16, device=x.device)
        probs = torch.zeros((T, D, M), dtype=torch.float16, device=x.device)
        for d in range(1, D + 1):
            if layer + d >= len(self.blocks):
                break
            p = F.softmax(self.blocks[layer + d].router(x).float(), dim=-1)  # [T, E]
            top = p.topk(M, dim=-1)
            ids[:, d - 1] = top.indices.to(torch.int16)
            probs[:, d - 1] = top.values.to(torch.float16)
        return ids, probs

    def _hook(
        self, layer_id: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # T tokens, K top-k, H hidden
        layer = self.moe_index[layer_id]
        if layer == 0:
            self._begin_step()
        step = self._step
        assert step is not None and len(step["ids"]) == layer, "MoE layers ran out of order"
        step["ids"].append(topk_ids.to(torch.int16))  # [T, K]
        step["weights"].append(topk_weights.to(torch.float16))
        if self.lookahead:
            ahead_ids, ahead_probs = self._gate_lookahead(layer, x)
            step["ahead_ids"].append(ahead_ids)
            step["ahead_probs"].append(ahead_probs)
        if layer == len(self.blocks) - 1:
            self._end_step()
        return topk_ids, topk_weights

    def _end_step(self) -> None:
        step, self._step = self._step, None
        assert step is not None
        T = step["seq_id"].numel()
        rows = {
            "expert_ids": torch.stack(step["ids"], dim=1).cpu(),  # [T, L, K]: the host copy
            "weights": torch.stack(step["weights"], dim=1).cpu(),
            "is_prefill": torch.full((T,), int(step["is_prefill"]), dtype=torch.uint8),
            "seq_id": step["seq_id"],
            "position": step["position"],
            "step": torch.full((T,), self.num_steps, dtype=torch.int32),
        }
        if self.lookahead:
            rows["lookahead_ids"] = torch.stack(step["ahead_ids"], dim=1).cpu()  # [T, L, D, M]
            rows["lookahead_probs"] = torch.stack(step["ahead_probs"], dim=1).cpu()
        self._done.append(rows)
        self.num_steps += 1


def split_passages(text: str, max_chars: int) -> list[str]:
    """Cut text at blank lines into passages of about max_chars (long paragraphs stay whole)."""
    passages, current = [], ""
    for para in text.split("\n\n"):
        if current and len(current) + len(para) + 2 > max_chars:
            passages.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current.strip():
        passages.append(current)
    return passages


def read_prompts(
    path: str | Path,
    max_prompts: int | None = None,
    passage_chars: int | None = None,
    every: int = 1,
) -> list[str]:
    """Prompts from text lines, or JSONL with "prompt" (or "text") per line; .gz allowed.

    passage_chars: cut each text into passages of about that many characters (one prompt
    each); every: keep every n-th prompt (a spread-out sample of a large file).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    prompts: list[str] = []
    with opener(path, "rt", encoding="utf-8") as f:
        for num, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{num}: malformed JSON ({exc})") from exc
                line = record.get("prompt", record.get("text"))
                if not isinstance(line, str):
                    raise ValueError(f'{path}:{num}: a JSON line needs a "prompt" string')
            prompts += split_passages(line, passage_chars) if passage_chars else [line]
    prompts = prompts[::every][:max_prompts]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def _engine_meta(engine: Any) -> dict[str, Any]:
    """Model, topology, device and dtype of an LLMEngine, for meta.json."""
    cfg = engine.model_config
    return {
        "model": engine.model_name,
        "topology": {
            "family": cfg.family,
            "num_layers": cfg.num_moe_layers,
            "moe_layer_ids": list(cfg.moe_layer_ids),
            "num_experts": cfg.num_experts,
            "top_k": cfg.num_experts_per_tok,
        },
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
    }


def trace_prompts(
    engine: Any,
    prompts: list[str],
    out_dir: str | Path,
    max_tokens: int = 64,
    max_prompt_tokens: int = 512,
    temperature: float = 0.7,
    seed: int = 0,
    lookahead: int = 4,
    lookahead_width: int | None = None,
    chunk_tokens: int = 65536,
    extra_meta: dict[str, Any] | None = None,
    max_seconds: float | None = None,
) -> Path:
    """Generate for every prompt on `engine` (an LLMEngine) and write a trace folder.

    Prompts are cut to `max_prompt_tokens` (and to the context); sequence id = prompt index.
    CUDA graphs are off while tracing (a hook that copies to the host cannot be captured).
    `max_seconds`: stop stepping after that long and write what was recorded (sequences
    then end early; meta.json says "stopped_early"); the engine keeps the unfinished ones.
    """
    ids = [engine.tokenizer.encode(p)[:max_prompt_tokens] for p in prompts]
    ids = [p[: engine.max_model_len - max_tokens] for p in ids]
    settings = {"max_tokens": max_tokens, "max_prompt_tokens": max_prompt_tokens}
    settings |= {"temperature": temperature, "num_prompts": len(prompts)}
    meta = {**_engine_meta(engine), **settings, **(extra_meta or {})}
    running = engine.scheduler.running
    seq_of_slot = lambda slot: next(int(r.request_id) for r in running if r.slot == slot)  # noqa: E731
    tracer = RoutingTracer(engine.model, lookahead, lookahead_width, seq_of_slot)
    meta["lookahead"] = {"distances": lookahead, "width": tracer.lookahead_width}
    writer = TraceWriter(out_dir, meta, chunk_tokens)
    for i, prompt_ids in enumerate(ids):
        if not prompt_ids:
            continue  # a prompt that encodes to nothing (sequence ids stay prompt indices)
        params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed + i)
        engine.add_request(prompt_ids, params, request_id=str(i))
    engine.runner.enable_cuda_graphs(False)
    total = sum(len(p) for p in ids) + max_tokens * len(ids)  # at most (eos may stop early)
    t0 = time.perf_counter()
    try:
        with tracer, tqdm(total=total, unit="tok", desc="trace", mininterval=5) as bar:
            while engine.has_unfinished_requests():
                if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                    writer.meta["stopped_early"] = f"after {max_seconds} s"
                    break
                engine.step()
                rows = tracer.drain()
                if rows is not None:
                    writer.add(rows)
                    bar.update(rows["expert_ids"].shape[0])
    finally:
        engine.runner.enable_cuda_graphs(not engine.config.enforce_eager)
    return writer.close()
