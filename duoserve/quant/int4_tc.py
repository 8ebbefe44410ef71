"""Launchers of the tensor-core int4 kernel (kinds "tc" and "tc_s", quant/_int4_tc_triton.py).

x is permuted once per expert, plane-major within each group g of `group` inputs:
x'[t, group g + (group / 8) j + w] = x[t, group g + 8 w + j]; the gate/up launch writes the
activation straight into the down launch's x' layout, so an expert is one
permute and two launches. "tc" applies the scale to each group's fp32 accumulator (exact fp32
weights, any scale dtype); "tc_s" folds bf16 scales into the bf16 weights, bit for bit those of
`dequantize_int4` (a decode tile is BT = 16 tokens; a prefill tile 64..128).
"""

from __future__ import annotations

import torch

from duoserve.quant.int4 import Int4ExpertLayout
from duoserve.quant.triton_kernels import (
    KernelConfig,
    _interpreting,
    _kernels,
    _num_sms,
    _permuted_input,
    _split_scratch,
)

MIN_GROUP = 128  # one group must hold >= 16 words: one MMA K step per nibble plane
TC_KERNELS = ("tc", "tc_s")


def supports(group_size: int, scale_dtype: torch.dtype, kernel: str = "tc") -> bool:
    """True when `kernel` can take this group size and scale dtype."""
    ok = group_size >= MIN_GROUP and group_size & (group_size - 1) == 0
    return ok and (kernel == "tc" or scale_dtype == torch.bfloat16)


def permute_x(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [T, K] -> x' [T, K], plane-major in each group (see the module docstring)."""
    t, k = x.shape
    g = group_size
    return x.view(t, k // g, g // 8, 8).transpose(2, 3).reshape(t, k)


def _module():
    from duoserve.quant import _int4_tc_triton, _int4_triton

    _kernels()  # reloads _int4_triton when the interpreter mode changed
    if _int4_tc_triton._round is not _int4_triton._round:
        import importlib

        importlib.reload(_int4_tc_triton)
    return _int4_tc_triton


def _splits(cfg: KernelConfig, num_tiles: int, num_groups: int, device) -> tuple[int, int]:
    # -> (splits, groups per split); split_k 0: about 4 programs per SM
    splits = cfg.split_k or max(1, 4 * _num_sms(device) // num_tiles)
    per_split = -(-num_groups // max(1, min(splits, num_groups)))
    return -(-num_groups // per_split), per_split


def launch_tc(cfg: KernelConfig, xp, w, group_size, y, fused: bool, permute_out: bool) -> None:
    """y = x @ W^T (fused: silu(gate) * up) from x' [T, K]; y [T, N out], with permute_out
    in the next launch's x' order."""
    qweight, scales, zeros = w
    assert cfg.kernel in TC_KERNELS, f"not a tc config: {cfg}"
    assert supports(group_size, scales.dtype, cfg.kernel), (
        f"{cfg.kernel} needs a power-of-two group >= {MIN_GROUP} (got {group_size})"
        + (" and bf16 scales" if cfg.kernel == "tc_s" else "")
    )
    t, n_rows, kw = xp.shape[0], qweight.shape[0], qweight.shape[1]
    assert xp.shape == (t, 8 * kw) and xp.stride(1) == 1, f"x' {tuple(xp.shape)} vs K={8 * kw}"
    n_out = n_rows // 2 if fused else n_rows
    assert y.shape == (t, n_out) and y.stride(1) == 1, "y: [T, N out]"
    assert not permute_out or n_out % group_size == 0, "permute_out: whole groups of outputs"
    num_groups = 8 * kw // group_size
    grid_n, grid_t = -(-n_out // cfg.block_n), -(-t // cfg.block_t)
    splits, per_split = _splits(cfg, grid_n * grid_t, num_groups, y.device)
    t_pad = grid_t * cfg.block_t
    ws, cnt = _split_scratch(y.device, splits * 2 * t_pad * n_out, grid_n * grid_t)
    z = zeros if zeros is not None else scales  # never read when HAS_ZEROS is False
    _module().tc[(grid_n, grid_t, splits)](
        xp, qweight, scales, z, y, ws, cnt, t, n_out, kw, num_groups, n_out, xp.stride(0),
        y.stride(0), per_split, HAS_ZEROS=zeros is not None, FUSED=fused,
        PERMUTE_OUT=permute_out, GROUP=group_size, BN=cfg.block_n, BT=cfg.block_t,
        PRE_SCALE=cfg.kernel == "tc_s", USE_ASM=not _interpreting(), DOT_FP32=_interpreting(),
        NS=cfg.num_stages, PREFETCH=cfg.prefetch, SPLIT=splits > 1, WIDE=cfg.wide_sz,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip


def tc_matmul(cfg: KernelConfig, x, w, group_size, y, fused: bool) -> None:
    """One matrix through the tc kernel (the sweep's entry): x [T, K] -> y [T, N out]."""
    launch_tc(cfg, permute_x(x, group_size), w, group_size, y, fused, False)


def expert_forward_tc(
    x: torch.Tensor,
    buffer: torch.Tensor,
    layout: Int4ExpertLayout,
    cfg_gate_up: KernelConfig,
    cfg_down: KernelConfig,
) -> torch.Tensor:
    """down(silu(gate x) * up x) [T, H] of one int4 expert through the tc kernel; the
    activation is rounded to x's dtype between the two matrices, as the reference does."""
    # T tokens, H hidden, I intermediate, g group
    g, i = layout.group_size, layout.intermediate_size
    xp = permute_x(_permuted_input(x, buffer, layout), g)  # [T, H]
    act = torch.empty(x.shape[0], i, dtype=x.dtype, device=x.device)  # x' of down
    launch_tc(cfg_gate_up, xp, layout.gate_up_views(buffer), g, act, True, True)
    y = torch.empty(x.shape[0], layout.hidden_size, dtype=x.dtype, device=x.device)
    launch_tc(cfg_down, act, layout.down_views(buffer), g, y, False, False)
    return y
