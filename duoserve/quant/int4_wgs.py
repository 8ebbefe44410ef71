"""Launcher of the warp-specialized Gluon prefill kernel (kind "wgs", quant/_int4_wgs_gluon.py).

x is read in natural order through a TMA descriptor of [BM, 64] blocks; the weights are
dequantized in the kernel, bit for bit those of `dequantize_int4` (bf16 scales, group 128).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from duoserve.quant.int4 import Int4ExpertLayout
from duoserve.quant.triton_kernels import _interpreting, _permuted_input

GROUP = 128


@dataclass(frozen=True)
class WgsConfig:
    """Tile of one wgs launch: BM tokens x BN weight rows per CTA, S ring stages, PW producer
    warps with PREGS registers each (the 8 consumer warps get the rest of `maxnreg`)."""

    bm: int = 128
    bn: int = 128
    stages: int = 4
    halves_per_stage: int = 1  # K per stage: 64 (1) or a whole group, 128 (2)
    ahead: int = 2  # groups of words the producer holds in registers ahead of its work
    producer_warps: int = 4
    producer_regs: int = 168
    maxnreg: int = 168

    def __post_init__(self):
        assert self.bm in (128, 256), f"wgs: bm {self.bm} (128 or 256: two warpgroups of m64)"
        assert self.bn in (64, 128, 256), f"wgs: bn {self.bn} (64, 128 or 256)"
        assert self.producer_warps in (4, 8), f"wgs: producer_warps {self.producer_warps}"
        assert 2 <= self.stages <= 8, f"wgs: stages {self.stages}"
        assert self.halves_per_stage in (1, 2), f"wgs: halves_per_stage {self.halves_per_stage}"
        assert 1 <= self.ahead <= 3, f"wgs: ahead {self.ahead} (1..3)"


@functools.cache
def available(device: torch.device) -> bool:
    """True on sm_90 CUDA devices when triton's Gluon (Hopper TMA, wgmma, warp_specialize)
    imports."""
    if device.type != "cuda" or _interpreting():
        return False
    try:
        from duoserve.quant import _int4_wgs_gluon  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device)[0] == 9


def supports(group_size: int, scale_dtype: torch.dtype) -> bool:
    """True when the wgs kernel takes this group size and scale dtype."""
    return group_size == GROUP and scale_dtype == torch.bfloat16


def wgs_matmul(x: torch.Tensor, w, group_size: int, y: torch.Tensor, fused: bool,
               cfg: WgsConfig = WgsConfig()) -> None:  # fmt: skip
    """y [T, N out] = x [T, K] @ W^T (fused: silu(gate) * up) through the wgs kernel."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from duoserve.quant import _int4_wgs_gluon

    qweight, scales, zeros = w
    t, k = x.shape
    assert available(x.device), f"wgs needs an sm_90 CUDA device and Gluon (got {x.device})"
    assert supports(group_size, scales.dtype), (
        f"wgs: group {group_size} (needs {GROUP}), scales {scales.dtype} (needs bfloat16)"
    )
    n_rows, kw = qweight.shape
    assert k == 8 * kw and x.dtype == torch.bfloat16, f"x {tuple(x.shape)} {x.dtype}, K={8 * kw}"
    assert qweight.stride(1) == 1 and qweight.stride(0) == kw, "qweight: contiguous [N, K/8]"
    n_out = n_rows // 2 if fused else n_rows
    assert y.shape == (t, n_out) and y.stride(1) == 1, "y: [T, N out]"
    x = x.contiguous()
    layout = gl.NVMMASharedLayout.get_default_for([cfg.bm, 64], gl.bfloat16)
    desc = TensorDescriptor.from_tensor(x, [cfg.bm, 64], layout)
    out_rows = cfg.bn // 2 if fused else cfg.bn
    z = zeros if zeros is not None else scales  # never read when HAS_ZEROS is False
    grid = (-(-t // cfg.bm), -(-n_out // out_rows))
    _int4_wgs_gluon.wgs[grid](
        desc, qweight, scales, z, y, t, n_out, kw, k // group_size, n_out, y.stride(0),
        HAS_ZEROS=zeros is not None, FUSED=fused, BM=cfg.bm, BN=cfg.bn, S=cfg.stages,
        PW=cfg.producer_warps, PREGS=cfg.producer_regs, HS=cfg.halves_per_stage,
        AHEAD=cfg.ahead, num_warps=8, maxnreg=cfg.maxnreg,
    )  # fmt: skip


def expert_forward_wgs(x: torch.Tensor, buffer: torch.Tensor, layout: Int4ExpertLayout,
                       gate_up_cfg: WgsConfig = WgsConfig(),
                       down_cfg: WgsConfig = WgsConfig()) -> torch.Tensor:  # fmt: skip
    """down(silu(gate x) * up x) [T, H] of one int4 expert through the wgs kernel; the
    activation is rounded to x's dtype between the two matrices, as the reference does."""
    g, i = layout.group_size, layout.intermediate_size
    xp = _permuted_input(x, buffer, layout)
    act = torch.empty(x.shape[0], i, dtype=x.dtype, device=x.device)
    wgs_matmul(xp, layout.gate_up_views(buffer), g, act, True, gate_up_cfg)
    y = torch.empty(x.shape[0], layout.hidden_size, dtype=x.dtype, device=x.device)
    wgs_matmul(act, layout.down_views(buffer), g, y, False, down_cfg)
    return y
