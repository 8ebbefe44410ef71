"""Tensor-core int4 GEMV / GEMM (kind "tc"); imported lazily by duoserve.quant.int4_tc.

Shapes: T tokens, N weight rows, K inputs, KW = K / 8 int32 words per row, WG = GROUP / 8 words
per group (GROUP >= 128, so one group is at least one MMA K step of 16 per nibble plane).

The K order of a dot product is free, so x is permuted instead of W, plane-major within each
group: x'[t, GROUP g + WG j + w] = x[t, GROUP g + 8 w + j]. Nibble plane j of a group's
[BN, WG] word tile then meets x' columns WG j .. WG j + WG - 1; the 8 planes side by side are
the group's [BN, GROUP] operand, one dot per group:

    acc_g [BN, BT] = [plane_0 | ... | plane_7] @ x'_g^T            (tensor cores, fp32)
    acc += s[:, None] * acc_g                                     (DEFERRED: once per group)

The weights are the MMA's A operand (rows = M, tokens = N: the swap-AB shape for few tokens),
built in registers from the word tile in the layout the MMA reads, so the words go global ->
shared (cp.async, pipelined) -> registers and are never written back. Per two words (16
weights) one inline-asm block (`_PLANES`) makes all 8 planes as bf16 pairs: 2 PRMT (the low and
high halves of both words side by side), 6 shifts, 8 LOP3 ((bits & 0xf) | 0x4300: the bf16
128 + q) and 8 FMA.BF16x2 adding -(128 + z): 1.5 instructions per weight, against 4.0 for the
FMA-unit `stream` kernel. q - z is a small integer, exact in bf16. (Every odd nibble is
shifted down: OR-ing bits 4..7 into a bf16 would reach the exponent's lowest bit.)

- DEFERRED (any scale dtype): the scale multiplies the fp32 group accumulator, so the result
  is that of the exact fp32 weights (like the other fused kernels). Costs BT / WG FMAs per
  weight and a wait for the group's MMAs: for decode tiles (BT = 16).
- PRE_SCALE (bf16 scales): one more FMA.BF16x2 makes (q - z) * s rounded to bf16, bit for bit
  the weights `dequantize_int4` gives; one accumulator over all of K, so the MMAs pipeline
  across groups: for prefill tiles (BT = 64..128; 256 spills).

USE_ASM False computes the same planes with triton ops (the interpreter cannot run PTX).
The grid is (row blocks, token blocks, K splits); several splits sum through an fp32
workspace, the last program of a tile to arrive writing the output (as in _int4_triton.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from duoserve.quant._int4_triton import _round, _sum_splits


def _planes_asm(pre_scale: bool) -> str:
    # $0..$7: planes 0..7 of the word pair ($8, $9) as bf16x2 {word $8, word $9}; $10: the
    # pair's -(128 + z); pre_scale: $11 the pair's scales. Inputs are copied before any output
    # is written (an output may share a register with an input).
    lines = [
        ".reg .b32 lo, hi, t, c, sc, one, nz;",
        "mov.b32 c, $10;",
        "mov.b32 sc, $11;" if pre_scale else "",
        "mov.b32 one, 0x3f803f80;",  # bf16x2 1.0
        "mov.b32 nz, 0x80008000;",  # bf16x2 -0.0
        "prmt.b32 lo, $8, $9, 0x5410;",  # low halves of both words: nibbles 0..3
        "prmt.b32 hi, $8, $9, 0x7632;",  # high halves: nibbles 4..7
    ]
    for j in range(8):
        src, shift = ("lo", 4 * j) if j < 4 else ("hi", 4 * (j - 4))
        if shift:
            lines.append(f"shr.u32 t, {src}, {shift};")
        # (bits & 0xf) | 0x4300 per half: the bf16 128 + q; + -(128 + z): q - z, exact
        lines.append(f"lop3.b32 ${j}, {'t' if shift else src}, 0x000f000f, 0x43004300, 0xea;")
        lines.append(f"fma.rn.bf16x2 ${j}, ${j}, one, c;")
        if pre_scale:  # (q - z) * s rounded once, as dequantize_int4 rounds
            lines.append(f"fma.rn.bf16x2 ${j}, ${j}, sc, nz;")
    return "{\n" + "\n".join(line for line in lines if line) + "\n}"


_PLANES = tl.constexpr(_planes_asm(False))
_PLANES_SCALED = tl.constexpr(_planes_asm(True))
_CONSTRAINTS = tl.constexpr("=r," * 8 + "r,r,r")  # 8 planes; 2 words, -(128 + z)
_CONSTRAINTS_SCALED = tl.constexpr("=r," * 8 + "r,r,r,r")  # and the scales


@triton.jit
def _planes(w, z, s, PRE_SCALE: tl.constexpr, USE_ASM: tl.constexpr):
    # w int32 [BN, WG], z fp32 [BN] (zero points), s [BN] scales -> 8 bf16 [BN, WG] planes
    # (q_j - z), times s when PRE_SCALE; exact, or rounded once to bf16 when PRE_SCALE
    if USE_ASM:
        ce = tl.broadcast_to((-128.0 - z).to(tl.bfloat16)[:, None], w.shape)
        if PRE_SCALE:
            sb = tl.broadcast_to(s.to(tl.bfloat16)[:, None], w.shape)
            return tl.inline_asm_elementwise(
                _PLANES_SCALED, _CONSTRAINTS_SCALED, [w, ce, sb],
                dtype=(tl.bfloat16,) * 8, is_pure=True, pack=2,
            )  # fmt: skip
        return tl.inline_asm_elementwise(
            _PLANES, _CONSTRAINTS, [w, ce], dtype=(tl.bfloat16,) * 8, is_pure=True,
            pack=2,
        )  # fmt: skip
    return (
        _plane(w, z, s, 0, PRE_SCALE), _plane(w, z, s, 1, PRE_SCALE),
        _plane(w, z, s, 2, PRE_SCALE), _plane(w, z, s, 3, PRE_SCALE),
        _plane(w, z, s, 4, PRE_SCALE), _plane(w, z, s, 5, PRE_SCALE),
        _plane(w, z, s, 6, PRE_SCALE), _plane(w, z, s, 7, PRE_SCALE),
    )  # fmt: skip


@triton.jit
def _plane(w, z, s, j: tl.constexpr, PRE_SCALE: tl.constexpr):
    # the reference of one asm plane: fp32 (q_j - z) [* s], rounded once to bf16
    v = ((w >> (4 * j)) & 15).to(tl.float32) - z[:, None]
    if PRE_SCALE:
        v = v * s.to(tl.float32)[:, None]
    return _round(v, tl.bfloat16)


@triton.jit
def _concat_planes(p0, p1, p2, p3, p4, p5, p6, p7, BN: tl.constexpr, WG: tl.constexpr):
    # 8 planes [BN, WG] -> [BN, 8 WG] with column 16 j + w = plane j, word w. Each MMA K step of
    # 16 is one plane, so the join / permute / reshape moves no data: the planes stay in the
    # registers the MMA reads them from (sm_90 SASS: no shared memory round trip)
    a = tl.join(
        tl.join(tl.join(p0, p1), tl.join(p2, p3)), tl.join(tl.join(p4, p5), tl.join(p6, p7))
    )
    a = tl.permute(a, (0, 4, 3, 2, 1))  # [BN, WG, j0, j1, j2] -> [BN, j2, j1, j0, WG]
    return tl.reshape(a, (BN, 8 * WG))


@triton.jit
def _group(acc, w, s, z, x, PRE_SCALE: tl.constexpr, USE_ASM: tl.constexpr,
           DOT_FP32: tl.constexpr):  # fmt: skip
    # one group of BN rows: acc [BN, BT] += W_g @ x_g^T, x [BT, 8 WG] in plane-major order.
    # One dot per group, a fresh accumulator: its 8 MMAs issue back to back (an accumulator
    # carried across groups, or zeroed by plain moves, makes ptxas serialize the wgmmas)
    p0, p1, p2, p3, p4, p5, p6, p7 = _planes(w, z, s, PRE_SCALE, USE_ASM)
    a = _concat_planes(p0, p1, p2, p3, p4, p5, p6, p7, w.shape[0], w.shape[1])
    if PRE_SCALE:  # one accumulator over all of K (half the registers: larger tiles)
        if DOT_FP32:
            return tl.dot(a.to(tl.float32), tl.trans(x.to(tl.float32)), acc)
        return tl.dot(a, tl.trans(x), acc)
    if DOT_FP32:  # the interpreter's bf16 dot is broken: same values as fp32 operands
        part = tl.dot(a.to(tl.float32), tl.trans(x.to(tl.float32)))
    else:
        part = tl.dot(a, tl.trans(x))
    return acc + s.to(tl.float32)[:, None] * part


@triton.jit
def _group_value(ptrs, g, G, WIDTH: tl.constexpr):
    # fp32 [BN] = ptrs[row][g]. WIDTH > 1: load WIDTH groups' values of each row (WIDTH bytes
    # of zero points, 2 WIDTH of scales: >= 4, wide enough for cp.async, so the pipeliner
    # prefetches them with the weights) and select the row's group in registers. WIDTH 1: one
    # synchronous load, used at once (its latency is exposed every group)
    if WIDTH == 1:
        return tl.load(ptrs + g).to(tl.float32)
    lanes = tl.arange(0, WIDTH)
    cols = (g // WIDTH) * WIDTH + lanes
    wide = tl.load(ptrs[:, None] + cols[None, :], mask=(cols < G)[None, :], other=0)
    return tl.sum(tl.where((lanes == g % WIDTH)[None, :], wide.to(tl.float32), 0.0), axis=1)


@triton.jit
def _sz(s_ptrs, z_ptrs, g, G, HAS_ZEROS: tl.constexpr, WIDE: tl.constexpr):
    # scales fp32 [BN] (exact) and zero points fp32 [BN] of group g (8 when symmetric); WIDE:
    # 2 groups of scales and 4 of zero points a load (see _group_value)
    s = _group_value(s_ptrs, g, G, 2 if WIDE else 1)
    if HAS_ZEROS:
        z = _group_value(z_ptrs, g, G, 4 if WIDE else 1)
    else:
        z = tl.zeros(s.shape, tl.float32) + 8.0
    return s, z


@triton.jit
def _finish(acc, acc2, y_ptr, ws_ptr, cnt_ptr, rows, row_mask, tokens, t_mask, N, T_pad,
            stride_yt, FUSED: tl.constexpr, PERMUTE_OUT: tl.constexpr, GROUP: tl.constexpr,
            SPLIT: tl.constexpr):  # fmt: skip
    # sum the K splits (the last program of a tile to arrive), silu(gate) * up, store. SPLIT is
    # a constexpr: without splits the reduction code (and its registers) is not compiled
    if SPLIT:
        mask = row_mask[:, None] & t_mask[None, :]
        last, acc, acc2 = _sum_splits(
            acc, acc2, ws_ptr, cnt_ptr, rows, tokens, mask, N, T_pad, FUSED
        )  # fmt: skip
        if last:
            _out(y_ptr, acc, acc2, rows, row_mask, tokens, t_mask, stride_yt, FUSED,
                 PERMUTE_OUT, GROUP)  # fmt: skip
    else:
        _out(y_ptr, acc, acc2, rows, row_mask, tokens, t_mask, stride_yt, FUSED, PERMUTE_OUT,
             GROUP)  # fmt: skip


@triton.jit
def _out(y_ptr, acc, acc2, rows, row_mask, tokens, t_mask, stride_yt, FUSED: tl.constexpr,
         PERMUTE_OUT: tl.constexpr, GROUP: tl.constexpr):  # fmt: skip
    # acc (gate), acc2 (up) fp32 [BN, BT] -> y[t, n] or, PERMUTE_OUT, the next launch's x'
    if FUSED:
        acc = acc * tl.sigmoid(acc) * acc2
    if PERMUTE_OUT:  # n = GROUP g + 8 w + j goes to GROUP g + (GROUP / 8) j + w
        col = (rows // GROUP) * GROUP + (rows % 8) * (GROUP // 8) + (rows % GROUP) // 8
    else:
        col = rows
    ptrs = y_ptr + tokens[None, :].to(tl.int64) * stride_yt + col[:, None]
    tl.store(ptrs, _round(acc, y_ptr.dtype.element_ty), mask=row_mask[:, None] & t_mask[None, :])


@triton.jit(do_not_specialize=["T", "groups_per_split"])
def tc(xp_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, T, N, KW, G, up_offset, stride_xt,
       stride_yt, groups_per_split, HAS_ZEROS: tl.constexpr, FUSED: tl.constexpr,
       PERMUTE_OUT: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr,
       PRE_SCALE: tl.constexpr, USE_ASM: tl.constexpr, DOT_FP32: tl.constexpr,
       NS: tl.constexpr, PREFETCH: tl.constexpr, SPLIT: tl.constexpr,
       WIDE: tl.constexpr):  # fmt: skip
    # y = x @ W^T from x' (see the module docstring); FUSED: silu(gate) * up with up rows at
    # up_offset. grid (N / BN, T / BT, splits); split k covers groups_per_split groups.
    WG: tl.constexpr = GROUP // 8
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    row_mask = rows < N
    rows = tl.where(row_mask, rows, 0).to(tl.int64)  # clamped: loads stay in bounds
    tokens = tl.program_id(1) * BT + tl.arange(0, BT)
    t_mask = tokens < T
    tok = tl.where(t_mask, tokens, 0).to(tl.int64)
    words = tl.arange(0, WG)
    ks = tl.arange(0, GROUP)
    q_ptrs = qw_ptr + rows[:, None] * KW + words[None, :]  # [BN, WG]
    x_ptrs = xp_ptr + tok[:, None] * stride_xt + ks[None, :]  # [BT, GROUP]
    # padding tokens (a decode tile of 16 holds 1..16) read nothing: cp.async zero-fills them
    x_mask = t_mask[:, None] & (ks < GROUP)[None, :]
    s_ptrs = s_ptr + rows * G
    z_ptrs = z_ptr + rows * G
    up = up_offset * KW
    up_sz = up_offset * G
    acc = tl.zeros([BN, BT], tl.float32)
    acc2 = tl.zeros([BN, BT], tl.float32)
    g_start = tl.program_id(2) * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, G)
    # PREFETCH: the scales and zero points of the next group load one step ahead, in registers
    # (loads this narrow are not pipelined); this pins their layout, and the planes can then
    # go through shared memory on the way to the MMA: a sweep choice
    s, z = _sz(s_ptrs, z_ptrs, g_start, G, HAS_ZEROS, WIDE)
    s2, z2 = _sz(s_ptrs + up_sz, z_ptrs + up_sz, g_start, G, HAS_ZEROS, WIDE)
    for g in tl.range(g_start, g_end, num_stages=NS):
        if PREFETCH:
            g_next = tl.minimum(g + 1, g_end - 1)
            s_next, z_next = _sz(s_ptrs, z_ptrs, g_next, G, HAS_ZEROS, WIDE)
            if FUSED:
                s2_next, z2_next = _sz(s_ptrs + up_sz, z_ptrs + up_sz, g_next, G, HAS_ZEROS, WIDE)
        else:
            s, z = _sz(s_ptrs, z_ptrs, g, G, HAS_ZEROS, WIDE)
            if FUSED:
                s2, z2 = _sz(s_ptrs + up_sz, z_ptrs + up_sz, g, G, HAS_ZEROS, WIDE)
        x = tl.load(x_ptrs + g * GROUP, mask=x_mask, other=0.0)
        w = tl.load(q_ptrs + g * WG)
        acc = _group(acc, w, s, z, x, PRE_SCALE, USE_ASM, DOT_FP32)
        if FUSED:
            w2 = tl.load(q_ptrs + up + g * WG)
            acc2 = _group(acc2, w2, s2, z2, x, PRE_SCALE, USE_ASM, DOT_FP32)
        if PREFETCH:
            s, z = s_next, z_next
            if FUSED:
                s2, z2 = s2_next, z2_next
    T_pad = tl.num_programs(1) * BT
    _finish(acc, acc2, y_ptr, ws_ptr, cnt_ptr, rows, row_mask, tokens, t_mask, N, T_pad,
            stride_yt, FUSED, PERMUTE_OUT, GROUP, SPLIT)  # fmt: skip
