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
