"""Warp-specialized int4 prefill GEMM on Hopper wgmma, written in Gluon (kind "wgs"); imported
lazily by duoserve.quant.int4_wgs. sm_90 only: Gluon has no interpreter, so the CPU tests check
the launcher's refusals and compile this kernel for sm_90, and the GPU tests run it.

y [T, N] = x [T, K] @ W^T. A CTA owns BM tokens x BN weight rows (FUSED: the gate and up rows
of BN / 2 outputs, silu(gate) * up in the epilogue) and walks K (its split's half with SPLIT 2)
in steps of half a group (HS = 1) or a group (HS = 2). Two partitions share a ring of S stages,
each stage HS x tiles [BM, 64] and HS W tiles [BN, 64] in shared memory:

- producer (worker, PW warps): per group, loads the [BN, 16] words (AHEAD groups ahead in
  registers), turns each word into 4 bf16 pairs with one inline-asm block ((q - z) * s rounded
  once to bf16, bit for bit `dequantize_int4`'s weights; about 2 instructions per weight) and,
  per stage, waits for a free stage, issues the x tiles' TMA and stores the W tiles in natural
  K order (column 8 v + j is nibble j of the half's word v, so x needs no permutation).
- consumer (default, 8 warps = two warpgroups): waits for a full stage, issues its async
  wgmmas, waits for those of INFLIGHT steps before and frees that step's stage. SWAP: W is the
  A operand (each warpgroup m64 weight rows x n = BM tokens; gate/up rows interleaved per 16
  so a thread holds both rows of an output), the epilogue transposes through the x ring; else
  x is the A operand (each warpgroup BM / 2 tokens x BN rows).

Stage barriers: `ready[s]` completes on two arrivals, the TMA's expect (with its bytes) and the
producer's arrive after its W stores; `empty[s]` completes on the consumer's arrive. SPLIT 2:
the second CTA of a tile to finish adds the other's fp32 partial (through ws, counted in cnt).
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
        # selector nibble i picks byte i of t: byte 0 = byte k of w, byte 2 = byte k of w >> 1
        lines.append(f"prmt.b32 t, $4, sh, 0x{k:x}{4 + k:x}{k:x}{k:x};")
        lines.append("lop3.b32 t, t, 0x0078000f, 0x43004300, 0xea;")  # (t & mask) | magic
        lines.append("fma.rn.bf16x2 t, t, m, c;")
        lines.append(f"fma.rn.bf16x2 ${k}, t, sc, nz;")
    return "{\n" + "\n".join(lines) + "\n}"


_PAIRS = gl.constexpr(_pairs_asm())


@gluon.jit
def _load_group(q_ptrs, s_ptrs, z_ptrs, g, g_end, HAS_ZEROS: gl.constexpr, SL: gl.constexpr):
    # the [BN, 2, 8] words of group g (clamped: the prefetch past the end reloads the last) and
    # the rows' scales and zero points
    g = gl.minimum(g, g_end - 1)
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
def _halves(t):
    # [BN, 2, 8] -> its two [BN, 8] halves (the size-2 axis is inside each thread)
    return gl.split(gl.permute(t, [0, 2, 1]))


@gluon.jit
def _row_consts(w, s, z):
    # the rows' bf16x2 {-(128 + z), -(16 + z)} and {s, s}, broadcast to the words [BN, 2, 8]
    c = _bf16_bits(-128.0 - z) | (_bf16_bits(-16.0 - z) << 16)
    sb = _bf16_bits(s.to(gl.float32))
    c = gl.broadcast(gl.expand_dims(gl.expand_dims(c, 1), 2), w)[0]
    s2 = gl.broadcast(gl.expand_dims(gl.expand_dims(sb | (sb << 16), 1), 2), w)[0]
    return c, s2


@gluon.jit
def _half_tile(w, c, s2):
    # a half group's words [BN, 8] -> int32 [BN, 32] bf16 pairs in natural K order (column
    # 4 v + k holds inputs 8 v + 2 k and 8 v + 2 k + 1 of the half)
    o = gl.inline_asm_elementwise(
        _PAIRS, "=r,=r,=r,=r,r,r,r", [w, c, s2], dtype=(gl.int32,) * 4, is_pure=True, pack=1
    )
    a = gl.join(gl.join(o[0], o[1]), gl.join(o[2], o[3]))  # [BN, 8, i, j] = o[2 j + i]
    bn: gl.constexpr = w.shape[0]
    return gl.reshape(gl.permute(a, [0, 1, 3, 2]), [bn, 32])


@gluon.jit
def _fill_stage(x_desc, x_smem, w_smem, ready, empty, i, m0, k0, tiles, S: gl.constexpr,
                HS: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr):  # fmt: skip
    # step i: wait for its stage, TMA its x tile(s) from column k0, store the W tiles
    W32: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32)
    st = i % S
    mbarrier.wait(empty.index(st), ((i // S) & 1) ^ 1)  # fresh barriers: phase 1 done
    bar = ready.index(st)
    mbarrier.expect(bar, HS * BM * HALF * 2)
    for hh in gl.static_range(HS):
        tma.async_copy_global_to_shared(x_desc, [m0, k0 + hh * HALF], bar,
                                        x_smem.index(HS * st + hh))  # fmt: skip
        w_smem.index(HS * st + hh)._reinterpret(gl.int32, [BN, 32], W32).store(tiles[hh])
    fence_async_shared()
    gl.thread_barrier()  # every producer warp stored its rows
    mbarrier.arrive(bar, count=1)


@gluon.jit
def _producer(x_desc, qw_ptr, s_ptr, z_ptr, x_smem, w_smem, ready, empty, N, KW, G, up_offset,
              HAS_ZEROS: gl.constexpr, FUSED: gl.constexpr, BM: gl.constexpr,
              BN: gl.constexpr, S: gl.constexpr, PW: gl.constexpr, HS: gl.constexpr,
              AHEAD: gl.constexpr, SWAP: gl.constexpr, ROW_TILE0):  # fmt: skip
    OUT: gl.constexpr = BN // 2 if FUSED else BN
    # a thread holds 4 consecutive words of each half of one row: two 16-byte loads
    QL: gl.constexpr = gl.BlockedLayout([1, 2, 4], [16, 1, 2], [PW, 1, 1], [2, 1, 0])
    SL: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, QL))
    n0 = (ROW_TILE0 + gl.program_id(1)) * OUT
    m0 = gl.program_id(0) * BM
    r = gl.arange(0, BN, layout=SL)
    if FUSED and SWAP:  # per 16 rows: 8 outputs' gate rows, then the same outputs' up rows
        out = n0 + 8 * (r // 16) + r % 8
        rows = gl.where(out < N, out, 0).to(gl.int64) + ((r // 8) % 2) * up_offset
    elif FUSED:  # rows 0 .. BN/2 - 1 gate, BN/2 .. BN - 1 the same outputs' up rows
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

    # this split's groups g0 .. g0 + GS - 1; AHEAD groups of words in flight in registers, a
    # ring rotated by one each group
    GS = G // gl.num_programs(2)
    g0 = gl.program_id(2) * GS
    g_end = g0 + GS
    w0, s0, z0 = _load_group(q_ptrs, s_ptrs, z_ptrs, g0, g_end, HAS_ZEROS, SL)
    if AHEAD >= 2:
        w1, s1, z1 = _load_group(q_ptrs, s_ptrs, z_ptrs, g0 + 1, g_end, HAS_ZEROS, SL)
    if AHEAD >= 3:
        w2, s2, z2 = _load_group(q_ptrs, s_ptrs, z_ptrs, g0 + 2, g_end, HAS_ZEROS, SL)
    for g in range(GS):
        w_in, s_in, z_in = _load_group(q_ptrs, s_ptrs, z_ptrs, g0 + g + AHEAD, g_end,
                                       HAS_ZEROS, SL)  # fmt: skip
        c, sc = _row_consts(w0, s0, z0)
        wh = _halves(w0)
        ch = _halves(c)
        sh = _halves(sc)
        k0 = (g0 + g) * GROUP
        if HS == 2:  # one stage per group
            tiles = (_half_tile(wh[0], ch[0], sh[0]), _half_tile(wh[1], ch[1], sh[1]))
            _fill_stage(x_desc, x_smem, w_smem, ready, empty, g, m0, k0, tiles, S, HS, BM, BN)
        else:  # a stage per half group: a half's pairs are live at a time
            for hh in gl.static_range(2):
                tiles = (_half_tile(wh[hh], ch[hh], sh[hh]),)
                _fill_stage(x_desc, x_smem, w_smem, ready, empty, 2 * g + hh, m0,
                            k0 + hh * HALF, tiles, S, HS, BM, BN)  # fmt: skip
        if AHEAD == 1:
            w0, s0, z0 = w_in, s_in, z_in
        elif AHEAD == 2:
            w0, s0, z0 = w1, s1, z1
            w1, s1, z1 = w_in, s_in, z_in
        else:
            w0, s0, z0 = w1, s1, z1
            w1, s1, z1 = w2, s2, z2
            w2, s2, z2 = w_in, s_in, z_in


@gluon.jit
def _consumer(x_smem, w_smem, ready, empty, y_ptr, ws_ptr, cnt_ptr, T, N, G, stride_yt,
              FUSED: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, S: gl.constexpr,
              HS: gl.constexpr, SPLIT: gl.constexpr, INFLIGHT: gl.constexpr,
              SWAP: gl.constexpr, ROW_TILE0):  # fmt: skip
    # SWAP: the accumulator is [BN weight rows, BM tokens] (W the A operand, m64 x n = BM per
    # warpgroup), else [BM tokens, BN weight rows] (x the A operand)
    NW: gl.constexpr = gl.num_warps()
    OUT: gl.constexpr = BN // 2 if FUSED else BN
    A0: gl.constexpr = BN if SWAP else BM
    A1: gl.constexpr = BM if SWAP else BN
    ACC: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, A1, 16]
    )
    acc = gl.zeros([A0, A1], gl.float32, ACC)
    num_steps = 2 * (G // SPLIT) // HS
    for i in range(num_steps):
        st = i % S
        mbarrier.wait(ready.index(st), (i // S) & 1)
        for hh in gl.static_range(HS):
            xs = x_smem.index(HS * st + hh)
            ws = w_smem.index(HS * st + hh)
            if SWAP:
                acc = warpgroup_mma(ws, xs.permute((1, 0)), acc, use_acc=(i > 0) | (hh > 0),
                                    is_async=True)  # fmt: skip
            else:
                acc = warpgroup_mma(xs, ws.permute((1, 0)), acc, use_acc=(i > 0) | (hh > 0),
                                    is_async=True)  # fmt: skip
        # step i - INFLIGHT is done (in both warpgroups): its stage is free
        acc = warpgroup_mma_wait(num_outstanding=HS * INFLIGHT, deps=[acc])
        gl.thread_barrier()
        mbarrier.arrive(empty.index((i + S - INFLIGHT) % S), count=1, pred=i >= INFLIGHT)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])

    m0 = gl.program_id(0) * BM
    n0 = (ROW_TILE0 + gl.program_id(1)) * OUT
    last = True
    if SPLIT == 2:  # the second of the tile's two splits to finish adds the first's partial
        tile = gl.program_id(1) * gl.num_programs(0) + gl.program_id(0)
        i0 = gl.arange(0, A0, layout=gl.SliceLayout(1, ACC))
        i1 = gl.arange(0, A1, layout=gl.SliceLayout(0, ACC))
        part = gl.expand_dims(i0 * A1, 1) + gl.expand_dims(i1, 0)
        part = ws_ptr + (tile * 2).to(gl.int64) * BM * BN + part
        gl.store(part + gl.program_id(2) * BM * BN, acc)
        gl.thread_barrier()  # every thread's partial is written before the release below
        last = gl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel") == 1
        if last:
            # a + b == b + a in fp32: the sum does not depend on which split came first
            other = gl.load(part + (1 - gl.program_id(2)) * BM * BN, cache_modifier=".cg")
            acc = acc + other
            gl.atomic_xchg(cnt_ptr + tile, 0)  # reset for the next launch
    if last:
        if SWAP:
            _epilogue_swap(acc, x_smem, y_ptr, m0, n0, T, N, stride_yt, FUSED, BM, BN, NW)
        else:
            _epilogue(acc, y_ptr, m0, n0, T, N, stride_yt, FUSED, BM, BN, ACC)


@gluon.jit
def _epilogue(acc, y_ptr, m0, n0, T, N, stride_yt, FUSED: gl.constexpr, BM: gl.constexpr,
              BN: gl.constexpr, ACC: gl.constexpr):  # fmt: skip
    # straight from the accumulator's registers [BM tokens, BN columns]
    OUT: gl.constexpr = BN // 2 if FUSED else BN
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


@gluon.jit
def _epilogue_swap(acc, x_smem, y_ptr, m0, n0, T, N, stride_yt, FUSED: gl.constexpr,
                   BM: gl.constexpr, BN: gl.constexpr, NW: gl.constexpr):  # fmt: skip
    # [BN rows, BM tokens] -> y through shared memory (the x ring is free: every TMA landed)
    OUT: gl.constexpr = BN // 2 if FUSED else BN
    if FUSED:  # rows 16 b + i and 16 b + 8 + i: gate and up of output 8 b + i, in one thread
        a = gl.permute(gl.reshape(acc, [BN // 16, 2, 8, BM]), [0, 2, 3, 1])
        gate, up = gl.split(a)
        res = gl.reshape(gate * (1.0 / (1.0 + gl.exp(-gate))) * up, [OUT, BM])
    else:
        res = acc
    plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    buf = x_smem._reinterpret(gl.bfloat16, [BM, OUT], plain)
    buf.permute((1, 0)).store(res.to(gl.bfloat16))
    gl.thread_barrier()
    TC: gl.constexpr = OUT // 8  # threads along a row of outputs, 16 bytes each
    EL: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TC, TC], [NW, 1], [1, 0])
    val = buf.load(EL)
    t = m0 + gl.arange(0, BM, layout=gl.SliceLayout(1, EL))
    c = n0 + gl.arange(0, OUT, layout=gl.SliceLayout(0, EL))
    offs = gl.expand_dims(t.to(gl.int64) * stride_yt, 1) + gl.expand_dims(c, 0)
    mask = gl.expand_dims(t < T, 1) & gl.expand_dims(c < N, 0)
    gl.store(y_ptr + offs, val.to(y_ptr.dtype.element_ty), mask=mask)


@gluon.jit(do_not_specialize=["T"])
def wgs(x_desc, qw_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, T, N, KW, G, up_offset, stride_yt,
        row_tile0,
        HAS_ZEROS: gl.constexpr, FUSED: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
        S: gl.constexpr, PW: gl.constexpr, PREGS: gl.constexpr, HS: gl.constexpr,
        AHEAD: gl.constexpr, SPLIT: gl.constexpr, INFLIGHT: gl.constexpr,
        SWAP: gl.constexpr):  # fmt: skip
    # y[t, n] = sum_k x[t, k] W[n, k] (FUSED: silu(gate) * up, up rows at up_offset; N counts
    # outputs) for T tokens behind x_desc (blocks [BM, 64]); grid (T / BM, row tiles from
    # row_tile0, SPLIT). SPLIT 2: fp32 partials [tiles, 2, BM, BN] in ws, arrival counters in
    # cnt (zero before the launch, zero after it)
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
            (_consumer, (x_smem, w_smem, ready, empty, y_ptr, ws_ptr, cnt_ptr, T, N, G,
                         stride_yt, FUSED, BM, BN, S, HS, SPLIT, INFLIGHT, SWAP, row_tile0)),
            (_producer, (x_desc, qw_ptr, s_ptr, z_ptr, x_smem, w_smem, ready, empty, N, KW,
                         G, up_offset, HAS_ZEROS, FUSED, BM, BN, S, PW, HS, AHEAD, SWAP,
                         row_tile0)),
        ],
        [PW],
        [PREGS],
    )  # fmt: skip
