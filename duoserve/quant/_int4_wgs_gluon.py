"""Warp-specialized int4 prefill GEMM on Hopper wgmma, written in Gluon (kind "wgs"); imported
lazily by duoserve.quant.int4_wgs. sm_90 only: Gluon has no interpreter, so the CPU tests check
the launcher's refusals and compile this kernel for sm_90, and the GPU tests run it.

y [T, N] = x [T, K] @ W^T. A CTA owns BM tokens x BN weight rows (FUSED: BN / 2 gate rows and
the same outputs' BN / 2 up rows, silu(gate) * up in the epilogue) and walks K in steps of half
a group (64 inputs). Two partitions share a ring of S stages, each stage an x tile [BM, 64] and
a W tile [BN, 64] in shared memory:

- producer (worker, PW warps): per group, loads the [BN, 16] words (AHEAD groups ahead in
  registers), turns each word into 4 bf16 pairs with one inline-asm block ((q - z) * s rounded
  once to bf16, bit for bit `dequantize_int4`'s weights; about 2 instructions per weight) and,
  per stage, waits for a free stage, issues the x tile's TMA and stores the W tile in natural
  K order (column 8 v + j is nibble j of the half's word v, so x needs no permutation).
- consumer (default, 8 warps = two warpgroups of BM / 2 tokens): waits for a full stage, issues
  one async wgmma over it, waits for the previous step's wgmma and frees that stage.

Stage barriers: `ready[s]` completes on two arrivals, the TMA's expect (with its bytes) and the
producer's arrive after its W stores; `empty[s]` completes on the consumer's arrive.
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

GROUP = gl.constexpr(128)
HALF = gl.constexpr(64)  # K per step


def _pairs_asm() -> str:
    # $0..$3: nibbles (2k, 2k + 1) of word $4 as bf16x2 (k = 0..3, low half first), each
    # (q - z) * s rounded once to bf16. $5: the row's bf16x2 {-(128 + z), -(16 + z)}, $6: its
    # {s, s}. Byte k of the word goes to the low half as is and to the high half from
    # w >> 1, so its high nibble lands in mantissa bits 3..6 (bit 7 is the exponent's lowest):
    # 0x4300 | bits is 128 + q (low) or 128 + 8 q (high); times {1, 1/8} and plus $5: q - z.
    lines = [
        ".reg .b32 t, sh, m, c, sc, nz;",
        "mov.b32 c, $5;",
        "mov.b32 sc, $6;",
        "mov.b32 m, 0x3e003f80;",  # bf16x2 {1.0 low, 0.125 high}
        "mov.b32 nz, 0x80008000;",  # bf16x2 -0.0
        "shr.u32 sh, $4, 1;",
    ]
    for k in range(4):
        lines.append(f"prmt.b32 t, $4, sh, 0x{4 + k:x}{k:x}{4 + k:x}{k:x};")
        lines.append("lop3.b32 t, t, 0x0078000f, 0x43004300, 0xea;")  # (t & mask) | magic
        lines.append("fma.rn.bf16x2 t, t, m, c;")
        lines.append(f"fma.rn.bf16x2 ${k}, t, sc, nz;")
    return "{\n" + "\n".join(lines) + "\n}"


_PAIRS = gl.constexpr(_pairs_asm())


@gluon.jit
def _load_group(q_ptrs, s_ptrs, z_ptrs, g, G, HAS_ZEROS: gl.constexpr, SL: gl.constexpr):
    # the [BN, 2, 8] words of group g (clamped: the prefetch past the end reloads the last) and
    # the rows' scales and zero points
    g = gl.minimum(g, G - 1)
    w = gl.load(q_ptrs + g * 16)
    s = gl.load(s_ptrs + g)
    if HAS_ZEROS:
        z = gl.load(z_ptrs + g).to(gl.float32)
    else:
        z = gl.full(s_ptrs.shape, 8.0, gl.float32, SL)
    return w, s, z


@gluon.jit
def _bf16_bits(v):
    # fp32 -> its bf16 bits in the low half of an int32
    return v.to(gl.bfloat16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF


@gluon.jit
def _planes(w, s, z):
    # words [BN, 2, 8] -> the group's halves, two int32 [BN, 32] tiles of bf16 pairs in natural
    # K order (int32 column 4 v + k holds inputs 8 v + 2 k and 8 v + 2 k + 1 of the half)
    c = _bf16_bits(-128.0 - z) | (_bf16_bits(-16.0 - z) << 16)
    sb = _bf16_bits(s.to(gl.float32))
    c = gl.broadcast(gl.expand_dims(gl.expand_dims(c, 1), 2), w)[0]
    s2 = gl.broadcast(gl.expand_dims(gl.expand_dims(sb | (sb << 16), 1), 2), w)[0]
    o = gl.inline_asm_elementwise(
        _PAIRS, "=r,=r,=r,=r,r,r,r", [w, c, s2], dtype=(gl.int32,) * 4, is_pure=True, pack=1
    )
    a = gl.join(gl.join(o[0], o[1]), gl.join(o[2], o[3]))  # [BN, 2, 8, i, j] = o[2 j + i]
    bn: gl.constexpr = w.shape[0]
    a = gl.reshape(gl.permute(a, [0, 1, 2, 4, 3]), [bn, 2, 32])  # [BN, half, 4 v + k]
    return gl.split(gl.permute(a, [0, 2, 1]))


@gluon.jit
def _producer(x_desc, qw_ptr, s_ptr, z_ptr, x_smem, w_smem, ready, empty, N, KW, G, up_offset,
              HAS_ZEROS: gl.constexpr, FUSED: gl.constexpr, BM: gl.constexpr,
              BN: gl.constexpr, S: gl.constexpr, PW: gl.constexpr, HS: gl.constexpr,
              AHEAD: gl.constexpr):  # fmt: skip
    OUT: gl.constexpr = BN // 2 if FUSED else BN
    # a thread holds 4 consecutive words of each half of one row: two 16-byte loads
    QL: gl.constexpr = gl.BlockedLayout([1, 2, 4], [16, 1, 2], [PW, 1, 1], [2, 1, 0])
    # the bf16 [BN, 64] W tiles as int32 [BN, 32]: the same 128-byte rows and swizzle
    W32: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32)
    SL: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, QL))
    n0 = gl.program_id(1) * OUT
    m0 = gl.program_id(0) * BM
    r = gl.arange(0, BN, layout=SL)
    if FUSED:  # rows 0 .. BN/2 - 1 gate, BN/2 .. BN - 1 the same outputs' up rows
        out = n0 + r % OUT
        rows = gl.where(out < N, out, 0).to(gl.int64) + (r // OUT) * up_offset
    else:
        out = n0 + r
        rows = gl.where(out < N, out, 0).to(gl.int64)
    h = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, QL)))
    v = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, QL)))
    words = gl.expand_dims(gl.expand_dims(h * 8, 0), 2) + gl.expand_dims(gl.expand_dims(v, 0), 1)
    q_ptrs = qw_ptr + gl.expand_dims(gl.expand_dims(rows * KW, 1), 2) + words
    s_ptrs = s_ptr + rows * G
    z_ptrs = z_ptr + rows * G

    # AHEAD groups of words in flight in registers: a ring rotated by one each group
    w0, s0, z0 = _load_group(q_ptrs, s_ptrs, z_ptrs, 0, G, HAS_ZEROS, SL)
    if AHEAD >= 2:
        w1, s1, z1 = _load_group(q_ptrs, s_ptrs, z_ptrs, 1, G, HAS_ZEROS, SL)
    if AHEAD >= 3:
        w2, s2, z2 = _load_group(q_ptrs, s_ptrs, z_ptrs, 2, G, HAS_ZEROS, SL)
    for g in range(G):
        w_in, s_in, z_in = _load_group(q_ptrs, s_ptrs, z_ptrs, g + AHEAD, G, HAS_ZEROS, SL)
        halves = _planes(w0, s0, z0)
        if AHEAD == 1:
            w0, s0, z0 = w_in, s_in, z_in
        elif AHEAD == 2:
            w0, s0, z0 = w1, s1, z1
            w1, s1, z1 = w_in, s_in, z_in
        else:
            w0, s0, z0 = w1, s1, z1
            w1, s1, z1 = w2, s2, z2
            w2, s2, z2 = w_in, s_in, z_in
        if HS == 2:  # one stage per group
            st = g % S
            mbarrier.wait(empty.index(st), ((g // S) & 1) ^ 1)  # fresh barriers: phase 1 done
            bar = ready.index(st)
            mbarrier.expect(bar, 2 * BM * HALF * 2)
            for hh in gl.static_range(2):
                tma.async_copy_global_to_shared(x_desc, [m0, g * GROUP + hh * HALF], bar,
                                                x_smem.index(2 * st + hh))  # fmt: skip
            w_smem.index(2 * st)._reinterpret(gl.int32, [BN, 32], W32).store(halves[0])
            w_smem.index(2 * st + 1)._reinterpret(gl.int32, [BN, 32], W32).store(halves[1])
            fence_async_shared()
            gl.thread_barrier()  # every producer warp stored its rows
            mbarrier.arrive(bar, count=1)
        else:  # a stage per half group
            for hh in gl.static_range(2):
                i = 2 * g + hh
                st = i % S
                mbarrier.wait(empty.index(st), ((i // S) & 1) ^ 1)
                bar = ready.index(st)
                mbarrier.expect(bar, BM * HALF * 2)
                tma.async_copy_global_to_shared(x_desc, [m0, g * GROUP + hh * HALF], bar,
                                                x_smem.index(st))  # fmt: skip
                w_smem.index(st)._reinterpret(gl.int32, [BN, 32], W32).store(halves[hh])
                fence_async_shared()
                gl.thread_barrier()
                mbarrier.arrive(bar, count=1)


@gluon.jit
def _consumer(x_smem, w_smem, ready, empty, y_ptr, T, N, G, stride_yt, FUSED: gl.constexpr,
              BM: gl.constexpr, BN: gl.constexpr, S: gl.constexpr, HS: gl.constexpr):  # fmt: skip
    NW: gl.constexpr = gl.num_warps()
    OUT: gl.constexpr = BN // 2 if FUSED else BN
    ACC: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, BN, 16]
    )
    acc = gl.zeros([BM, BN], gl.float32, ACC)
    num_steps = 2 * G // HS
    for i in range(num_steps):
        st = i % S
        mbarrier.wait(ready.index(st), (i // S) & 1)
        for hh in gl.static_range(HS):
            acc = warpgroup_mma(
                x_smem.index(HS * st + hh), w_smem.index(HS * st + hh).permute((1, 0)), acc,
                use_acc=(i > 0) | (hh > 0), is_async=True,
            )  # fmt: skip
        acc = warpgroup_mma_wait(num_outstanding=HS, deps=[acc])  # step i - 1 is done
        gl.thread_barrier()  # in both warpgroups
        mbarrier.arrive(empty.index((i + S - 1) % S), count=1, pred=i > 0)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])

    # epilogue straight from the accumulator's registers: tokens x output columns
    m0 = gl.program_id(0) * BM
    n0 = gl.program_id(1) * OUT
    t = m0 + gl.arange(0, BM, layout=gl.SliceLayout(1, ACC))
    c = gl.arange(0, BN, layout=gl.SliceLayout(0, ACC))
    col = n0 + (c % OUT)
    offs = gl.expand_dims(t.to(gl.int64) * stride_yt, 1) + gl.expand_dims(col, 0)
    ok = (gl.expand_dims(t < T, 1) & gl.expand_dims(col < N, 0)).to(gl.int8)
    if FUSED:  # columns c and c + OUT are the same output's gate and up: in one thread
        gate, up = gl.split(gl.permute(gl.reshape(acc, [BM, 2, OUT]), [0, 2, 1]))
        offs, _o = gl.split(gl.permute(gl.reshape(offs, [BM, 2, OUT]), [0, 2, 1]))
        ok, _k = gl.split(gl.permute(gl.reshape(ok, [BM, 2, OUT]), [0, 2, 1]))
        res = gate * (1.0 / (1.0 + gl.exp(-gate))) * up
    else:
        res = acc
    gl.store(y_ptr + offs, res.to(y_ptr.dtype.element_ty), mask=ok != 0)


@gluon.jit(do_not_specialize=["T"])
def wgs(x_desc, qw_ptr, s_ptr, z_ptr, y_ptr, T, N, KW, G, up_offset, stride_yt,
        HAS_ZEROS: gl.constexpr, FUSED: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
        S: gl.constexpr, PW: gl.constexpr, PREGS: gl.constexpr, HS: gl.constexpr,
        AHEAD: gl.constexpr):  # fmt: skip
    # y[t, n] = sum_k x[t, k] W[n, k] (FUSED: silu(gate) * up, up rows at up_offset; N counts
    # outputs) for T tokens behind x_desc (blocks [BM, 64]); grid (T / BM, N / (BN or BN / 2))
    WL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, HALF], gl.bfloat16)
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [S * HS, BM, HALF], x_desc.layout)
    w_smem = gl.allocate_shared_memory(gl.bfloat16, [S * HS, BN, HALF], WL)
    ready = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(S):
        mbarrier.init(ready.index(i), count=2)
        mbarrier.init(empty.index(i), count=1)
    gl.assume(G > 0)  # no zero-trip path: zeros reaching the final wait serialize the wgmmas
    gl.warp_specialize(
        [
            (_consumer, (x_smem, w_smem, ready, empty, y_ptr, T, N, G, stride_yt, FUSED, BM,
                         BN, S, HS)),
            (_producer, (x_desc, qw_ptr, s_ptr, z_ptr, x_smem, w_smem, ready, empty, N, KW,
                         G, up_offset, HAS_ZEROS, FUSED, BM, BN, S, PW, HS, AHEAD)),
        ],
        [PW],
        [PREGS],
    )  # fmt: skip
