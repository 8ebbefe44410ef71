"""Launcher of the warp-specialized Gluon prefill kernel (kind "wgs", quant/_int4_wgs_gluon.py),
the prefill path of `expert_forward_int4` on sm_90 (PREFILL_MODE "auto").

x is read in natural order through a TMA descriptor of [BM, 64] blocks; the weights are
dequantized in the kernel, bit for bit those of `dequantize_int4` (bf16 scales, group 128).
`configs_for` picks the tiles: 256-token tiles (128 below 129 tokens, 64 below 65) with the
weights as the wgmma A operand, and split-K 2 where a matrix has too few tiles to fill the SMs.
`compile_sm90` builds the kernel for sm_90 without a GPU (the CPU tests; scripts/sass_int4.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from duoserve.quant.int4 import Int4ExpertLayout
from duoserve.quant.triton_kernels import (
    _interpreting,
    _num_sms,
    _permuted_input,
    _split_scratch,
)

GROUP = 128


@dataclass(frozen=True)
class WgsConfig:
    """Tile of one wgs launch: BM tokens x BN weight rows per CTA, S ring stages, PW producer
    warps with PREGS registers each (the 8 consumer warps get the rest of `maxnreg`)."""

    bm: int = 256
    bn: int = 128
    stages: int = 4
    halves_per_stage: int = 1  # K per stage: 64 (1) or a whole group, 128 (2)
    ahead: int = 3  # groups of words the producer holds in registers ahead of its work
    split_k: int = 1  # 2: two CTAs per tile, each half of K, the later adds the other's partial
    inflight: int = 1  # steps of wgmmas the consumer leaves running before it frees a stage
    tail_split: bool = False  # the last partial wave of tiles as a second launch with split 2
    swap: bool = True  # W as the wgmma A operand (m64 rows x n = bm tokens per warpgroup)
    producer_warps: int = 4
    producer_regs: int = 168
    maxnreg: int = 168

    def __post_init__(self):
        # swap: bm is the wgmma's n; else two warpgroups of m64 tokens
        bms = (64, 128, 256) if self.swap else (128, 256)
        assert self.bm in bms, f"wgs: bm {self.bm} (one of {bms} with swap={self.swap})"
        assert self.bn in (64, 128, 256), f"wgs: bn {self.bn} (64, 128 or 256)"
        assert self.producer_warps in (4, 8), f"wgs: producer_warps {self.producer_warps}"
        assert 2 <= self.stages <= 8, f"wgs: stages {self.stages}"
        assert self.halves_per_stage in (1, 2), f"wgs: halves_per_stage {self.halves_per_stage}"
        assert 1 <= self.ahead <= 3, f"wgs: ahead {self.ahead} (1..3)"
        assert self.split_k in (1, 2), f"wgs: split_k {self.split_k} (1 or 2)"
        assert self.inflight in (1, 2) and self.inflight < self.stages, f"wgs: {self}"


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
    num_groups = k // group_size
    row_tiles = -(-n_out // out_rows)
    token_tiles = -(-t // cfg.bm)
    launches = [(0, row_tiles, cfg.split_k)]  # (first row tile, row tiles, splits)
    if cfg.tail_split and cfg.split_k == 1 and num_groups % 2 == 0:
        # the tiles past the last full wave run as half tiles (split 2): a shorter last wave
        tail = (row_tiles * token_tiles) % _num_sms(x.device)
        tail_rows = -(-tail // token_tiles)
        if 0 < 2 * tail_rows * token_tiles <= _num_sms(x.device) and tail_rows < row_tiles:
            launches = [(0, row_tiles - tail_rows, 1), (row_tiles - tail_rows, tail_rows, 2)]
    for row_tile0, rows, splits in launches:
        assert num_groups % splits == 0, f"wgs: {num_groups} groups, split_k {splits}"
        grid = (token_tiles, rows, splits)
        num_tiles = grid[0] * grid[1]
        # fp32 partials only for a split launch (shared per device, kept between calls)
        ws_numel = 2 * num_tiles * cfg.bm * cfg.bn if splits == 2 else 0
        ws, cnt = _split_scratch(x.device, ws_numel, num_tiles)
        _int4_wgs_gluon.wgs[grid](
            desc, qweight, scales, z, y, ws, cnt, t, n_out, kw, num_groups, n_out, y.stride(0),
            row_tile0, HAS_ZEROS=zeros is not None, FUSED=fused, BM=cfg.bm, BN=cfg.bn,
            S=cfg.stages, PW=cfg.producer_warps, PREGS=cfg.producer_regs,
            HS=cfg.halves_per_stage, AHEAD=cfg.ahead, SPLIT=splits, INFLIGHT=cfg.inflight,
            SWAP=cfg.swap, num_warps=8, maxnreg=cfg.maxnreg,
        )  # fmt: skip


def configs_for(num_tokens: int, layout: Int4ExpertLayout, device: torch.device):
    """(gate/up, down) WgsConfigs for a prefill of num_tokens tokens (see the module doc; the
    tile choice is the H100 probe's, docs/int4.md round 9)."""
    bm = 256 if num_tokens > 128 else 128 if num_tokens > 64 else 64
    h, i = layout.hidden_size, layout.intermediate_size
    cfgs = []
    for fused, k in ((True, h), (False, i)):  # gate/up, down
        tiles = _num_tiles(num_tokens, layout, WgsConfig(bm=bm), fused)
        split = 2 if 2 * tiles <= _num_sms(device) and (k // GROUP) % 2 == 0 else 1
        cfgs.append(WgsConfig(bm=bm, split_k=split))
    return tuple(cfgs)


def _num_tiles(num_tokens: int, layout: Int4ExpertLayout, cfg: WgsConfig, fused: bool) -> int:
    # CTA tiles of one launch without split: token tiles x output tiles (fused: bn / 2 outputs)
    n_out = layout.intermediate_size if fused else layout.hidden_size
    return -(-num_tokens // cfg.bm) * -(-n_out // (cfg.bn // 2 if fused else cfg.bn))


def takes(num_tokens: int, layout: Int4ExpertLayout, device: torch.device) -> bool:
    """Whether PREFILL_MODE "auto" runs this expert through wgs: sm_90, group 128, bf16 scales,
    and a gate/up launch of at least one CTA per SM. Smaller experts (Qwen3-30B-A3B's) took
    longer through wgs than through dequant + cuBLAS on the H100 (docs/int4.md round 9)."""
    if not (available(device) and supports(layout.group_size, layout.scale_torch_dtype)):
        return False
    gate_up = configs_for(num_tokens, layout, device)[0]
    return _num_tiles(num_tokens, layout, gate_up, fused=True) >= _num_sms(device)


def expert_forward_wgs(x: torch.Tensor, buffer: torch.Tensor, layout: Int4ExpertLayout,
                       gate_up_cfg: WgsConfig | None = None,
                       down_cfg: WgsConfig | None = None) -> torch.Tensor:  # fmt: skip
    """down(silu(gate x) * up x) [T, H] of one int4 expert through the wgs kernel (configs:
    `configs_for` where None); the activation is rounded to x's dtype between the two
    matrices, as the reference does."""
    g, i = layout.group_size, layout.intermediate_size
    if gate_up_cfg is None or down_cfg is None:
        auto = configs_for(x.shape[0], layout, x.device)
        gate_up_cfg, down_cfg = gate_up_cfg or auto[0], down_cfg or auto[1]
    xp = _permuted_input(x, buffer, layout)
    act = torch.empty(x.shape[0], i, dtype=x.dtype, device=x.device)
    wgs_matmul(xp, layout.gate_up_views(buffer), g, act, True, gate_up_cfg)
    y = torch.empty(x.shape[0], layout.hidden_size, dtype=x.dtype, device=x.device)
    wgs_matmul(act, layout.down_views(buffer), g, y, False, down_cfg)
    return y


def compile_sm90(cfg: WgsConfig, fused: bool, has_zeros: bool = True):
    """The kernel compiled for sm_90 by triton's own ptxas, on any machine (no GPU needed):
    the CompiledKernel (asm["cubin"], asm["ptx"], metadata.shared)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from duoserve.quant import _int4_wgs_gluon, sm90

    layout = gl.NVMMASharedLayout.get_default_for([cfg.bm, 64], gl.bfloat16)
    sig = {
        "x_desc": f"tensordesc<bf16[{cfg.bm}, 64],{layout!r}>", "qw_ptr": "*i32",
        "s_ptr": "*bf16", "z_ptr": "*u8", "y_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32",
        "T": "i32", "N": "i32", "KW": "i32", "G": "i32", "up_offset": "i32", "stride_yt": "i32",
        "row_tile0": "i32",
    }  # fmt: skip
    consts = dict(
        HAS_ZEROS=has_zeros, FUSED=fused, BM=cfg.bm, BN=cfg.bn, S=cfg.stages,
        PW=cfg.producer_warps, PREGS=cfg.producer_regs, HS=cfg.halves_per_stage,
        AHEAD=cfg.ahead, SPLIT=cfg.split_k, INFLIGHT=cfg.inflight, SWAP=cfg.swap,
    )  # fmt: skip
    return sm90.compile_sm90(
        GluonASTSource, _int4_wgs_gluon.wgs, sig, consts, ("KW", "G", "stride_yt"),
        {"num_warps": 8, "maxnreg": cfg.maxnreg},
    )  # fmt: skip
