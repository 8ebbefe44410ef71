"""Launcher of the Gluon mma.sync decode kernel (kind "tcg", quant/_int4_tcg_gluon.py).

x is permuted per group of 128 so that each lane's B fragment is contiguous:
x'[t, 128 g + 32 a + 4 j + v] = x[t, 128 g + 32 a + 8 v + j] (a, v < 4, j < 8).
"""

from __future__ import annotations

import functools

import torch

from duoserve.quant.triton_kernels import KernelConfig, _interpreting, _split_scratch

GROUP = 128
MAX_TOKENS = 8  # the MMA's N


def permute_x_tcg(x: torch.Tensor) -> torch.Tensor:
    """x [T, K] -> x' [T, K] (see the module docstring); K a multiple of 128."""
    t, k = x.shape
    return x.view(t, k // GROUP, 4, 4, 8).transpose(3, 4).reshape(t, k)


@functools.cache
def available(device: torch.device) -> bool:
    """True on CUDA devices with mma.sync bf16 (sm_80+) when triton's Gluon imports."""
    if device.type != "cuda" or _interpreting():
        return False
    try:
        from duoserve.quant import _int4_tcg_gluon  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def supports(group_size: int, num_tokens: int) -> bool:
    """True when the tcg kernel takes this group size and token count."""
    return group_size == GROUP and num_tokens <= MAX_TOKENS


def tcg_matmul(cfg: KernelConfig, x, w, group_size, y, fused: bool) -> None:
    """y [T, N out] = x [T, K] @ W^T (fused: silu(gate) * up) through the tcg kernel."""
    from duoserve.quant import _int4_tcg_gluon
    from duoserve.quant.int4_tc import _splits

    qweight, scales, zeros = w
    t, k = x.shape
    assert available(x.device), f"tcg needs an sm_80+ CUDA device and Gluon (got {x.device})"
    assert supports(group_size, t), f"tcg: group {group_size} (needs 128), {t} tokens (<= 8)"
    n_rows, kw = qweight.shape
    assert k == 8 * kw, f"x has {k} inputs, the weights {8 * kw}"
    n_out = n_rows // 2 if fused else n_rows
    assert y.shape == (t, n_out) and y.stride(1) == 1, "y: [T, N out]"
    num_groups = k // GROUP
    rows = 16 * cfg.num_warps
    grid_n = -(-n_out // rows)
    splits, per_split = _splits(cfg, grid_n, num_groups, y.device)
    ws, cnt = _split_scratch(y.device, splits * 2 * MAX_TOKENS * n_out, grid_n)
    xp = permute_x_tcg(x.contiguous())
    z = zeros if zeros is not None else scales  # never read when HAS_ZEROS is False
    _int4_tcg_gluon.tcg[(grid_n, splits)](
        xp, qweight, scales, z, y, ws, cnt, t, n_out, kw, num_groups, n_out, xp.stride(0),
        y.stride(0), per_split, HAS_ZEROS=zeros is not None, FUSED=fused, W=cfg.num_warps,
        SPLIT=splits > 1, DEPTH=3 if cfg.prefetch else 1, num_warps=cfg.num_warps,
    )  # fmt: skip
