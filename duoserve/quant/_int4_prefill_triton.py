"""Fused W4A16 GEMM for int4 prefill (nibble planes); imported lazily by duoserve.quant.int4_gemm.

Shapes: T tokens, N weight rows, K inputs, G = K / GROUP groups. The kernel reads qweight as
int16 [N, KE = K / 4]: element e of a row holds the codes of inputs 4e + j in bits 4j..4j+3
(j = 0..3; little-endian halves of the int32 words), EG = GROUP / 4 elements per group.

The K order of a dot product is free, so x is permuted instead of W: x' [T, 4, KE] with
x'[t, j, e] = x[t, 4e + j] (a copy; the gate/up kernel writes the down kernel's input in this
layout directly). A program owns a [BN rows, BM tokens] tile and walks K one group per step:
it loads the group's int16 tile [BN, EG] once and, for each nibble plane j, turns it into the
bf16 codes q (exact) *in the layout it was loaded in* and multiplies them with x'_j:

    acc_g [BN, BM] = sum_j plane_j [BN, EG] @ x'_j^T [EG, BM]     (tensor cores, fp32)
    acc += s[:, None] * acc_g - (s z)[:, None] * xsum_g[None, :]  (once per group, FMA)

with xsum_g[t] = sum of x[t, k] over the group (`xs` [T, G] fp32, from the launcher). Only
constants enter the weight operand (bits | 0x4300 is the bf16 128 + q; minus 128 is q), so
triton keeps it in the wgmma register layout: the int16 tile goes global -> shared (cp.async,
pipelined) -> registers in the MMA operand layout, and the codes never return to shared memory.
The scale and zero point apply after the MMA, exactly ((q - z) s is not rounded to bf16 per
weight: the result is that of the exact fp32 weights, as the other fused kernels compute).
SWAP False puts the weights on the B side instead (acc [BM, BN]; the codes go through shared
memory), a sweep candidate.
"""

from __future__ import annotations

import triton
import triton.language as tl

from duoserve.quant._int4_triton import _round


@triton.jit
def _codes(e, j: tl.constexpr, DOT_FP32: tl.constexpr):
    # codes q of nibble plane j of the int16 tile e as bf16 (exact)
    v = (((e >> (4 * j)) & 15) | 0x4300).to(tl.bfloat16, bitcast=True)  # 128 + q
    if DOT_FP32:  # the interpreter's bf16 dot (and bf16 constants) are broken: fp32, same values
        v = v.to(tl.float32)
    return v - 128.0


@triton.jit
def _plane_dot(acc, e, xj, j: tl.constexpr, SWAP: tl.constexpr, DOT_FP32: tl.constexpr):
    # acc += codes_j [BN, EG] @ xj^T (SWAP: acc [BN, BM]) or xj @ codes_j^T (acc [BM, BN])
    q = _codes(e, j, DOT_FP32)
    if DOT_FP32:
        xj = xj.to(tl.float32)
    if SWAP:
        acc = tl.dot(q, tl.trans(xj), acc)
    else:
        acc = tl.dot(xj, tl.trans(q), acc)
    return acc


@triton.jit
def _group_step(acc, q_ptrs, s_ptrs, z_ptrs, xs_ptrs, x_ptrs, g, stride_xj,
                HAS_ZEROS: tl.constexpr, EG: tl.constexpr, SWAP: tl.constexpr,
                DOT_FP32: tl.constexpr):  # fmt: skip
    # one group g of one row block: the int16 tile once, 4 plane dots, then scale and zero.
    # NOTE: no masks: rows and tokens are clamped in bounds (masked x' loads are not pipelined)
    e = tl.load(q_ptrs + g * EG)
    acc_g = tl.zeros_like(acc)
    x_off = g * EG
    acc_g = _plane_dot(acc_g, e, tl.load(x_ptrs + x_off), 0, SWAP, DOT_FP32)
    x_off += stride_xj
    acc_g = _plane_dot(acc_g, e, tl.load(x_ptrs + x_off), 1, SWAP, DOT_FP32)
    x_off += stride_xj
    acc_g = _plane_dot(acc_g, e, tl.load(x_ptrs + x_off), 2, SWAP, DOT_FP32)
    x_off += stride_xj
    acc_g = _plane_dot(acc_g, e, tl.load(x_ptrs + x_off), 3, SWAP, DOT_FP32)
    s = tl.load(s_ptrs + g).to(tl.float32)  # [BN]
    if HAS_ZEROS:
        z = tl.load(z_ptrs + g).to(tl.float32)
    else:
        z = tl.zeros_like(s) + 8.0
    xsum = tl.load(xs_ptrs + g)  # [BM]
    if SWAP:
        acc += s[:, None] * acc_g - (s * z)[:, None] * xsum[None, :]
    else:
        acc += s[None, :] * acc_g - (s * z)[None, :] * xsum[:, None]
    return acc


@triton.jit
def _gemm(xp_ptr, xs_ptr, q_ptr, s_ptr, z_ptr, rows, tokens, T, G, stride_xt, stride_xj,
          stride_xs, stride_q, stride_s, HAS_ZEROS: tl.constexpr, GROUP: tl.constexpr,
          BN: tl.constexpr, BM: tl.constexpr, SWAP: tl.constexpr, DOT_FP32: tl.constexpr,
          NS: tl.constexpr):  # fmt: skip
    # rows [BN] (clamped), tokens [BM] -> fp32 acc [BN, BM] (SWAP) or [BM, BN] over all of K
    EG: tl.constexpr = GROUP // 4  # int16 elements per group
    elems = tl.arange(0, EG)
    tok = tl.where(tokens < T, tokens, 0).to(tl.int64)  # clamped: loads stay in bounds
    q_ptrs = q_ptr + rows[:, None] * stride_q + elems[None, :]  # [BN, EG]
    x_ptrs = xp_ptr + tok[:, None] * stride_xt + elems[None, :]  # [BM, EG]
    s_ptrs = s_ptr + rows * stride_s  # [BN]
    z_ptrs = z_ptr + rows * stride_s
    xs_ptrs = xs_ptr + tok * stride_xs  # [BM]
    if SWAP:
        acc = tl.zeros([BN, BM], tl.float32)
    else:
        acc = tl.zeros([BM, BN], tl.float32)
    for g in tl.range(0, G, num_stages=NS):
        acc = _group_step(
            acc, q_ptrs, s_ptrs, z_ptrs, xs_ptrs, x_ptrs, g, stride_xj, HAS_ZEROS,
            EG, SWAP, DOT_FP32,
        )  # fmt: skip
    return acc


@triton.jit
def _store(y_ptr, out, rows, row_ok, tokens, T, stride_yt, stride_yj, PERMUTE_OUT: tl.constexpr,
           SWAP: tl.constexpr):  # fmt: skip
    # out fp32 [BN, BM] (SWAP) or [BM, BN] -> y[t, n], or y'[t, n % 4, n // 4] (PERMUTE_OUT)
    if PERMUTE_OUT:
        col = (rows % 4) * stride_yj + rows // 4
    else:
        col = rows
    out = _round(out, y_ptr.dtype.element_ty)
    if SWAP:
        y_ptrs = y_ptr + tokens[None, :].to(tl.int64) * stride_yt + col[:, None]
        tl.store(y_ptrs, out, mask=row_ok[:, None] & (tokens[None, :] < T))
    else:
        y_ptrs = y_ptr + tokens[:, None].to(tl.int64) * stride_yt + col[None, :]
        tl.store(y_ptrs, out, mask=row_ok[None, :] & (tokens[:, None] < T))


@triton.jit(do_not_specialize=["T", "stride_xt", "stride_xs", "stride_yt"])
def w4a16(xp_ptr, xs_ptr, q_ptr, s_ptr, z_ptr, y_ptr, T, N, G, up_offset, stride_xt, stride_xj,
          stride_xs, stride_q, stride_s, stride_yt, stride_yj, HAS_ZEROS: tl.constexpr,
          FUSED: tl.constexpr, PERMUTE_OUT: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr,
          BM: tl.constexpr, SWAP: tl.constexpr, DOT_FP32: tl.constexpr,
          NS: tl.constexpr):  # fmt: skip
    # y [T, N] = x [T, K] @ W^T from x' and xs (see the module docstring); q_ptr: qweight as
    # int16 [N, K / 4]; FUSED: silu(gate) * up, up rows at up_offset (a second pass over the
    # same x' tiles, from L2); PERMUTE_OUT: y is written as y'[t, n % 4, n // 4] (the next
    # GEMM's x'). grid (row blocks * token blocks,), token blocks fastest: programs that share
    # a weight tile run together, so its re-reads hit L2.
    num_t = tl.cdiv(T, BM)
    pid_n = tl.program_id(0) // num_t
    tokens = (tl.program_id(0) % num_t) * BM + tl.arange(0, BM)
    rows = pid_n * BN + tl.arange(0, BN)
    row_ok = rows < N
    rows = tl.where(row_ok, rows, 0).to(tl.int64)  # clamped: loads stay in bounds
    acc = _gemm(
        xp_ptr, xs_ptr, q_ptr, s_ptr, z_ptr, rows, tokens, T, G, stride_xt, stride_xj, stride_xs,
        stride_q, stride_s, HAS_ZEROS, GROUP, BN, BM, SWAP, DOT_FP32, NS,
    )  # fmt: skip
    if FUSED:
        up = _gemm(
            xp_ptr, xs_ptr, q_ptr, s_ptr, z_ptr, rows + up_offset, tokens, T, G, stride_xt,
            stride_xj, stride_xs, stride_q, stride_s, HAS_ZEROS, GROUP, BN, BM, SWAP, DOT_FP32,
            NS,
        )  # fmt: skip
        acc = acc * tl.sigmoid(acc) * up
    _store(y_ptr, acc, rows, row_ok, tokens, T, stride_yt, stride_yj, PERMUTE_OUT, SWAP)
