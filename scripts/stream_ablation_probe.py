"""GPU: where the stream kernel's time goes (Mixtral, 1 token, cold L2, the bench's method).
The kernel is recompiled with one part swapped out: `nox` keeps only the weight loads, `x2`
adds two of the ten x' rows, `nomath` all ten x' rows but no arithmetic, `l1` keeps the
arithmetic but reloads the first step's words (L1 hits: no HBM stream); `full` is unchanged.
Outputs of the ablated kernels are meaningless; only their times are printed.

    for m in full nox x2 nomath l1; do
        PYTHONPATH=$PWD python3 scripts/stream_ablation_probe.py $m
    done
"""

import sys

import torch
import triton
import triton.language as tl

from duoserve.bench.int4_kernels import (
    SHAPES,
    _bench_cold,
    _copies,
    _expert,
    _nbytes,
    measure_hbm_gbps,
)
from duoserve.quant import _int4_triton as K
from duoserve.quant import triton_kernels as tk
from duoserve.quant.triton_kernels import KernelConfig

mode = sys.argv[1]
orig_tok, orig_tile = K._tok_step, K._stream_tile


@triton.jit
def _tok_nomath(acc, q, s, z, xp_ptrs, magic, t: tl.constexpr, SX: tl.constexpr):
    xt = xp_ptrs + t * 10 * SX
    p = tl.load(xt + 8 * SX) + tl.load(xt + 9 * SX)
    for j in tl.static_range(8):
        p += tl.load(xt + j * SX)
    return acc + (q.to(tl.float32, bitcast=True) + p)


@triton.jit
def _tile_l1(
    q_ptrs,
    s_ptr,
    z_ptr,
    sz_offs,
    g_ids,
    kw0,
    KW,
    HAS_ZEROS: tl.constexpr,
    WG: tl.constexpr,
    EVEN: tl.constexpr,
):
    q = tl.load(q_ptrs)
    s = tl.load(s_ptr + sz_offs).to(tl.float32)
    z = tl.load(z_ptr + sz_offs).to(tl.float32)
    return q, s, z


@triton.jit
def _tok_nox(acc, q, s, z, xp_ptrs, magic, t: tl.constexpr, SX: tl.constexpr):
    return acc + q.to(tl.float32, bitcast=True)


@triton.jit
def _tok_x2(acc, q, s, z, xp_ptrs, magic, t: tl.constexpr, SX: tl.constexpr):
    xt = xp_ptrs + t * 10 * SX
    return acc + (q.to(tl.float32, bitcast=True) + tl.load(xt + 8 * SX) + tl.load(xt + 9 * SX))


if mode == "nox":
    K._tok_step = _tok_nox
elif mode == "x2":
    K._tok_step = _tok_x2
elif mode == "nomath":
    K._tok_step = _tok_nomath
elif mode == "l1":
    K._stream_tile = _tile_l1
tk.set_autotune(False)
bw = measure_hbm_gbps(torch.device("cuda"))
h, i = SHAPES["mixtral"]
buf, lay, *_ = _expert("mixtral", torch.device("cuda"))  # the bench's expert


def S(bn, bk, w, **kw):
    return KernelConfig("stream", bn, bk, 1, w, 1, prefetch=True, **kw)


for op, fused, cfgs in (
    ("gate_up", True, [S(2, 1024, 1), S(1, 1024, 1, one_pass=True, ahead=2), S(4, 2048, 2)]),
    ("down", False, [S(4, 2048, 2), S(4, 1024, 1, ahead=2)]),
):
    w = lay.gate_up_views(buf) if fused else lay.down_views(buf)
    copies = _copies(w)
    roof = _nbytes(*w) / bw / 1e3
    fn = tk.int4_gate_up_silu if fused else tk.int4_linear
    x = torch.randn(1, w[0].shape[1] * 8, device="cuda").bfloat16()
    for cfg in cfgs:
        us = 1e3 * _bench_cold(
            lambda *ww, cfg=cfg, x=x, fn=fn: fn(x, *ww, 128, config=cfg, backend="triton"), copies
        )
        tag = f"n{cfg.block_n} k{cfg.block_k} w{cfg.num_warps} a{cfg.ahead}"
        tag += " 1p" if cfg.one_pass else ""
        print(f"{mode:7s} {op:8s} {tag}: {us:.1f} us ({100 * roof / us:.1f}%)", flush=True)
    del copies
