"""Decode int4 GEMV / small GEMM on mma.sync tensor cores, written in Gluon (kind "tcg");
imported lazily by duoserve.quant.int4_tcg. sm_80+ only: Gluon has no interpreter, so the CPU
tests check the launcher's x permutation and this kernel runs in the GPU tests.

Shapes: T <= 8 tokens (the MMA's N), N weight rows, K inputs, KW = K / 8 int32 words per row,
GROUP = 128 inputs = 16 words per group. A warp owns 16 weight rows (the MMA's M) and walks its
K range one group at a time; nibble plane j of the group's [16 rows, 16 words] tile is one
m16n8k16 A operand, so a group is 8 MMAs (8 more for the up rows when fused).

Why Gluon: every layout is explicit, so the words load straight into the registers the MMA
reads (plain triton picked other layouts for mma.sync and moved each word through shuffles).
The A fragment of lane l holds rows l / 4 and l / 4 + 8 at columns 2a, 2a + 1, 2a + 8, 2a + 9
(a = l % 4). The K order inside a group is free, so column c of a plane is word
pi(c) = 4 (c // 2 % 4) + c % 2 + 2 (c // 8): lane l's columns are words 4a .. 4a + 3, 16
contiguous bytes of each of its rows. x is permuted to match (`permute_x_tcg`): the B fragment
of lane l (token l / 4) for plane j holds x[128 g + 32 a + 8 v + j], v = 0..3, stored
contiguously. One inline-asm block per word pair makes the 8 planes (q - z as exact bf16, the
`tc` kernel's `_PLANES`); the MMAs accumulate a group in fp32, scaled once per group.

Split-K (grid axis 1) sums fp32 partials through a workspace; the last program of a row
block to arrive (an atomic counter) adds them in split order and writes the output.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import constexpr_function
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from duoserve.quant._int4_tc_triton import _planes_asm

GROUP = gl.constexpr(128)
WG = gl.constexpr(16)  # words per group
_PLANES = gl.constexpr(_planes_asm(False))
_CONSTRAINTS = gl.constexpr("=r," * 8 + "r,r,r")


@constexpr_function
def _word_layout(num_warps):
    # [16 num_warps rows, 16 words]: see tcg's comment
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2], [8, 0]],
        lane_bases=[[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16 << i, 0] for i in range(num_warps.bit_length() - 1)],
        block_bases=[],
        shape=[16 * num_warps, 16],
    )


@gluon.jit
def _group_tile(q_ptrs, z_ptrs, g, HAS_ZEROS: gl.constexpr, A: gl.constexpr):
    # the [BM, 16] words of group g (column c: word pi(c)) and the rows' -(128 + z) as bf16
    w = gl.load(q_ptrs + g * WG)
    if HAS_ZEROS:
        z = gl.load(z_ptrs + g).to(gl.float32)
    else:
        z = gl.full(z_ptrs.shape, 8.0, gl.float32, gl.SliceLayout(1, A))
    return w, z


@gluon.jit
def _x_planes(xb_ptrs, g, x_mask):
    # the 8 B operands (one per nibble plane) of group g
    return (
        gl.load(xb_ptrs + g * GROUP, mask=x_mask, other=0.0),
        gl.load(xb_ptrs + g * GROUP + 4, mask=x_mask, other=0.0),
        gl.load(xb_ptrs + g * GROUP + 8, mask=x_mask, other=0.0),
        gl.load(xb_ptrs + g * GROUP + 12, mask=x_mask, other=0.0),
        gl.load(xb_ptrs + g * GROUP + 16, mask=x_mask, other=0.0),
        gl.load(xb_ptrs + g * GROUP + 20, mask=x_mask, other=0.0),
        gl.load(xb_ptrs + g * GROUP + 24, mask=x_mask, other=0.0),
        gl.load(xb_ptrs + g * GROUP + 28, mask=x_mask, other=0.0),
    )


@gluon.jit
def _group_mma(w, z, xs, ACC: gl.constexpr, A: gl.constexpr, BM: gl.constexpr):
    # sum over the group of (q - z) x for the tile's rows and 8 token columns (fp32)
    w = gl.reshape(gl.permute(gl.reshape(w, [BM, 4, 2, 2]), [0, 2, 1, 3]), [BM, 16])
    w = gl.convert_layout(w, A, assert_trivial=True)
    ce = gl.broadcast(gl.expand_dims((-128.0 - z).to(gl.bfloat16), 1), w)[0]
    planes = gl.inline_asm_elementwise(
        _PLANES, _CONSTRAINTS, [w, ce], dtype=(gl.bfloat16,) * 8, is_pure=True, pack=2
    )
    acc = gl.zeros([BM, 8], gl.float32, ACC)
    for j in gl.static_range(8):
        acc = mma_v2(planes[j], xs[j], acc)
    return acc


@gluon.jit(do_not_specialize=["T", "groups_per_split"])
def tcg(xp_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, T, N, KW, G, up_offset, stride_xt,
        stride_yt, groups_per_split, HAS_ZEROS: gl.constexpr, FUSED: gl.constexpr,
        W: gl.constexpr, SPLIT: gl.constexpr, DEPTH: gl.constexpr):  # fmt: skip
    # y[t, n] = sum_k x[t, k] W[n, k] (FUSED: silu(gate) * up, up rows at up_offset) for
    # t < T <= 8, from xp = permute_x_tcg(x). grid (N / (16 W), splits)
    BM: gl.constexpr = 16 * W
    ACC: gl.constexpr = gl.NVMMADistributedLayout(
        version=[2, 0], warps_per_cta=[W, 1], instr_shape=[16, 8]
    )
    A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC, k_width=2)
    B: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=ACC, k_width=2)
    row0 = gl.program_id(0) * BM
    # the words load as [BM rows, 16 words] in WL: lane l holds words 4a .. 4a + 3 (a = l % 4)
    # of rows l / 4 and l / 4 + 8, in that register order (16-byte loads); _group_mma
    # relabels the columns (word 4a + 2e + b -> column 8e + 2a + b) into the MMA's A layout
    WL: gl.constexpr = _word_layout(W)
    ra = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, WL))
    ra = gl.where(ra < N, ra, 0).to(gl.int64)  # clamped: loads stay in bounds
    q_ptrs = (
        qw_ptr
        + gl.expand_dims(ra * KW, 1)
        + gl.expand_dims(gl.arange(0, 16, layout=gl.SliceLayout(0, WL)), 0)
    )
    rz = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, A))
    z_ptrs = z_ptr + gl.where(rz < N, rz, 0).to(gl.int64) * G
    # B operand: x' [T, K] with plane j of group g's 16 x values for lane (a, v) at 32 a + 4 j + v
    kb = gl.arange(0, 16, layout=gl.SliceLayout(1, B))
    nb = gl.arange(0, 8, layout=gl.SliceLayout(0, B))
    kv = 32 * ((kb // 2) % 4) + kb % 2 + 2 * (kb // 8)  # = 32 a + v
    xb_ptrs = xp_ptr + gl.expand_dims(nb.to(gl.int64) * stride_xt, 0) + gl.expand_dims(kv, 1)
    x_mask = gl.expand_dims(nb < T, 0) & gl.expand_dims(kb < 16, 1)
    # scales in the accumulator's row layout
    rs = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, ACC))
    rs = gl.where(rs < N, rs, 0).to(gl.int64)
    s_ptrs = s_ptr + rs * G
    up = up_offset * KW
    up_sz = up_offset * G
    acc = gl.zeros([BM, 8], gl.float32, ACC)
    acc2 = gl.zeros([BM, 8], gl.float32, ACC)
    g_start = gl.program_id(1) * groups_per_split
    g_end = gl.minimum(g_start + groups_per_split, G)
    # a ring of DEPTH (1 or 3) groups of words in registers: the loads of the groups DEPTH
    # ahead are in flight while a group computes
    w, z = _group_tile(q_ptrs, z_ptrs, g_start, HAS_ZEROS, A)
    if FUSED:
        w2, z2 = _group_tile(q_ptrs + up, z_ptrs + up_sz, g_start, HAS_ZEROS, A)
    if DEPTH > 1:
        g1 = gl.minimum(g_start + 1, g_end - 1)
        g2 = gl.minimum(g_start + 2, g_end - 1)
        wb, zb = _group_tile(q_ptrs, z_ptrs, g1, HAS_ZEROS, A)
        wc, zc = _group_tile(q_ptrs, z_ptrs, g2, HAS_ZEROS, A)
        if FUSED:
            w2b, z2b = _group_tile(q_ptrs + up, z_ptrs + up_sz, g1, HAS_ZEROS, A)
            w2c, z2c = _group_tile(q_ptrs + up, z_ptrs + up_sz, g2, HAS_ZEROS, A)
    for g in range(g_start, g_end):
        g_next = gl.minimum(g + DEPTH, g_end - 1)  # the last groups reload the last one
        w_n, z_n = _group_tile(q_ptrs, z_ptrs, g_next, HAS_ZEROS, A)
        if FUSED:
            w2_n, z2_n = _group_tile(q_ptrs + up, z_ptrs + up_sz, g_next, HAS_ZEROS, A)
        xs = _x_planes(xb_ptrs, g, x_mask)
        s = gl.load(s_ptrs + g).to(gl.float32)
        acc += gl.expand_dims(s, 1) * _group_mma(w, z, xs, ACC, A, BM)
        if FUSED:
            s2 = gl.load(s_ptrs + up_sz + g).to(gl.float32)
            acc2 += gl.expand_dims(s2, 1) * _group_mma(w2, z2, xs, ACC, A, BM)
        if DEPTH > 1:
            w, z, wb, zb, wc, zc = wb, zb, wc, zc, w_n, z_n
            if FUSED:
                w2, z2, w2b, z2b, w2c, z2c = w2b, z2b, w2c, z2c, w2_n, z2_n
        else:
            w, z = w_n, z_n
            if FUSED:
                w2, z2 = w2_n, z2_n
    # outputs: rows x tokens in the accumulator layout
    ro = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, ACC))
    to = gl.arange(0, 8, layout=gl.SliceLayout(0, ACC))
    mask = gl.expand_dims(ro < N, 1) & gl.expand_dims(to < T, 0)
    offs = gl.expand_dims(to.to(gl.int64) * N, 0) + gl.expand_dims(ro, 1)  # [t, n] partials
    last = True
    if SPLIT:
        part = ws_ptr + gl.program_id(1) * 2 * 8 * N + offs
        gl.store(part, acc, mask=mask)
        if FUSED:
            gl.store(part + 8 * N, acc2, mask=mask)
        gl.thread_barrier()  # every thread's partial is written before the release below
        num_splits = gl.num_programs(1)
        last = gl.atomic_add(cnt_ptr + gl.program_id(0), 1, sem="acq_rel") == num_splits - 1
        if last:
            acc = gl.zeros([BM, 8], gl.float32, ACC)
            acc2 = gl.zeros([BM, 8], gl.float32, ACC)
            for k in range(num_splits):
                part = ws_ptr + k * 2 * 8 * N + offs
                acc += gl.load(part, mask=mask, other=0.0, cache_modifier=".cg")
                if FUSED:
                    acc2 += gl.load(part + 8 * N, mask=mask, other=0.0, cache_modifier=".cg")
            gl.atomic_xchg(cnt_ptr + gl.program_id(0), 0)  # reset for the next launch
    if last:
        if FUSED:
            acc = acc * (1.0 / (1.0 + gl.exp(-acc))) * acc2
        y_ptrs = y_ptr + gl.expand_dims(to.to(gl.int64) * stride_yt, 0) + gl.expand_dims(ro, 1)
        gl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
