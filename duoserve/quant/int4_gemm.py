"""Launchers of the fused W4A16 prefill GEMM (`w4a16`, quant/_int4_prefill_triton.py).

x is permuted once per expert: x' [T, 4, K/4] with x'[t, j, e] = x[t, 4e + j], plus the group
sums xs [T, G] fp32; the gate/up kernel writes the activation straight into the down kernel's
x' layout, so an expert is: prep (two small torch ops), gate/up + silu, group sums of the
activation, down. Needs a group of >= 64 inputs (one tensor-core K step of 16 per nibble plane).
"""

from __future__ import annotations

import torch

from duoserve.quant.int4 import Int4ExpertLayout
from duoserve.quant.triton_kernels import KernelConfig, _interpreting, _permuted_input

MIN_GROUP = 64  # GROUP / 4 int16 elements per group must be >= 16 (the MMA K step)
# "w4a16": weights are the MMA's A operand (registers); "w4a16_b": the B operand (shared)
W4A16_KERNELS = ("w4a16", "w4a16_b")


def supports(group_size: int) -> bool:
    """True when the fused GEMM can take this group size."""
    return group_size >= MIN_GROUP


def permute_x(x: torch.Tensor) -> torch.Tensor:
    """x [T, K] -> x' [T, 4, K/4] with x'[t, j, e] = x[t, 4e + j] (contiguous)."""
    t, k = x.shape
    return x.view(t, k // 4, 4).transpose(1, 2).contiguous()


def group_sums(xp: torch.Tensor, group_size: int) -> torch.Tensor:
    """x' [T, 4, K/4] -> fp32 [T, G]: the sum of x over each group of `group_size` inputs."""
    t, _, ke = xp.shape
    eg = group_size // 4
    return xp.view(t, 4, ke // eg, eg).float().sum(dim=(1, 3))


def _kernels():
    from duoserve.quant import _int4_prefill_triton, _int4_triton, triton_kernels

    triton_kernels._kernels()  # reloads _int4_triton when the interpreter mode changed
    if _int4_prefill_triton._round is not _int4_triton._round:
        import importlib

        importlib.reload(_int4_prefill_triton)
    return _int4_prefill_triton


def launch_w4a16(cfg: KernelConfig, xp, xs, w, group_size, y, fused: bool, permute_out: bool):
    """y = x @ W^T (fused: silu(gate) * up) from x' and xs; y [T, N out] or, with
    permute_out, the next GEMM's x' [T, 4, N out / 4]."""
    assert supports(group_size), f"w4a16 needs group >= {MIN_GROUP}, got {group_size}"
    assert cfg.kernel in W4A16_KERNELS, f"not a w4a16 config: {cfg}"
    qweight, scales, zeros = w
    t, n_rows, k = xp.shape[0], qweight.shape[0], qweight.shape[1] * 8
    assert xp.shape == (t, 4, k // 4) and xp.is_contiguous(), f"x' {tuple(xp.shape)} vs K={k}"
    assert xs.shape == (t, k // group_size) and xs.dtype == torch.float32, "xs: fp32 [T, G]"
    n_out = n_rows // 2 if fused else n_rows
    if permute_out:
        assert y.shape == (t, 4, n_out // 4) and y.is_contiguous(), "y: the next GEMM's x'"
        stride_yt, stride_yj = y.stride(0), y.stride(1)
    else:
        assert y.shape == (t, n_out) and y.stride(1) == 1, "y: [T, N]"
        stride_yt, stride_yj = y.stride(0), 0
    z = zeros if zeros is not None else scales  # never read when HAS_ZEROS is False
    grid = (-(-n_out // cfg.block_n) * -(-t // cfg.block_t),)
    _kernels().w4a16[grid](
        xp, xs.contiguous(), qweight.view(torch.int16), scales, z, y, t, n_out,
        k // group_size, n_out, xp.stride(0), xp.stride(1), xs.stride(0),
        qweight.stride(0) * 2, scales.stride(0), stride_yt, stride_yj,
        HAS_ZEROS=zeros is not None, FUSED=fused, PERMUTE_OUT=permute_out, GROUP=group_size,
        BN=cfg.block_n, BM=cfg.block_t, SWAP=cfg.kernel == "w4a16", DOT_FP32=_interpreting(),
        NS=cfg.num_stages, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def w4a16_matmul(cfg: KernelConfig, x, w, group_size, y, fused: bool) -> None:
    """One matrix through the fused GEMM (the sweep's entry): x [T, K] -> y [T, N out]."""
    xp = permute_x(x)
    launch_w4a16(cfg, xp, group_sums(xp, group_size), w, group_size, y, fused, False)


def expert_forward_w4a16(
    x: torch.Tensor,
    buffer: torch.Tensor,
    layout: Int4ExpertLayout,
    cfg_gate_up: KernelConfig,
    cfg_down: KernelConfig,
) -> torch.Tensor:
    """down(silu(gate x) * up x) [T, H] of one int4 expert through the fused GEMM; the
    activation is rounded to x's dtype between the two GEMMs, as the reference does."""
    # T tokens, H hidden, I intermediate, g group
    g, i = layout.group_size, layout.intermediate_size
    xp = permute_x(_permuted_input(x, buffer, layout))  # [T, 4, H/4]
    act = torch.empty(x.shape[0], 4, i // 4, dtype=x.dtype, device=x.device)  # x' of down
    gate_up = layout.gate_up_views(buffer)
    launch_w4a16(cfg_gate_up, xp, group_sums(xp, g), gate_up, g, act, True, True)
    y = torch.empty(x.shape[0], layout.hidden_size, dtype=x.dtype, device=x.device)
    launch_w4a16(cfg_down, act, group_sums(act, g), layout.down_views(buffer), g, y, False, False)
    return y
