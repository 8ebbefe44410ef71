"""Launcher of the Gluon wgmma prefill kernel (kind "wgp", quant/_int4_wgp_gluon.py).

x is permuted plane-major within each group of 128 (`int4_tc.permute_x`) and read through a TMA
descriptor of [BM, 64] blocks; the weights are dequantized in the kernel, bit for bit those of
`dequantize_int4` (bf16 scales only).
"""

from __future__ import annotations

import functools

import torch

from duoserve.quant.int4 import Int4ExpertLayout
from duoserve.quant.int4_tc import permute_x
from duoserve.quant.triton_kernels import _interpreting, _permuted_input

GROUP = 128
BM, BN, XS, WARPS = 128, 128, 4, 8  # wgp: tokens and weight rows per CTA, x stages, warps
_PI = torch.tensor([4 * (c // 2 % 4) + c % 2 + 2 * (c // 8) for c in range(16)])


def permute_x_wgr(x: torch.Tensor) -> torch.Tensor:
    """x [T, K] -> x'' [T, K]: x''[t, 128 g + 16 j + c] = x[t, 128 g + 8 pi(c) + j], plane j of
    group g in the column order of the wgr kernel's relabelled words (see tcg)."""
    t, k = x.shape
    planes = x.view(t, k // GROUP, 16, 8).transpose(2, 3)  # [t, g, j, w]
    return planes[..., _PI.to(x.device)].reshape(t, k)


@functools.cache
def available(device: torch.device) -> bool:
    """True on sm_90 CUDA devices when triton's Gluon (Hopper TMA and wgmma) imports."""
    if device.type != "cuda" or _interpreting():
        return False
    try:
        from duoserve.quant import _int4_wgp_gluon  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device)[0] == 9


def supports(group_size: int, scale_dtype: torch.dtype) -> bool:
    """True when the wgp kernel takes this group size and scale dtype."""
    return group_size == GROUP and scale_dtype == torch.bfloat16


def wgp_matmul(
    x: torch.Tensor, w, group_size: int, y: torch.Tensor, fused: bool, bt: int = 0
) -> None:
    """y [T, N out] = x [T, K] @ W^T (fused: silu(gate) * up) through the wgp kernel, or with
    bt (tokens per CTA: 64, 128 or 256) through wgr (weights as the register operand)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from duoserve.quant import _int4_wgp_gluon

    qweight, scales, zeros = w
    t, k = x.shape
    assert available(x.device), f"wgp needs an sm_90 CUDA device and Gluon (got {x.device})"
    assert supports(group_size, scales.dtype), (
        f"wgp: group {group_size} (needs {GROUP}), scales {scales.dtype} (needs bfloat16)"
    )
    n_rows, kw = qweight.shape
    assert k == 8 * kw and x.dtype == torch.bfloat16, f"x {tuple(x.shape)} {x.dtype}, K={8 * kw}"
    n_out = n_rows // 2 if fused else n_rows
    assert y.shape == (t, n_out) and y.stride(1) == 1, "y: [T, N out]"
    z = zeros if zeros is not None else scales  # never read when HAS_ZEROS is False
    if bt:
        xp = permute_x_wgr(x.contiguous())
        layout = gl.NVMMASharedLayout.get_default_for([bt, 64], gl.bfloat16)
        desc = TensorDescriptor.from_tensor(xp, [bt, 64], layout)
        rows = 16 * WARPS // 2 if fused else 16 * WARPS
        grid = (-(-n_out // rows), -(-t // bt))
        _int4_wgp_gluon.wgr[grid](
            desc, qweight, scales, z, y, t, n_out, kw, k // group_size, n_out, y.stride(0),
            HAS_ZEROS=zeros is not None, FUSED=fused, BT=bt, XS=3 if bt == 256 else 4,
            num_warps=WARPS,
        )  # fmt: skip
        return
    xp = permute_x(x.contiguous(), group_size)
    layout = gl.NVMMASharedLayout.get_default_for([BM, 64], gl.bfloat16)
    desc = TensorDescriptor.from_tensor(xp, [BM, 64], layout)
    out_rows = BN // 2 if fused else BN
    grid = (-(-n_out // out_rows), -(-t // BM))
    _int4_wgp_gluon.wgp[grid](
        desc, qweight, scales, z, y, t, n_out, kw, k // group_size, n_out, y.stride(0),
        HAS_ZEROS=zeros is not None, FUSED=fused, BM=BM, BN=BN, XS=XS, num_warps=WARPS,
    )  # fmt: skip


def expert_forward_wgp(
    x: torch.Tensor, buffer: torch.Tensor, layout: Int4ExpertLayout, bt_gu: int = 0, bt_d: int = 0
):
    """down(silu(gate x) * up x) [T, H] of one int4 expert through the wgp kernel (or wgr with
    the given tokens per CTA); the activation is rounded to x's dtype between the matrices."""
    g, i = layout.group_size, layout.intermediate_size
    xp = _permuted_input(x, buffer, layout)
    act = torch.empty(x.shape[0], i, dtype=x.dtype, device=x.device)
    wgp_matmul(xp, layout.gate_up_views(buffer), g, act, True, bt_gu)
    y = torch.empty(x.shape[0], layout.hidden_size, dtype=x.dtype, device=x.device)
    wgp_matmul(act, layout.down_views(buffer), g, y, False, bt_d)
    return y
