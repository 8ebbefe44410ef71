"""Trace replay: force a model's routing from a recorded trace of a trained model.

A full-size synthetic model has random weights, so its own routing is unrealistic. For
benchmarks, each MoE layer's top-k is replaced by the experts that the trained model of the
same topology (layers x experts x top-k) chose for a real held-out token: token at position
p of the sequence in KV slot s uses trace token (base[s] + p) mod N. Routing weights become
1/K (the trace stores ids only). Every result produced this way must say so: `describe()`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from duoserve.engine.context import get_step_context


class TraceReplay:
    """Routing hook that replays `expert_ids [L, N, K]` from a safetensors trace."""

    graph_safe = True  # device-side indexing only: may be captured in a decode graph

    def __init__(self, path: str | Path, device: torch.device, window: int = 512) -> None:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            ids = f.get_tensor("expert_ids")
        assert ids.dim() == 3, f"{path}: expert_ids must be [layers, tokens, k]"
        self.path = Path(path)
        self.num_layers, self.num_tokens, self.top_k = ids.shape
        self.expert_ids = ids.to(device=device, dtype=torch.long)  # [L, N, K]
        self.num_experts = int(ids.max()) + 1
        self.window = window
        self.base_of_slot = torch.zeros(0, dtype=torch.long, device=device)

    def describe(self) -> str:
        return (
            f"routing replayed from {self.path.name} ({self.num_layers} layers x top-"
            f"{self.top_k}, {self.num_tokens} tokens), weights 1/K"
        )

    def attach(self, engine) -> None:
        """Install on every MoE block of `engine`, checking the topology matches."""
        cfg = engine.model_config
        if (cfg.num_moe_layers, cfg.num_experts_per_tok) != (self.num_layers, self.top_k):
            raise ValueError(
                f"{self.path}: trace topology {self.num_layers} layers x top-{self.top_k} "
                f"does not match the model's {cfg.num_moe_layers} x top-{cfg.num_experts_per_tok}"
            )
        if self.num_experts > cfg.num_experts:
            raise ValueError(f"{self.path}: trace uses expert {self.num_experts - 1} >= E")
        num_slots = engine.kv.num_slots + 1
        bases = [(s * self.window) % self.num_tokens for s in range(num_slots)]
        self.base_of_slot = torch.tensor(bases, dtype=torch.long, device=self.expert_ids.device)
        self.layer_index = {layer_id: i for i, layer_id in enumerate(cfg.moe_layer_ids)}
        for block in engine.model.moe_blocks():
            block.routing_hook = self
        engine.runner.enable_cuda_graphs(not engine.config.enforce_eager)  # recapture with it

    def __call__(self, layer_id: int, x: torch.Tensor, topk_ids, topk_weights):
        ctx = get_step_context()
        idx = (self.base_of_slot[ctx.token_slots_dev] + ctx.positions_dev) % self.num_tokens
        ids = self.expert_ids[self.layer_index[layer_id], idx]  # [T, K]
        weights = torch.full_like(topk_weights, 1.0 / self.top_k)
        return ids, weights
