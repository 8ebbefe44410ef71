"""Triton kernels for int4 experts; imported lazily by duoserve.quant.triton_kernels.

Format: duoserve/quant/int4.py. Shapes: N weight rows, K input, T tokens, BW = BK / 8 words
of a K tile. Every kernel loads a weight tile as int32 [BN, BW] (a row's words are contiguous:
with `stride_q` a kernel argument, triton knows rows are 16-byte aligned and issues 16-byte
vector loads, 32 consecutive k of one row per load), walks K in a `range` loop that triton
software-pipelines (`num_stages`: the tile loads become cp.async into shared memory, several
tiles ahead) and loads a tile's per-row scales and zeros one iteration ahead in registers (they
are 1-2 byte loads, too narrow for cp.async). A K tile never straddles a group (BK <= GROUP).

Dequantization without int->float conversions (I2F runs at a quarter of the FMA rate): nibble j
is masked *in place* and OR-ed into the bits of 2^23, giving the float 2^23 + q * 2^pos (pos < 20,
so exact); subtracting 2^23 (+ z * 2^pos) gives (q - z) * 2^pos exactly, and 2^-pos is folded
into x or the scale.

- ``gemv`` (1 token, FMA): per word, sum_j q_j x_j - z * sum_j x_j (the zero point is applied
  once per word, not per weight: one LOP3, one FADD, one FFMA per weight).
- ``gemm`` (tensor cores, decode tiles of 16 tokens or prefill tiles of 32-256): the weight tile,
  dequantized to bf16 in registers exactly as the torch reference rounds it, is the A operand
  of tl.dot and x^T the B operand (swap-AB: weight rows are the MMA's M); no bf16 scratch.
- ``dequant``: int4 -> bf16 [N, K] (the scratch + cuBLAS prefill path, kept for comparison).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"  # fixed when decorated
MAGIC = 0x4B000000  # bits of 2^23 as fp32
# NOTE: triton 3.6's interpreter truncates fp32 -> bf16; emulate round-to-nearest-even there.
_EMULATE_BF16_RNE = tl.constexpr(INTERPRETED)


@triton.jit
def _round(x, dtype: tl.constexpr):
    # fp32 -> dtype, round to nearest even
    if dtype == tl.bfloat16:  # noqa: SIM102 (nested constexpr ifs compile everywhere)
        if _EMULATE_BF16_RNE:
            bits = x.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            x = bits.to(tl.float32, bitcast=True)
    if dtype != tl.float32:
        x = x.to(dtype)
    return x


@triton.jit
def _nibble_consts():
    # nibble j: nibbles 0..4 stay in place (pos 4j), 5..7 are shifted right by 12 (pos 4j - 12);
    # masks never start at bit 0 after a shift, so no bitfield-extract sequence is generated
    j = tl.arange(0, 8)
    shift = tl.where(j < 5, 0, 12)
    pos = j * 4 - shift
    mult = ((127 + pos) << 23).to(tl.float32, bitcast=True)  # 2^pos
    inv = ((127 - pos) << 23).to(tl.float32, bitcast=True)  # 2^-pos
    return shift.to(tl.uint32), (15 << pos).to(tl.uint32), mult, inv


@triton.jit
def _unpack_words(q, magic):
    # int32 [BN, BW] -> fp32 [BN, BW, 8]: 2^23 + q_j * 2^pos_j (exact; nibble j in-thread)
    # NOTE: `magic` is a kernel argument, not a literal: in a register it lets ptxas fuse the
    # and/or into one LOP3 (a LOP3 takes one immediate).
    shift, mask, _, _ = _nibble_consts()
    bits = (q[:, :, None].to(tl.uint32, bitcast=True) >> shift[None, None, :]) & mask[None, None, :]
    return (bits | magic.to(tl.uint32, bitcast=True)).to(tl.float32, bitcast=True)


@triton.jit
def _load_sz(s_ptr, z_ptr, offs, HAS_ZEROS: tl.constexpr):
    # scales and zero points at offs as fp32 (zero point 8 when symmetric)
    s = tl.load(s_ptr + offs).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(z_ptr + offs).to(tl.float32)
    else:
        z = tl.zeros_like(s) + 8.0
    return s, z


@triton.jit
def _load_tile(q_ptr, rows, k0, stride_q, BK: tl.constexpr):
    # rows [BN] -> int32 [BN, BK / 8], the words of k0..k0+BK-1
    words = k0 // 8 + tl.arange(0, BK // 8)
    return tl.load(q_ptr + rows[:, None] * stride_q + words[None, :])


@triton.jit
def _row_block(pid_n, N, BN: tl.constexpr):
    rows = pid_n * BN + tl.arange(0, BN)
    row_mask = rows < N
    return tl.where(row_mask, rows, 0).to(tl.int64), row_mask  # clamped: loads stay in bounds


@triton.jit
def _epilogue(acc, acc2, y_ptr, ws_ptr, cnt_ptr, rows, row_mask, tokens, t_mask, N, stride_y,
              tile, t_pad, FUSED: tl.constexpr):  # fmt: skip
    # acc, acc2 [BN, BT] fp32 -> y[tokens, rows]. With several K splits (grid axis 2), the last
    # program of a tile to arrive (counted with an atomic) sums every split's fp32 partial.
    mask = row_mask[:, None] & t_mask[None, :]
    num_splits = tl.num_programs(2)
    if num_splits > 1:
        # ws [splits, 2, t_pad, N] fp32; cnt [tiles] int32, zero between launches
        offs = tokens[None, :].to(tl.int64) * N + rows[:, None]
        part = ws_ptr + tl.program_id(2) * 2 * t_pad * N + offs
        tl.store(part, acc, mask=mask)
        if FUSED:
            tl.store(part + t_pad * N, acc2, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the release below
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == num_splits - 1:
            acc = tl.zeros_like(acc)
            acc2 = tl.zeros_like(acc2)
            for k in range(num_splits):
                part = ws_ptr + k * 2 * t_pad * N + offs
                acc += tl.load(part, mask=mask, other=0.0, cache_modifier=".cg")
                if FUSED:
                    acc2 += tl.load(part + t_pad * N, mask=mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(cnt_ptr + tile, 0)  # reset for the next launch
            if FUSED:
                acc = acc * tl.sigmoid(acc) * acc2
            y_ptrs = y_ptr + tokens[None, :].to(tl.int64) * stride_y + rows[:, None]
            tl.store(y_ptrs, _round(acc, y_ptr.dtype.element_ty), mask=mask)
    else:
        if FUSED:
            acc = acc * tl.sigmoid(acc) * acc2
        y_ptrs = y_ptr + tokens[None, :].to(tl.int64) * stride_y + rows[:, None]
        tl.store(y_ptrs, _round(acc, y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- gemv (1 token)


@triton.jit
def _gemv_acc(q, s, z, xs, xsum, acc, magic):
    # q int32 [BN, BW], s/z [BN], xs [BW, 8] = x * 2^-pos, xsum [BW] = sum_j x: acc [BN, BW] +=
    # s * (word dots - z * xsum); the reduction across words waits until the end of the kernel
    codes = _unpack_words(q, magic) - 8388608.0  # [BN, BW, 8]: q_j * 2^pos_j, exact
    p = tl.sum(codes * xs[None, :, :], axis=2)  # [BN, BW] = sum_j q_j x_j
    return acc + s[:, None] * (p - z[:, None] * xsum[None, :])


@triton.jit
def gemv(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, N, K, up_offset, stride_q, stride_s,
         k_per_split, magic, HAS_ZEROS: tl.constexpr, FUSED: tl.constexpr, GROUP: tl.constexpr,
         BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    # y [1, N] = x [1, K] @ W^T on FMA units; FUSED: silu(gate) * up, up rows at up_offset (gate
    # and up tiles stream in the same loop). grid (N / BN, 1, splits), split s: k_per_split of K
    rows, row_mask = _row_block(tl.program_id(0), N, BN)
    rows2 = rows + up_offset
    _, _, _, inv = _nibble_consts()
    acc = tl.zeros([BN, BK // 8], tl.float32)
    acc2 = tl.zeros([BN, BK // 8], tl.float32)
    k_start = tl.program_id(2) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    x_offs = tl.arange(0, BK // 8)[:, None] * 8 + tl.arange(0, 8)[None, :]  # [BW, 8]
    s, z = _load_sz(s_ptr, z_ptr, rows * stride_s + k_start // GROUP, HAS_ZEROS)
    s2, z2 = s, z
    if FUSED:
        s2, z2 = _load_sz(s_ptr, z_ptr, rows2 * stride_s + k_start // GROUP, HAS_ZEROS)
    for k0 in range(k_start, k_end, BK):
        # next tile's scales/zeros (the last iteration reloads its own)
        g_next = tl.minimum(k0 + BK, k_end - BK) // GROUP
        s_next, z_next = _load_sz(s_ptr, z_ptr, rows * stride_s + g_next, HAS_ZEROS)
        xv = tl.load(x_ptr + k0 + x_offs).to(tl.float32)  # [BW, 8]
        xs = xv * inv[None, :]
        xsum = tl.sum(xv, axis=1)  # [BW]
        q = _load_tile(qw_ptr, rows, k0, stride_q, BK)
        acc = _gemv_acc(q, s, z, xs, xsum, acc, magic)
        s, z = s_next, z_next
        if FUSED:
            s2_next, z2_next = _load_sz(s_ptr, z_ptr, rows2 * stride_s + g_next, HAS_ZEROS)
            q2 = _load_tile(qw_ptr, rows2, k0, stride_q, BK)
            acc2 = _gemv_acc(q2, s2, z2, xs, xsum, acc2, magic)
            s2, z2 = s2_next, z2_next
    out = tl.sum(acc, axis=1)[:, None]  # [BN, 1]: one cross-thread reduction per program
    out2 = tl.sum(acc2, axis=1)[:, None]
    tokens = tl.arange(0, 1)
    _epilogue(
        out, out2, y_ptr, ws_ptr, cnt_ptr, rows, row_mask, tokens, tokens < 1, N, 0,
        tl.program_id(0), 1, FUSED,
    )  # fmt: skip


# --------------------------------------------------------------------------- gemm (tensor cores)


@triton.jit
def _dequant_words(q, s, z, magic):
    # int32 [BN, BW], s/z [BN] -> fp32 [BN, BW * 8] = (q - z) * s, exact before any rounding
    _, _, mult, inv = _nibble_consts()
    zero_magic = 8388608.0 + z[:, None, None] * mult[None, None, :]  # [BN, 1, 8]
    scale = s[:, None, None] * inv[None, None, :]
    w = (_unpack_words(q, magic) - zero_magic) * scale  # [BN, BW, 8]
    return tl.reshape(w, [q.shape[0], q.shape[1] * 8])


@triton.jit
def _mma_tile(qw_ptr, rows, k0, stride_q, s, z, xt, acc, magic, BK: tl.constexpr,
              DOT_FP32: tl.constexpr):  # fmt: skip
    # acc [BN, BT] += bf16((q - z) * s) [BN, BK] @ xt [BK, BT]
    q = _load_tile(qw_ptr, rows, k0, stride_q, BK)
    w = _round(_dequant_words(q, s, z, magic), tl.bfloat16)  # rounded once, as the reference
    if DOT_FP32:  # the interpreter's bf16 dot is broken: same values as fp32 operands
        return tl.dot(w.to(tl.float32), xt.to(tl.float32), acc)
    return tl.dot(w, xt, acc)


@triton.jit(do_not_specialize=["T"])
def gemm(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, T, N, K, up_offset, stride_x,
         stride_y, stride_q, stride_s, k_per_split, magic, HAS_ZEROS: tl.constexpr,
         FUSED: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr,
         BK: tl.constexpr, DOT_FP32: tl.constexpr):  # fmt: skip
    # y [T, N] = x [T, K] @ W^T on tensor cores; FUSED: silu(gate) * up. grid (N/BN * T/BT, 1,
    # splits) with the token tile fastest, so the programs sharing a weight tile run together
    # and read it from HBM once (then L2); split s covers k_per_split of K
    num_t = tl.cdiv(T, BT)
    pid_n, pid_t = tl.program_id(0) // num_t, tl.program_id(0) % num_t
    rows, row_mask = _row_block(pid_n, N, BN)
    rows2 = rows + up_offset
    tokens = pid_t * BT + tl.arange(0, BT)
    t_mask = tokens < T
    acc = tl.zeros([BN, BT], tl.float32)
    acc2 = tl.zeros([BN, BT], tl.float32)
    k_start = tl.program_id(2) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    x_ptrs = x_ptr + tokens[None, :].to(tl.int64) * stride_x + tl.arange(0, BK)[:, None]
    s, z = _load_sz(s_ptr, z_ptr, rows * stride_s + k_start // GROUP, HAS_ZEROS)
    s2, z2 = s, z
    if FUSED:
        s2, z2 = _load_sz(s_ptr, z_ptr, rows2 * stride_s + k_start // GROUP, HAS_ZEROS)
    for k0 in range(k_start, k_end, BK):
        g_next = tl.minimum(k0 + BK, k_end - BK) // GROUP
        s_next, z_next = _load_sz(s_ptr, z_ptr, rows * stride_s + g_next, HAS_ZEROS)
        xt = tl.load(x_ptrs + k0, mask=t_mask[None, :], other=0.0).to(tl.bfloat16)  # [BK, BT]
        acc = _mma_tile(qw_ptr, rows, k0, stride_q, s, z, xt, acc, magic, BK, DOT_FP32)
        s, z = s_next, z_next
        if FUSED:
            s2_next, z2_next = _load_sz(s_ptr, z_ptr, rows2 * stride_s + g_next, HAS_ZEROS)
            acc2 = _mma_tile(qw_ptr, rows2, k0, stride_q, s2, z2, xt, acc2, magic, BK, DOT_FP32)
            s2, z2 = s2_next, z2_next
    _epilogue(
        acc, acc2, y_ptr, ws_ptr, cnt_ptr, rows, row_mask, tokens, t_mask, N, stride_y,
        tl.program_id(0), num_t * BT, FUSED,
    )  # fmt: skip


# --------------------------------------------------------------------------- dequant


@triton.jit
def dequant(qw_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_q, stride_s, magic,
            HAS_ZEROS: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr,
            BK: tl.constexpr):  # fmt: skip
    # out [N, K] = bf16((q - z) * s); program (n-block, k-block of BK <= GROUP)
    rows, row_mask = _row_block(tl.program_id(0), N, BN)
    k0 = tl.program_id(1) * BK
    s, z = _load_sz(s_ptr, z_ptr, rows * stride_s + k0 // GROUP, HAS_ZEROS)
    w = _dequant_words(_load_tile(qw_ptr, rows, k0, stride_q, BK), s, z, magic)  # [BN, BK]
    out_ptrs = out_ptr + rows[:, None] * K + k0 + tl.arange(0, BK)[None, :]
    tl.store(out_ptrs, _round(w, out_ptr.dtype.element_ty), mask=row_mask[:, None])
