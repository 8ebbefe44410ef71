"""Model runner: turns a scheduled batch into flat device inputs, runs the model, samples."""

from __future__ import annotations

import torch

from duoserve.engine.context import build_step_context, step_context
from duoserve.engine.cuda_graphs import GraphedDecode, SegmentedDecode
from duoserve.engine.kv_cache import KVCache
from duoserve.engine.scheduler import ScheduledBatch
from duoserve.layers.sampler import sample
from duoserve.models.moe_lm import MoELM


class ModelRunner:
    """Owns the model and the KV cache; runs one step at a time."""

    def __init__(self, model: MoELM, kv: KVCache, device: torch.device) -> None:
        self.model = model
        self.kv = kv
        self.device = device
        self.last_stats: dict[str, float] = {}
        self.graphs: GraphedDecode | SegmentedDecode | None = None

    def enable_cuda_graphs(self, enabled: bool) -> None:
        """Use captured decode graphs when the expert backend allows (see cuda_graphs.py):
        one per step without host syncs, else segments between the routing syncs."""
        self.graphs = None
        if enabled:
            for kind in (GraphedDecode, SegmentedDecode):
                if kind.supported(self.model, self.device):
                    self.graphs = kind(self.model, self.kv, self.device)
                    break

    @torch.inference_mode()
    def forward(
        self,
        phase: str,
        token_ids: list[list[int]],
        slots: list[int],
        starts: list[int],
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Run new tokens of several sequences; logits [B, V] of each last token, or [T, V] all."""
        counts = [len(t) for t in token_ids]
        for slot, s, n in zip(slots, starts, counts):
            assert s + n <= self.kv.max_len, f"slot {slot}: {s + n} tokens exceed the KV cache"
        if self.graphs is not None and phase == "decode" and not all_logits:
            logits = self.graphs.run([t[0] for t in token_ids], slots, starts)
            self.last_stats = getattr(self.graphs, "last_stats", {})
            return logits
        ctx = build_step_context(phase, slots, starts, counts, self.device)
        input_ids = torch.tensor(
            [t for ts in token_ids for t in ts], dtype=torch.long, device=self.device
        )
        rows = None
        if not all_logits:
            rows = torch.tensor(ctx.token_offsets[1:], device=self.device) - 1  # last of each
        with step_context(ctx):
            logits = self.model(input_ids, ctx.positions_dev, self.kv, rows)
        self.last_stats = ctx.stats
        return logits

    def run(self, batch: ScheduledBatch) -> list[int | None]:
        """Compute the batch; a sampled token for each request whose prompt is now complete."""
        reqs = batch.requests
        token_ids = [
            r.token_ids(r.num_computed_tokens, r.num_computed_tokens + n)
            for r, n in zip(reqs, batch.num_new_tokens)
        ]
        logits = self.forward(
            batch.phase, token_ids, [r.slot for r in reqs], [r.num_computed_tokens for r in reqs]
        )
        needs_token = [
            r.num_computed_tokens + n >= r.num_tokens for r, n in zip(reqs, batch.num_new_tokens)
        ]
        picked_rows = [i for i, need in enumerate(needs_token) if need]
        result: list[int | None] = [None] * len(reqs)
        if picked_rows:
            tokens = sample(
                logits[picked_rows],
                [reqs[i].sampling_params for i in picked_rows],
                [reqs[i].generator for i in picked_rows],
            )
            for i, tok in zip(picked_rows, tokens):
                result[i] = tok
        return result
