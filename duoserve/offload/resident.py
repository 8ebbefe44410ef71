"""`full-gpu` expert backend: every expert resident on the device (the upper bound).

Also home of the per-expert compute shared by all backends: `compute_expert_rows` runs one
expert in the serving dtype or, given an int4 layout, through quant.triton_kernels
(fused dequant GEMV / small GEMM up to 16 tokens, dequant to a scratch + matmul above).
"""

from __future__ import annotations

import torch

from duoserve.config import ModelConfig
from duoserve.layers.moe import (
    RoutingPlan,
    expert_mlp,
    grouped_expert_mlp,
    grouped_mm_supported,
)
from duoserve.quant.int4 import Int4ExpertLayout
from duoserve.quant.loading import load_int4_layer
from duoserve.quant.triton_kernels import (
    STREAM_MAX_TOKENS,
    expert_forward_int4,
    experts_forward_int4_grouped,
    prefill_scratch_numel,
)
from duoserve.weights.loader import iter_expert_weights, pack_expert

GROUPED_INT4_DECODE = True  # int4 decode experts through the grouped launches (False: one by one)


def compute_expert_rows(
    x: torch.Tensor,
    plan: RoutingPlan,
    j: int,
    weights: torch.Tensor,
    inter: int,
    out_rows: torch.Tensor,
    layout: Int4ExpertLayout | None = None,
    scratch: torch.Tensor | None = None,
) -> None:
    """Run the plan's j-th expert (packed `weights`, or an int4 buffer when `layout` is given)
    on its tokens into its sorted output rows; `scratch` is the int4 prefill dequant buffer."""
    offsets = plan.row_offsets
    lo, hi = offsets[j], offsets[j + 1]
    x_rows = x[plan.token_rows_dev[lo:hi]]  # [n, H]
    if layout is None:
        out_rows[lo:hi] = expert_mlp(x_rows, weights, inter)
    elif GROUPED_INT4_DECODE and hi - lo <= STREAM_MAX_TOKENS:  # the grouped path's configs
        experts_forward_int4_grouped(x_rows, [(0, hi - lo)], [weights], layout, out_rows[lo:hi])
    else:
        out_rows[lo:hi] = expert_forward_int4(x_rows, weights, layout, scratch=scratch)


def compute_experts_rows(
    x: torch.Tensor,
    plan: RoutingPlan,
    js: list[int],
    buffers: list[torch.Tensor],
    inter: int,
    out_rows: torch.Tensor,
    layout: Int4ExpertLayout | None = None,
    scratch: torch.Tensor | None = None,
) -> None:
    """compute_expert_rows for the plan's experts js (buffers[i] holds expert js[i]); int4
    experts of at most STREAM_MAX_TOKENS tokens each run in grouped launches, whose values
    do not depend on which experts share one (experts_forward_int4_grouped)."""
    offsets = plan.row_offsets
    spans = [(offsets[j], offsets[j + 1] - offsets[j]) for j in js]
    grouped = (
        GROUPED_INT4_DECODE
        and layout is not None
        and len(js) > 1
        and max(n for _, n in spans) <= STREAM_MAX_TOKENS
    )
    if not grouped:
        for j, w in zip(js, buffers):
            compute_expert_rows(x, plan, j, w, inter, out_rows, layout, scratch)
        return
    x_rows = x[plan.token_rows_dev]  # [T*K, H], sorted by expert
    experts_forward_int4_grouped(x_rows, spans, buffers, layout, out_rows)


def make_dequant_scratch(
    layout: Int4ExpertLayout | None, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """The prefill dequant scratch of int4 experts (CUDA only: the CPU path needs none)."""
    if layout is None or device.type != "cuda":
        return None
    return torch.empty(prefill_scratch_numel(layout), dtype=dtype, device=device)


class ResidentExperts:
    """All experts of all MoE layers in one device tensor [L_moe, E, 3*I*H]
    (int4: uint8 [L_moe, E, layout.num_bytes])."""

    name = "full-gpu"

    def __init__(
        self,
        cfg: ModelConfig,
        device: torch.device,
        dtype: torch.dtype,
        layout: Int4ExpertLayout | None = None,
    ) -> None:
        self.cfg = cfg
        self.layout = layout
        self.layer_index = {layer_id: i for i, layer_id in enumerate(cfg.moe_layer_ids)}
        slot_numel = cfg.expert_numel if layout is None else layout.num_bytes
        slot_dtype = dtype if layout is None else torch.uint8
        self.weights = torch.empty(
            cfg.num_moe_layers, cfg.num_experts, slot_numel, dtype=slot_dtype, device=device
        )
        self.grouped = layout is None and grouped_mm_supported(
            cfg.hidden_size, cfg.moe_intermediate_size, dtype, device
        )
        self.scratch = make_dequant_scratch(layout, dtype, device)

    @property
    def needs_host_plan(self) -> bool:
        return not self.grouped  # the grouped GEMM needs no host sync at all

    @staticmethod
    def num_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return cfg.num_moe_layers * cfg.num_experts * cfg.expert_numel * elem

    def load(self, source, staging_device: str | torch.device = "cpu") -> None:
        """Copy (int4: quantize or convert) every expert from `source` into its slot."""
        with torch.no_grad():
            for layer_id, i in self.layer_index.items():
                if self.layout is not None:
                    load_int4_layer(
                        self.cfg, source, layer_id, self.layout, self.weights[i], staging_device
                    )
                    continue
                for e, gate, up, down in iter_expert_weights(
                    self.cfg, source, layer_id, staging_device
                ):
                    pack_expert(self.weights[i, e], gate, up, down)

    def load_from_store(self, store) -> None:
        """Copy every packed expert from a host store (one copy per layer)."""
        assert store.layout == self.layout, "host store and backend disagree on the expert format"
        for layer_id, i in self.layer_index.items():
            self.weights[i].copy_(store.blocks[store.layer_index[layer_id]])

    def stats(self) -> dict[str, float]:
        return {"hits": 0, "misses": 0, "hit_rate": 1.0, "bytes_copied": 0}

    def compute(self, x: torch.Tensor, plan: RoutingPlan, out_rows: torch.Tensor) -> None:
        layer = self.weights[self.layer_index[plan.layer_id]]  # [E, slot numel]
        inter = self.cfg.moe_intermediate_size
        if self.grouped:
            out_rows[:] = grouped_expert_mlp(
                x[plan.token_rows_dev], layer, plan.expert_of_row_dev, inter
            )
            return
        ids = plan.expert_ids
        buffers = [layer[e] for e in ids]
        js = list(range(len(ids)))
        compute_experts_rows(x, plan, js, buffers, inter, out_rows, self.layout, self.scratch)
