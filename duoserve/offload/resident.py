"""`full-gpu` expert backend: every expert resident on the device (the upper bound)."""

from __future__ import annotations

import torch

from duoserve.config import ModelConfig
from duoserve.layers.moe import (
    RoutingPlan,
    expert_mlp,
    grouped_expert_mlp,
    grouped_mm_supported,
)
from duoserve.weights.loader import iter_expert_weights, pack_expert


def compute_expert_rows(
    x: torch.Tensor,
    plan: RoutingPlan,
    j: int,
    weights: torch.Tensor,
    inter: int,
    out_rows: torch.Tensor,
) -> None:
    """Run the plan's j-th expert (packed `weights`) on its tokens into its sorted output rows."""
    offsets = plan.row_offsets
    lo, hi = offsets[j], offsets[j + 1]
    out_rows[lo:hi] = expert_mlp(x[plan.token_rows_dev[lo:hi]], weights, inter)


class ResidentExperts:
    """All experts of all MoE layers in one device tensor [L_moe, E, 3*I*H]."""

    name = "full-gpu"

    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.cfg = cfg
        self.layer_index = {layer_id: i for i, layer_id in enumerate(cfg.moe_layer_ids)}
        self.weights = torch.empty(
            cfg.num_moe_layers, cfg.num_experts, cfg.expert_numel, dtype=dtype, device=device
        )
        self.grouped = grouped_mm_supported(
            cfg.hidden_size, cfg.moe_intermediate_size, dtype, device
        )

    @property
    def needs_host_plan(self) -> bool:
        return not self.grouped  # the grouped GEMM needs no host sync at all

    @staticmethod
    def num_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return cfg.num_moe_layers * cfg.num_experts * cfg.expert_numel * elem

    def load(self, source, staging_device: str | torch.device = "cpu") -> None:
        """Copy every expert from `source` into its packed slot."""
        with torch.no_grad():
            for layer_id, i in self.layer_index.items():
                for e, gate, up, down in iter_expert_weights(
                    self.cfg, source, layer_id, staging_device
                ):
                    pack_expert(self.weights[i, e], gate, up, down)

    def load_from_store(self, store) -> None:
        """Copy every packed expert from a host store (one copy per layer)."""
        for layer_id, i in self.layer_index.items():
            self.weights[i].copy_(store.blocks[store.layer_index[layer_id]])

    def stats(self) -> dict[str, float]:
        return {"hits": 0, "misses": 0, "hit_rate": 1.0, "bytes_copied": 0}

    def compute(self, x: torch.Tensor, plan: RoutingPlan, out_rows: torch.Tensor) -> None:
        layer = self.weights[self.layer_index[plan.layer_id]]  # [E, 3*I*H]
        inter = self.cfg.moe_intermediate_size
        if self.grouped:
            out_rows[:] = grouped_expert_mlp(
                x[plan.token_rows_dev], layer, plan.expert_of_row_dev, inter
            )
            return
        for j, e in enumerate(plan.expert_ids):
            compute_expert_rows(x, plan, j, layer[e], inter, out_rows)
