"""Build a model from a tensor source: dense weights to the device, experts to an expert store.

The model is built on the meta device and materialized once, in the serving dtype; every
load ends by checking that no tensor was missing and none was left unused. Dense linears of an
AWQ/GPTQ checkpoint (`...qweight`) are dequantized to the serving dtype here; its experts load
as int4 (quant/loading.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from duoserve.config import ModelConfig
from duoserve.layers.rotary import inv_frequencies
from duoserve.models.moe_lm import MoELM
from duoserve.quant.loading import read_dense_weight
from duoserve.weights.checkpoint import CheckpointError, check_tensor
from duoserve.weights.mapping import dense_param_table, expert_tensor_names, fused_expert_names


def build_dense_model(cfg: ModelConfig, source, device: torch.device, dtype: torch.dtype) -> MoELM:
    """MoELM with every non-expert weight read from `source` (experts come separately)."""
    with torch.device("meta"):
        model = MoELM(cfg)
    model = model.to(dtype).to_empty(device=device)
    model.inv_freq = inv_frequencies(cfg.rope, cfg.head_dim).to(device)
    table = dense_param_table(cfg)
    params = dict(model.named_parameters())
    assert set(params) == set(table), (
        f"mapping table and model disagree: {set(params) ^ set(table)}"
    )
    with torch.no_grad():
        for ours, (disk_name, shape) in table.items():
            params[ours].copy_(read_dense_weight(source, disk_name, shape, cfg))
    model.eval().requires_grad_(False)
    return model


def iter_expert_weights(
    cfg: ModelConfig, source, layer_id: int, device: str | torch.device = "cpu"
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (expert_id, gate [I, H], up [I, H], down [H, I]) of one MoE layer, one at a time."""
    H, I, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    fused_gate_up, fused_down = fused_expert_names(cfg, layer_id)
    per_expert_first = expert_tensor_names(cfg, layer_id, 0)[0]
    if per_expert_first not in source and fused_gate_up in source:
        gate_up = source.get(fused_gate_up, (E, 2 * I, H), device)  # [E, 2I, H]
        down = source.get(fused_down, (E, H, I), device)  # [E, H, I]
        for e in range(E):
            yield e, gate_up[e, :I], gate_up[e, I:], down[e]
        return
    for e in range(E):
        gate_name, up_name, down_name = expert_tensor_names(cfg, layer_id, e)
        yield (
            e,
            source.get(gate_name, (I, H), device),
            source.get(up_name, (I, H), device),
            source.get(down_name, (H, I), device),
        )


def pack_expert(
    dest: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> None:
    """Write one expert into its packed buffer [3*I*H]: gate rows, up rows, down rows."""
    n = gate.numel()
    dest[:n].copy_(gate.reshape(-1))
    dest[n : 2 * n].copy_(up.reshape(-1))
    dest[2 * n :].copy_(down.reshape(-1))


def check_all_used(source) -> None:
    """End of load: every tensor of the checkpoint must have been consumed."""
    unused = source.unused()
    if unused:
        shown = ", ".join(unused[:8]) + (f" (+{len(unused) - 8} more)" if len(unused) > 8 else "")
        raise CheckpointError(
            f"checkpoint has {len(unused)} tensors the model does not use: {shown}"
        )


__all__ = [
    "build_dense_model",
    "check_all_used",
    "check_tensor",
    "iter_expert_weights",
    "pack_expert",
]
