"""Prefill int4 GEMM on Hopper wgmma with both operands in shared memory, written in Gluon (kind
"wgp"); imported lazily by duoserve.quant.int4_wgp. sm_90 only: Gluon has no interpreter, so
the CPU tests check the launcher's refusals and this kernel runs in the GPU tests.

y [T, N] = x [T, K] @ W^T, a CTA owns BM tokens x BN weight rows (FUSED: BN / 2 gate rows and the
same BN / 2 up rows, silu(gate) * up in the epilogue). Per group of 128 inputs:

- x: two TMA boxes [BM, 64] of x' (plane-major within each group, `int4_tc.permute_x`) into a
  ring of XS stages, each stage's arrival on its own mbarrier.
- W: every thread loads 8 words of one row (two 16-byte loads, two groups ahead in
  registers), makes the 8 nibble planes with the `tc_s` inline asm ((q - z) * s rounded once to
  bf16, bit for bit `dequantize_int4`'s weights) and stores planes 0-3 and 4-7 as the two
  [BN, 64] halves of one of two W buffers in shared memory. K order inside a group is free:
  column 16 j + w of the group is plane j of word w, matching x'.
- Two async wgmmas (K = 64 each) per group; the group before is waited for only after this
  group's are issued, so the dequant of group g + 1 overlaps the MMAs of group g.

Barriers per group: one before the W stores (every warpgroup is past its wait for the MMAs that
read that buffer two groups ago) and one after them (every row is stored before either
warpgroup's MMA reads the tile). The x stage of group g - 2 is refilled after the first one.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from duoserve.quant._int4_tc_triton import _planes_asm

GROUP = gl.constexpr(128)
WG = gl.constexpr(16)  # words per group
_PLANES_SCALED = gl.constexpr(_planes_asm(True))
_CONSTRAINTS_SCALED = gl.constexpr("=r," * 8 + "r,r,r,r")


@gluon.jit
def _load_group(q_ptrs, s_ptrs, z_ptrs, g, G, HAS_ZEROS: gl.constexpr, SL: gl.constexpr):
    # the [BN, 16] words of group g (clamped to the last group: the prefetch past the end
    # reloads it) and the rows' scales and zero points
    g = gl.minimum(g, G - 1)
    w = gl.load(q_ptrs + g * WG)
    s = gl.load(s_ptrs + g)
    if HAS_ZEROS:
        z = gl.load(z_ptrs + g).to(gl.float32)
    else:
        z = gl.full(s_ptrs.shape, 8.0, gl.float32, SL)
    return w, s, z


@gluon.jit
def _half_tile(p0, p1, p2, p3, BN: gl.constexpr):
    # 4 planes [BN, 16] -> [BN, 64], column 16 j + w = plane j, word w (register relabelling)
    a = gl.join(gl.join(p0, p1), gl.join(p2, p3))  # [BN, 16, j0, j1]
    return gl.reshape(gl.permute(a, [0, 3, 2, 1]), [BN, 64])


@gluon.jit
def _dequant_store(w, s, z, w_half0, w_half1, BN: gl.constexpr):
    # (q - z) * s as bf16 planes into the two [BN, 64] halves of a W buffer
    ce = gl.broadcast(gl.expand_dims((-128.0 - z).to(gl.bfloat16), 1), w)[0]
    sb = gl.broadcast(gl.expand_dims(s.to(gl.bfloat16), 1), w)[0]
    p = gl.inline_asm_elementwise(
        _PLANES_SCALED, _CONSTRAINTS_SCALED, [w, ce, sb], dtype=(gl.bfloat16,) * 8,
        is_pure=True, pack=2,
    )  # fmt: skip
    w_half0.store(_half_tile(p[0], p[1], p[2], p[3], BN))
    w_half1.store(_half_tile(p[4], p[5], p[6], p[7], BN))


@gluon.jit
def _load_x(x_desc, bar, x_smem, stage, m0, g, G, BM: gl.constexpr):
    # TMA: the two [BM, 64] halves of group g's x' columns into stage `stage` (if g < G)
    ok = g < G
    mbarrier.expect(bar, 2 * BM * 64 * 2, pred=ok)
    tma.async_copy_global_to_shared(x_desc, [m0, g * GROUP], bar, x_smem.index(2 * stage), ok)
    tma.async_copy_global_to_shared(
        x_desc, [m0, g * GROUP + 64], bar, x_smem.index(2 * stage + 1), ok
    )


@gluon.jit(do_not_specialize=["T"])
def wgp(x_desc, qw_ptr, s_ptr, z_ptr, y_ptr, T, N, KW, G, up_offset, stride_yt,
        HAS_ZEROS: gl.constexpr, FUSED: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
        XS: gl.constexpr):  # fmt: skip
    # y[t, n] = sum_k x[t, k] W[n, k] (FUSED: silu(gate) * up, up rows at up_offset; N counts
    # outputs) for T tokens from x' = permute_x(x) behind x_desc (blocks [BM, 64]).
    # grid (N / (BN or BN / 2), T / BM); 8 warps: two warpgroups of BM / 2 tokens each
    NW: gl.constexpr = gl.num_warps()
    OUT: gl.constexpr = BN // 2 if FUSED else BN  # output rows per CTA
    ACC: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, BN, 16]
    )
    # words: a thread holds 8 consecutive words of one row (16 rows x 2 halves per warp)
    QL: gl.constexpr = gl.BlockedLayout([1, 8], [16, 2], [NW, 1], [1, 0])
    SL: gl.constexpr = gl.SliceLayout(1, QL)
    WL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, 64], gl.bfloat16)
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [2 * XS, BM, 64], x_desc.layout)
    w_smem = gl.allocate_shared_memory(gl.bfloat16, [4, BN, 64], WL)
    bars = gl.allocate_shared_memory(gl.int64, [XS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(XS):
        mbarrier.init(bars.index(i), count=1)

    n0 = gl.program_id(0) * OUT
    m0 = gl.program_id(1) * BM
    r = gl.arange(0, BN, layout=SL)
    if FUSED:  # rows 0 .. BN/2 - 1 gate, BN/2 .. BN - 1 the same outputs' up rows
        out = n0 + r % OUT
        rows = gl.where(out < N, out, 0).to(gl.int64) + (r // OUT) * up_offset
    else:
        out = n0 + r
        rows = gl.where(out < N, out, 0).to(gl.int64)
    words = gl.arange(0, 16, layout=gl.SliceLayout(0, QL))
    q_ptrs = qw_ptr + gl.expand_dims(rows * KW, 1) + gl.expand_dims(words, 0)
    s_ptrs = s_ptr + rows * G
    z_ptrs = z_ptr + rows * G

    for i in gl.static_range(XS):
        _load_x(x_desc, bars.index(i), x_smem, i, m0, i, G, BM)
    w, s, z = _load_group(q_ptrs, s_ptrs, z_ptrs, 0, G, HAS_ZEROS, SL)
    w1, s1, z1 = _load_group(q_ptrs, s_ptrs, z_ptrs, 1, G, HAS_ZEROS, SL)
    acc = gl.zeros([BM, BN], gl.float32, ACC)
    gl.assume(G > 0)  # no zero-trip path: zeros reaching the final wait serialize the wgmmas
    for g in range(G):
        buf = g % 2
        gl.thread_barrier()  # every warpgroup waited for group g - 2's MMAs
        if g >= 2:  # its x stage is free: group g - 2 + XS
            st = (g - 2) % XS
            _load_x(x_desc, bars.index(st), x_smem, st, m0, g - 2 + XS, G, BM)
        _dequant_store(w, s, z, w_smem.index(2 * buf), w_smem.index(2 * buf + 1), BN)
        fence_async_shared()
        gl.thread_barrier()  # the whole W tile is stored
        w, s, z = w1, s1, z1
        w1, s1, z1 = _load_group(q_ptrs, s_ptrs, z_ptrs, g + 2, G, HAS_ZEROS, SL)
        stage = g % XS
        mbarrier.wait(bars.index(stage), (g // XS) & 1)
        acc = warpgroup_mma(
            x_smem.index(2 * stage), w_smem.index(2 * buf).permute((1, 0)), acc,
            use_acc=g > 0, is_async=True,
        )  # fmt: skip
        acc = warpgroup_mma(
            x_smem.index(2 * stage + 1), w_smem.index(2 * buf + 1).permute((1, 0)), acc,
            is_async=True,
        )  # fmt: skip
        acc = warpgroup_mma_wait(num_outstanding=2, deps=[acc])
    acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
    for i in gl.static_range(XS):
        mbarrier.invalidate(bars.index(i))

    # epilogue: tokens x output rows
    EL: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [NW, 1], [1, 0])
    if FUSED:
        both = gl.convert_layout(acc, EL)
        gate, up = gl.split(gl.permute(gl.reshape(both, [BM, 2, OUT]), [0, 2, 1]))
        res = gate * (1.0 / (1.0 + gl.exp(-gate))) * up
        res = gl.convert_layout(res, EL)
    else:
        res = gl.convert_layout(acc, EL)
    t = m0 + gl.arange(0, BM, layout=gl.SliceLayout(1, EL))
    c = n0 + gl.arange(0, OUT, layout=gl.SliceLayout(0, EL))
    y_ptrs = y_ptr + gl.expand_dims(t.to(gl.int64) * stride_yt, 1) + gl.expand_dims(c, 0)
    mask = gl.expand_dims(t < T, 1) & gl.expand_dims(c < N, 0)
    gl.store(y_ptrs, res.to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- wgr: weights as A
# from registers (RS wgmma): no shared-memory traffic for the weights, x (the B operand, N =
# BT tokens) is the only operand read from shared memory


@gluon.constexpr_function
def _word_layout(num_warps):
    # [16 num_warps rows, 16 words]: lane l holds words 4a .. 4a + 3 (a = l % 4) of rows l / 4
    # and l / 4 + 8 (16-byte loads); relabelled below into the MMA's A operand (see tcg)
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2], [8, 0]],
        lane_bases=[[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16 << i, 0] for i in range(num_warps.bit_length() - 1)],
        block_bases=[],
        shape=[16 * num_warps, 16],
    )


@gluon.jit
def _planes_a(w, s, z, A: gl.constexpr, BM: gl.constexpr):
    # words [BM, 16] (column c: word pi(c), see tcg) -> the 8 planes (q - z) * s as bf16 A
    # operands [BM, 16]
    w = gl.reshape(gl.permute(gl.reshape(w, [BM, 4, 2, 2]), [0, 2, 1, 3]), [BM, 16])
    w = gl.convert_layout(w, A, assert_trivial=True)
    ce = gl.broadcast(gl.expand_dims((-128.0 - z).to(gl.bfloat16), 1), w)[0]
    sb = gl.broadcast(gl.expand_dims(s.to(gl.bfloat16), 1), w)[0]
    return gl.inline_asm_elementwise(
        _PLANES_SCALED, _CONSTRAINTS_SCALED, [w, ce, sb], dtype=(gl.bfloat16,) * 8,
        is_pure=True, pack=2,
    )  # fmt: skip


@gluon.jit
def _mma_group(p, x_smem, stage, acc):
    # the group's 8 plane MMAs (K = 16 each) on x stage `stage`, asynchronous
    for j in gl.static_range(8):
        b = x_smem.index(2 * stage + j // 4).slice(16 * (j % 4), 16, dim=1).permute((1, 0))
        acc = warpgroup_mma(p[j], b, acc, is_async=True)
    return acc


@gluon.jit(do_not_specialize=["T"])
def wgr(x_desc, qw_ptr, s_ptr, z_ptr, y_ptr, T, N, KW, G, up_offset, stride_yt,
        HAS_ZEROS: gl.constexpr, FUSED: gl.constexpr, BT: gl.constexpr,
        XS: gl.constexpr):  # fmt: skip
    # y[t, n] = sum_k x[t, k] W[n, k] (FUSED: silu(gate) * up, the first warpgroup's 64 rows
    # gate, the second's the same outputs' up rows) from x'' = permute_x_wgr(x) behind x_desc
    # (blocks [BT, 64]). grid (N / (BM or BM / 2), T / BT); acc [BM rows, BT tokens]
    NW: gl.constexpr = gl.num_warps()
    BM: gl.constexpr = 16 * NW
    OUT: gl.constexpr = BM // 2 if FUSED else BM
    ACC: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, BT, 16]
    )
    A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC, k_width=2)
    WL: gl.constexpr = _word_layout(NW)
    SL: gl.constexpr = gl.SliceLayout(1, A)
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [2 * XS, BT, 64], x_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [XS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(XS):
        mbarrier.init(bars.index(i), count=1)

    n0 = gl.program_id(0) * OUT
    m0 = gl.program_id(1) * BT
    rq = gl.arange(0, BM, layout=gl.SliceLayout(1, WL))
    rs = gl.arange(0, BM, layout=SL)
    if FUSED:
        oq = n0 + rq % OUT
        orow = n0 + rs % OUT
        rows_q = gl.where(oq < N, oq, 0).to(gl.int64) + (rq // OUT) * up_offset
        rows_s = gl.where(orow < N, orow, 0).to(gl.int64) + (rs // OUT) * up_offset
    else:
        rows_q = gl.where(n0 + rq < N, n0 + rq, 0).to(gl.int64)
        rows_s = gl.where(n0 + rs < N, n0 + rs, 0).to(gl.int64)
    words = gl.arange(0, 16, layout=gl.SliceLayout(0, WL))
    q_ptrs = qw_ptr + gl.expand_dims(rows_q * KW, 1) + gl.expand_dims(words, 0)
    s_ptrs = s_ptr + rows_s * G
    z_ptrs = z_ptr + rows_s * G

    for i in gl.static_range(XS):
        _load_x(x_desc, bars.index(i), x_smem, i, m0, i, G, BT)
    w, s, z = _load_group(q_ptrs, s_ptrs, z_ptrs, 0, G, HAS_ZEROS, SL)
    w1, s1, z1 = _load_group(q_ptrs, s_ptrs, z_ptrs, 1, G, HAS_ZEROS, SL)
    acc = gl.zeros([BM, BT], gl.float32, ACC)
    gl.assume(G > 0)  # no zero-trip path: zeros reaching the final wait serialize the wgmmas
    # group 0, then each group's MMAs are issued before the previous group's are waited for;
    # the planes of a group stay alive (wait deps) until their MMAs are done
    p = _planes_a(w, s, z, A, BM)
    mbarrier.wait(bars.index(0), 0)
    acc = _mma_group(p, x_smem, 0, acc)
    acc = warpgroup_mma_wait(num_outstanding=8, deps=[acc])  # returns at once: a tensor again
    for g in range(1, G):
        w, s, z = w1, s1, z1
        w1, s1, z1 = _load_group(q_ptrs, s_ptrs, z_ptrs, g + 1, G, HAS_ZEROS, SL)
        p_next = _planes_a(w, s, z, A, BM)
        stage = g % XS
        mbarrier.wait(bars.index(stage), (g // XS) & 1)
        acc = _mma_group(p_next, x_smem, stage, acc)
        waited = warpgroup_mma_wait(
            num_outstanding=8, deps=[acc, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]]
        )
        acc = waited[0]
        p = p_next
        gl.thread_barrier()  # both warpgroups are done with group g - 1's x stage
        _load_x(x_desc, bars.index((g - 1) % XS), x_smem, (g - 1) % XS, m0, g - 1 + XS, G, BT)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
    for i in gl.static_range(XS):
        mbarrier.invalidate(bars.index(i))

    # epilogue: rows x tokens -> y[t, n]
    EL: gl.constexpr = gl.BlockedLayout([4, 1], [8, 4], [1, NW], [0, 1])
    if FUSED:
        both = gl.convert_layout(acc, EL)
        gate, up = gl.split(gl.permute(gl.reshape(both, [2, OUT, BT]), [1, 2, 0]))
        res = gate * (1.0 / (1.0 + gl.exp(-gate))) * up
        res = gl.convert_layout(res, EL)
    else:
        res = gl.convert_layout(acc, EL)
    c = n0 + gl.arange(0, OUT, layout=gl.SliceLayout(1, EL))
    t = m0 + gl.arange(0, BT, layout=gl.SliceLayout(0, EL))
    y_ptrs = y_ptr + gl.expand_dims(t.to(gl.int64) * stride_yt, 0) + gl.expand_dims(c, 1)
    mask = gl.expand_dims(t < T, 0) & gl.expand_dims(c < N, 1)
    gl.store(y_ptrs, res.to(y_ptr.dtype.element_ty), mask=mask)
