"""Triton kernels for int4 experts; imported lazily by duoserve.quant.triton_kernels.

Format: duoserve/quant/int4.py. Shapes: N weight rows, K input, KW = K / 8 int32 words per row,
T tokens, WG = GROUP / 8 words per group. Dequantization never converts int -> float (I2F runs at
a quarter of the FMA rate).

- ``stream`` (decode, 1..4 tokens, FMA units): a program streams BN whole rows through
  [G groups, BN rows, WG words] int32 tiles. A word is shifted once per nibble pair so that
  nibble j starts at bit pos_j (15 for even j, 19 for odd); one LOP3 masks it and ORs in the
  bits of 1.0, giving the float m_j = 1 + q_j 2^(pos_j - 23). x comes from ``prep_x`` as fp32
  x'[t, j, w] = x[t, 8w + j] 2^(23 - pos_j) (so m_j x'_j = x'_j + q_j x_j, exactly), with
  row 8 = -sum_j x and row 9 = -sum_j x'_j per word. Per word the partial dot starts at
  -(sum_j x'_j + z sum_j x_j) (one FFMA), so the lifts cancel inside the word and only
  fp32 rounding of a sum about 256x the term is left (relative error ~1e-6, tested): per
  weight one LOP3, one FFMA and half a shift, against LOP3 + FADD + FFMA with the 2^23 magic
  of the round-1 kernels. x' is zero past K and T, so its loads carry no masks; its row
  stride is a constexpr (immediate offsets). x'_j is as contiguous as the weight words:
  16-byte loads, a thread owns 4 words of one group for all BN rows (x'_j loaded once for
  BN rows), nothing crosses threads until the one reduction per program. No split-K.
  On sm_90 ``prep_x`` and ``stream`` are launched as programmatic dependents (PDL): stream's
  programs start while prep_x runs, load their first weights, then wait for x'.
  HALF (``KernelConfig.half``): ``prep_xh`` writes x as fp16 pairs rescaled per 4-word chunk
  by a power of two, and one asm block (``_HALF_DOT``) sums a thread's 32 products of a
  (group, row) in fp16x2 (LOP3 + HSUB2 + HFMA2 per weight pair), ~5e-4 relative error.
- Round-1 magic: nibble j is masked *in place* and OR-ed into the bits of 2^23, giving the
  float 2^23 + q * 2^pos (pos < 20, exact); subtracting 2^23 gives q * 2^pos exactly, and
  2^-pos is folded into x.
- ``gemv`` / ``mma`` (round 1, kept as sweep candidates): walk K one group at a time with
  [BN, WG, 1] tiles, split-K with an arrival counter; mma puts the group's weights on tensor cores.
- ``dequant``: int4 -> bf16 [N, K] for the dequant + cuBLAS prefill.

Why not [BN, BK/8] tiles unpacked to [BN, BK/8, 8] (the second version): triton spreads the 8
nibbles of a word over 8 lanes, so every word went through shared memory and every dot through
shuffles (sm_90 SASS: 900 SHFL, 8-byte loads, spills, no cp.async).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"  # fixed when decorated
MAGIC = 0x4B000000  # bits of 2^23 as fp32
STREAM_MAGIC = 0x3F800000  # bits of 1.0 as fp32
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
def _stream_lift():
    # x'_j's factor 2^(23 - pos_j): _pair_bits puts nibble j at bit pos_j (15 for even j, 19
    # for odd: a pair shares one shift)
    j = tl.arange(0, 8)
    pos = 15 + 4 * (j % 2)
    return ((127 + 23 - pos) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _prep_words(x_ptr, T, KW, stride_x, BW: tl.constexpr, PDL: tl.constexpr):
    # program (t, block): token t, words w [BW] and x[t, 8 w + j] as fp32 [BW, 8], zero past
    # token T and word KW. PDL: launched as a programmatic dependent (x may be the previous
    # kernel's output); the stream kernel may launch at once (it waits for this one's output)
    t = tl.program_id(0)
    w, xv = _prep_load(x_ptr + t * stride_x, t < T, KW, BW, PDL)
    return t, w, xv


@triton.jit
def _prep_load(x_row, valid, KW, BW: tl.constexpr, PDL: tl.constexpr):
    # words w [BW] of block program_id(1) and x_row[8 w + j] as fp32 [BW, 8], zero past word KW
    # and where not valid
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    w = tl.program_id(1) * BW + tl.arange(0, BW)
    ok = (w[:, None] < KW) & valid
    x_offs = w[:, None] * 8 + tl.arange(0, 8)[None, :]  # [BW, 8]
    return w, tl.load(x_row + x_offs, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _pick(e, v0, v1, v2, v3, v4, v5, v6, v7):
    # the e-th of eight scalars (the grouped kernels' per-expert arguments)
    lo = tl.where(e == 0, v0, tl.where(e == 1, v1, tl.where(e == 2, v2, v3)))
    hi = tl.where(e == 4, v4, tl.where(e == 5, v5, tl.where(e == 6, v6, v7)))
    return tl.where(e < 4, lo, hi)


@triton.jit
def prep_x(x_ptr, xp_ptr, T, KW, stride_x, SX: tl.constexpr, BW: tl.constexpr,
           PDL: tl.constexpr):  # fmt: skip
    # x [T, 8 KW] -> xp [BT, 10, SX] fp32 (see the module docstring), zero past token T and
    # word KW, so the stream kernel's x' loads need no masks; grid (BT, SX / BW)
    t, w, xv = _prep_words(x_ptr, T, KW, stride_x, BW, PDL)
    _store_x(xp_ptr + t * 10 * SX, w, xv, SX)


@triton.jit
def _store_x(base, w, xv, SX: tl.constexpr):
    # one token's words w of prep_x's rows at base
    xs = xv * _stream_lift()[None, :]
    inside = w < SX
    tl.store(base + w[:, None] + tl.arange(0, 8)[None, :] * SX, xs, mask=inside[:, None])
    tl.store(base + 8 * SX + w, -tl.sum(xv, axis=1), mask=inside)
    tl.store(base + 9 * SX + w, -tl.sum(xs, axis=1), mask=inside)


@triton.jit(do_not_specialize=["KW", "stride_x", "r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7"])
def prep_grouped(x_ptr, xp_ptr, KW, stride_x, r0, r1, r2, r3, r4, r5, r6, r7,
                 SX: tl.constexpr, BW: tl.constexpr, BT: tl.constexpr, HALF: tl.constexpr,
                 PDL: tl.constexpr):  # fmt: skip
    # prep_x (HALF: prep_xh) for up to 8 experts at once: expert e's tokens are the rows
    # lo .. lo + T - 1 of x (r_e = lo << 8 | T, T <= BT), its block xp[e BT .. e BT + BT - 1]
    # (zero past T); grid (experts x BT, SX / BW)
    i = tl.program_id(0)
    r = _pick(i // BT, r0, r1, r2, r3, r4, r5, r6, r7)
    t = i % BT
    w, xv = _prep_load(x_ptr + ((r >> 8) + t).to(tl.int64) * stride_x, t < (r & 255), KW, BW, PDL)
    if HALF:
        _store_xh(xp_ptr + i * 5 * SX, w, xv, SX, BW)
    else:
        _store_x(xp_ptr + i * 10 * SX, w, xv, SX)


def _half_dot_asm() -> str:
    # pack=4 over the 4 consecutive words a thread owns of one (group, row): $0..$3 <- acc
    # ($4..$7) with $0 += s ($8) * sum over the words ($12..$15) of sum_j (q_j - z) x~_j, the
    # products summed in fp16x2 (two chains, 16 products each, then one add), converted once.
    # $16: {1024 + z} x2, $20: {1024 + 16 z} x2 (fp16); $24 + 4 i + k: x~ pair i of word k (see
    # prep_xh). (w & 0x000f000f) | 0x64006400 is {1024 + q_0, 1024 + q_4}; with mask
    # 0x00f000f0 it is {1024 + 16 q_1, 1024 + 16 q_5}, met by x~ / 16; w >> 8 gives q_2, q_6
    # and q_3, q_7 the same way. Inputs are copied before any output is written.
    lines = [
        ".reg .b32 t, p, ha, hb, z0, z1, a1, a2, a3;",
        ".reg .b16 lo, hi;",
        ".reg .f32 fa, fb;",
        "mov.b32 z0, $16;",
        "mov.b32 z1, $20;",
        "mov.b32 a1, $5;",
        "mov.b32 a2, $6;",
        "mov.b32 a3, $7;",
        "mov.b32 ha, 0;",
        "mov.b32 hb, 0;",
    ]
    for k in range(4):
        q = f"${12 + k}"
        lines.append(f"shr.u32 t, {q}, 8;")
        for i in range(4):
            mask = "0x000f000f" if i % 2 == 0 else "0x00f000f0"
            lines.append(f"lop3.b32 p, {q if i < 2 else 't'}, {mask}, 0x64006400, 0xea;")
            lines.append(f"sub.f16x2 p, p, {'z0' if i % 2 == 0 else 'z1'};")
            h = "ha" if i < 2 else "hb"
            lines.append(f"fma.rn.f16x2 {h}, p, ${24 + 4 * i + k}, {h};")
    lines += [
        "add.f16x2 ha, ha, hb;",
        "mov.b32 {lo, hi}, ha;",
        "cvt.f32.f16 fa, lo;",
        "cvt.f32.f16 fb, hi;",
        "add.f32 fa, fa, fb;",
        "fma.rn.f32 $0, fa, $8, $4;",
        "mov.b32 $1, a1;",
        "mov.b32 $2, a2;",
        "mov.b32 $3, a3;",
    ]
    return "{\n" + "\n".join(lines) + "\n}"


_HALF_DOT = tl.constexpr(_half_dot_asm())
_HALF_CONSTRAINTS = tl.constexpr("=f," * 4 + "f," * 8 + "r," * 27 + "r")


@triton.jit
def prep_xh(x_ptr, xh_ptr, T, KW, stride_x, SX: tl.constexpr, BW: tl.constexpr,
            PDL: tl.constexpr):  # fmt: skip
    # x [T, 8 KW] -> xh [BT, 5, SX] int32 for the fp16 stream (HALF); grid (BT, SX / BW). Per
    # chunk of 4 words (the 32 inputs one stream thread sums in fp16), x~ = x 2^e with 2^e
    # the power of two putting the chunk's max |x| in [32, 64), so its 32 products
    # |q - z| |x~| <= 15 * 64 sum below fp16's 65504, and bf16 x is exact in fp16. Row i < 4,
    # word w: the fp16 pair {x~[8w + i], x~[8w + i + 4]}, divided by 16 for odd i; row 4, word
    # w: 2^-e of w's chunk (fp32 bits). Zero past word KW and token T (no masks downstream)
    t, w, xv = _prep_words(x_ptr, T, KW, stride_x, BW, PDL)
    _store_xh(xh_ptr + t * 5 * SX, w, xv, SX, BW)


@triton.jit
def _store_xh(base, w, xv, SX: tl.constexpr, BW: tl.constexpr):
    # one token's words w of prep_xh's rows at base
    chunk_max = tl.max(tl.reshape(tl.abs(xv), (BW // 4, 32)), axis=1)
    biased = (chunk_max.to(tl.int32, bitcast=True) >> 23) & 255
    biased = tl.maximum(biased, 6)  # 0 (all zeros) and tiny maxima: a normal 2^-e
    scale = ((259 - biased) << 23).to(tl.float32, bitcast=True)  # 2^(132 - biased)
    inv = ((biased - 5) << 23).to(tl.int32)  # bits of 2^(biased - 132)
    scale = tl.reshape(tl.broadcast_to(scale[:, None], (BW // 4, 4)), (BW,))
    inv = tl.reshape(tl.broadcast_to(inv[:, None], (BW // 4, 4)), (BW,))
    xs = tl.reshape(xv * scale[:, None], (BW, 2, 4))  # [w, h, i]: x~[8w + 4h + i]
    lo, hi = tl.split(tl.permute(xs, (0, 2, 1)))  # [BW, 4]: i and i + 4
    f = tl.where(tl.arange(0, 4) % 2 == 1, 0.0625, 1.0)[None, :]
    lo = (lo * f).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi = (hi * f).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    inside = w < SX
    tl.store(
        base + tl.arange(0, 4)[None, :] * SX + w[:, None], lo | (hi << 16), mask=inside[:, None]
    )
    tl.store(base + 4 * SX + w, inv, mask=inside)


@triton.jit
def _pair_bits(q, jp: tl.constexpr):
    # the word shifted so that nibble 2 jp starts at bit 15 and nibble 2 jp + 1 at bit 19
    s: tl.constexpr = 15 - 8 * jp
    if s > 0:
        return q << s
    else:
        return q >> (-s)


@triton.jit
def _stream_tile(q_ptrs, s_ptr, z_ptr, sz_offs, g_ids, kw0, KW, HAS_ZEROS: tl.constexpr,
                 WG: tl.constexpr, EVEN: tl.constexpr):  # fmt: skip
    # the [G, BN, WG] words, [G, BN, 1] scales and zero points (fp32) of the step at word kw0;
    # unless the steps tile K (EVEN), whole groups past the end are masked (no traffic)
    if EVEN:
        q = tl.load(q_ptrs + kw0)
        s = tl.load(s_ptr + sz_offs + kw0 // WG).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_ptr + sz_offs + kw0 // WG).to(tl.float32)
        else:
            z = tl.zeros_like(s) + 8.0
    else:
        ok = kw0 // WG + g_ids < KW // WG  # [G, 1, 1]
        q = tl.load(q_ptrs + kw0, mask=ok, other=0)
        s = tl.load(s_ptr + sz_offs + kw0 // WG, mask=ok, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_ptr + sz_offs + kw0 // WG, mask=ok, other=0).to(tl.float32)
        else:
            z = tl.zeros_like(s) + 8.0
    return q, s, z


@triton.jit
def _tok_step(acc, q, s, z, xp_ptrs, magic, t: tl.constexpr, SX: tl.constexpr):
    # acc [G, BN, WG] += s * sum_j (q_j - z) x_j of token t over one step: per word
    # p = -(lift + z xsum) + sum_j m_j x'_j with m_j = 1 + q_j 2^(pos_j - 23), so m_j x'_j =
    # x'_j + q_j x_j exactly and the lifts cancel in p. Past K and T x' is zero: p = 0
    xt = xp_ptrs + t * 10 * SX
    p = z * tl.load(xt + 8 * SX) + tl.load(xt + 9 * SX)
    for jp in tl.static_range(4):
        bits = _pair_bits(q, jp)
        for h in tl.static_range(2):
            m = ((bits & (15 << (15 + 4 * h))) | magic).to(tl.float32, bitcast=True)
            p += m * tl.load(xt + (2 * jp + h) * SX)
    return acc + s * p


@triton.jit
def _tok_step_h(acc, q, s, z, xh_ptrs, t: tl.constexpr, SX: tl.constexpr,
                USE_ASM: tl.constexpr):  # fmt: skip
    # HALF: acc [G, BN, WG] += s * sum_j (q_j - z) x~_j of token t over one step, the products
    # summed in fp16x2 per thread and (group, row) (_HALF_DOT); without asm (the interpreter)
    # the same x~ pairs in fp32
    xt = xh_ptrs + t * 5 * SX
    s = s * tl.load(xt + 4 * SX).to(tl.float32, bitcast=True)  # the chunk's 2^-e
    x0 = tl.load(xt)
    x1 = tl.load(xt + SX)
    x2 = tl.load(xt + 2 * SX)
    x3 = tl.load(xt + 3 * SX)
    if USE_ASM:
        zi = z.to(tl.int32)
        z0 = tl.broadcast_to((zi | 0x6400) * 65537, q.shape)
        z1 = tl.broadcast_to(((zi << 4) | 0x6400) * 65537, q.shape)
        return tl.inline_asm_elementwise(
            _HALF_DOT, _HALF_CONSTRAINTS,
            [acc, s, q, z0, z1, tl.broadcast_to(x0, q.shape),
             tl.broadcast_to(x1, q.shape), tl.broadcast_to(x2, q.shape),
             tl.broadcast_to(x3, q.shape)],
            dtype=tl.float32, is_pure=True, pack=4,
        )  # fmt: skip
    p = _half_pair(q, z, x0, 0) + _half_pair(q, z, x1, 1)
    p += _half_pair(q, z, x2, 2) + _half_pair(q, z, x3, 3)
    return acc + s * p


@triton.jit
def _half_pair(q, z, xi, i: tl.constexpr):
    # (q_i - z) x~_i + (q_{i+4} - z) x~_{i+4} from the fp16 pair xi (x~ / 16 for odd i), in fp32
    f: tl.constexpr = 16.0 if i % 2 == 1 else 1.0
    lo = (xi & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = ((xi >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    n_lo = ((q >> (4 * i)) & 15).to(tl.float32)
    n_hi = ((q >> (4 * i + 16)) & 15).to(tl.float32)
    return ((n_lo - z) * lo + (n_hi - z) * hi) * f


@triton.jit
def _stream_step(acc0, acc1, acc2, acc3, q, s, z, xp_ptrs, magic, BT: tl.constexpr,
                 SX: tl.constexpr, HALF: tl.constexpr):  # fmt: skip
    # the step for tokens t < BT (the nibble bits are recomputed per token: ptxas keeps them).
    # HALF 0: fp32 lifted products (prep_x); 1: fp16x2 asm (prep_xh); 2: its fp32 emulation
    acc0 = _tok(acc0, q, s, z, xp_ptrs, magic, 0, SX, HALF)
    if BT > 1:
        acc1 = _tok(acc1, q, s, z, xp_ptrs, magic, 1, SX, HALF)
    if BT > 2:
        acc2 = _tok(acc2, q, s, z, xp_ptrs, magic, 2, SX, HALF)
        acc3 = _tok(acc3, q, s, z, xp_ptrs, magic, 3, SX, HALF)
    return acc0, acc1, acc2, acc3


@triton.jit
def _tok(acc, q, s, z, xp_ptrs, magic, t: tl.constexpr, SX: tl.constexpr, HALF: tl.constexpr):
    if HALF:
        return _tok_step_h(acc, q, s, z, xp_ptrs, t, SX, HALF == 1)
    return _tok_step(acc, q, s, z, xp_ptrs, magic, t, SX)


@triton.jit
def _stream_pass(xp_ptr, q_ptr, s_ptr, z_ptr, rows, KW, stride_q, stride_s, magic,
                 HAS_ZEROS: tl.constexpr, GROUP: tl.constexpr, G: tl.constexpr,
                 BT: tl.constexpr, NS: tl.constexpr, PREFETCH: tl.constexpr, SX: tl.constexpr,
                 EVEN: tl.constexpr, PDL: tl.constexpr, AHEAD: tl.constexpr,
                 HALF: tl.constexpr):  # fmt: skip
    # rows [BN] -> y_t [BN] = sum_k W[rows, k] x_t[k] for tokens t < BT (zeros for t >= T).
    # PREFETCH: the tiles of the next AHEAD (1 or 2) steps load into registers before this
    # step computes, so a program keeps its loads in flight while it computes (NS > 1 goes
    # through shared memory)
    WG: tl.constexpr = GROUP // 8
    STEP: tl.constexpr = G * WG
    g_ids = tl.arange(0, G)[:, None, None]
    word = g_ids * WG + tl.arange(0, WG)[None, None, :]  # [G, 1, WG]
    q_ptrs = q_ptr + rows[None, :, None] * stride_q + word  # [G, BN, WG]
    sz_offs = rows[None, :, None] * stride_s + g_ids  # [G, BN, 1]
    zero = tl.zeros([G, rows.shape[0], WG], tl.float32)
    acc0, acc1, acc2, acc3 = zero, zero, zero, zero
    if PREFETCH:
        q, s, z = _stream_tile(q_ptrs, s_ptr, z_ptr, sz_offs, g_ids, 0, KW, HAS_ZEROS, WG, EVEN)
        if AHEAD > 1:
            kw_1 = STEP
            if EVEN:
                kw_1 = tl.multiple_of(tl.minimum(kw_1, KW - STEP), STEP)
            q1, s1, z1 = _stream_tile(
                q_ptrs, s_ptr, z_ptr, sz_offs, g_ids, kw_1, KW, HAS_ZEROS, WG, EVEN
            )
        if PDL:
            gdc_wait()  # the first weights are in flight; x' is written by prep_x
        for kw0 in range(0, KW, STEP):
            # the last prefetches would read past K: EVEN re-reads the last step instead (no
            # masks), else they are masked
            kw_n = kw0 + AHEAD * STEP
            if EVEN:
                kw_n = tl.multiple_of(tl.minimum(kw_n, KW - STEP), STEP)
            q_n, s_n, z_n = _stream_tile(
                q_ptrs, s_ptr, z_ptr, sz_offs, g_ids, kw_n, KW, HAS_ZEROS, WG, EVEN
            )
            acc0, acc1, acc2, acc3 = _stream_step(
                acc0, acc1, acc2, acc3, q, s, z, xp_ptr + kw0 + word, magic, BT, SX, HALF
            )
            if AHEAD > 1:
                q, s, z = q1, s1, z1
                q1, s1, z1 = q_n, s_n, z_n
            else:
                q, s, z = q_n, s_n, z_n
    else:
        if PDL:
            gdc_wait()
        for kw0 in tl.range(0, KW, STEP, num_stages=NS):
            q, s, z = _stream_tile(
                q_ptrs, s_ptr, z_ptr, sz_offs, g_ids, kw0, KW, HAS_ZEROS, WG, EVEN
            )
            acc0, acc1, acc2, acc3 = _stream_step(
                acc0, acc1, acc2, acc3, q, s, z, xp_ptr + kw0 + word, magic, BT, SX, HALF
            )
    return (
        tl.sum(tl.sum(acc0, axis=2), axis=0),
        tl.sum(tl.sum(acc1, axis=2), axis=0),
        tl.sum(tl.sum(acc2, axis=2), axis=0),
        tl.sum(tl.sum(acc3, axis=2), axis=0),
    )


@triton.jit
def _stream_store(y_ptr, out, up, rows, row_mask, t: tl.constexpr, T, stride_y,
                  FUSED: tl.constexpr):  # fmt: skip
    if FUSED:
        out = out * tl.sigmoid(out) * up
    tl.store(
        y_ptr + t * stride_y + rows, _round(out, y_ptr.dtype.element_ty), mask=row_mask & (t < T)
    )


@triton.jit(do_not_specialize=["T", "N", "KW", "up_offset", "stride_y", "stride_s"])
def stream(xp_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, T, N, KW, up_offset, stride_y, stride_q,
           stride_s, magic, HAS_ZEROS: tl.constexpr, FUSED: tl.constexpr, GROUP: tl.constexpr,
           BN: tl.constexpr, G: tl.constexpr, BT: tl.constexpr, NS: tl.constexpr,
           PREFETCH: tl.constexpr, SX: tl.constexpr, EVEN: tl.constexpr,
           PDL: tl.constexpr, ONE_PASS: tl.constexpr, AHEAD: tl.constexpr,
           HALF: tl.constexpr):  # fmt: skip
    # y [T, N] = x [T, K] @ W^T for T <= BT (1, 2 or 4) from xp = prep_x(x) (row stride SX),
    # or with HALF from xp = prep_xh(x) (fp16x2 products, see _tok_step_h);
    # FUSED: silu(gate) * up, up rows at up_offset: a second pass over the same x', or with
    # ONE_PASS one pass over 2 BN rows, gate and up interleaved (x' loaded once for both, no
    # pipeline restart between the passes); EVEN: the steps of G groups tile K. PDL: launched
    # as prep_x's programmatic dependent: weights load before x' is ready, and the next kernel
    # (the down matrix's prep_x) may launch early (it waits for y). grid (N / BN,)
    if PDL:
        gdc_launch_dependents()
    _stream_rows(
        xp_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, T, N, KW, up_offset, stride_y, stride_q, stride_s,
        magic, HAS_ZEROS, FUSED, GROUP, BN, G, BT, NS, PREFETCH, SX, EVEN, PDL, ONE_PASS, AHEAD,
        HALF,
    )  # fmt: skip


@triton.jit(
    do_not_specialize=["N", "KW", "up_offset", "stride_y", "stride_s", "unit"]
    + [f"{c}{i}" for c in "dr" for i in range(8)]
)
def stream_grouped(xp_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, N, KW, up_offset, stride_y, stride_q,
                   stride_s, magic, unit, d0, d1, d2, d3, d4, d5, d6, d7, r0, r1, r2, r3, r4,
                   r5, r6, r7, HAS_ZEROS: tl.constexpr, FUSED: tl.constexpr,
                   GROUP: tl.constexpr, BN: tl.constexpr, G: tl.constexpr, BT: tl.constexpr,
                   NS: tl.constexpr, PREFETCH: tl.constexpr, SX: tl.constexpr,
                   EVEN: tl.constexpr, PDL: tl.constexpr, ONE_PASS: tl.constexpr,
                   AHEAD: tl.constexpr, HALF: tl.constexpr):  # fmt: skip
    # stream for up to 8 experts of one layout in one launch, grid (N / BN, experts): expert e
    # has its buffer d_e * unit bytes past the one qw/s/z view (unit a multiple of 4), its
    # tokens' prepared input at block e of xp (prep_grouped) and its outputs at rows
    # lo .. lo + T - 1 of y (r_e = lo << 8 | T)
    if PDL:
        gdc_launch_dependents()
    e = tl.program_id(1)
    off = _pick(e, d0, d1, d2, d3, d4, d5, d6, d7).to(tl.int64) * unit
    r = _pick(e, r0, r1, r2, r3, r4, r5, r6, r7)
    x_rows: tl.constexpr = 10 - 5 * (HALF > 0)
    _stream_rows(
        xp_ptr + e * (BT * x_rows * SX), qw_ptr + off // 4, s_ptr + off // 2, z_ptr + off,
        y_ptr + (r >> 8).to(tl.int64) * stride_y, r & 255, N, KW, up_offset, stride_y,
        stride_q, stride_s, magic, HAS_ZEROS, FUSED, GROUP, BN, G, BT, NS, PREFETCH, SX, EVEN,
        PDL, ONE_PASS, AHEAD, HALF,
    )  # fmt: skip


@triton.jit
def _stream_rows(xp_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, T, N, KW, up_offset, stride_y, stride_q,
                 stride_s, magic, HAS_ZEROS: tl.constexpr, FUSED: tl.constexpr,
                 GROUP: tl.constexpr, BN: tl.constexpr, G: tl.constexpr, BT: tl.constexpr,
                 NS: tl.constexpr, PREFETCH: tl.constexpr, SX: tl.constexpr,
                 EVEN: tl.constexpr, PDL: tl.constexpr, ONE_PASS: tl.constexpr,
                 AHEAD: tl.constexpr, HALF: tl.constexpr):  # fmt: skip
    # the row block program_id(0) of stream (see there)
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    row_mask = rows < N
    if FUSED and ONE_PASS:
        i = tl.arange(0, 2 * BN)
        out_rows = tl.program_id(0) * BN + i // 2
        both = tl.where(out_rows < N, out_rows, 0).to(tl.int64) + (i % 2) * up_offset
        p0, p1, p2, p3 = _stream_pass(
            xp_ptr, qw_ptr, s_ptr, z_ptr, both, KW, stride_q, stride_s, magic,
            HAS_ZEROS, GROUP, G, BT, NS, PREFETCH, SX, EVEN, PDL, AHEAD, HALF,
        )  # fmt: skip
        o0, u0 = tl.split(tl.reshape(p0, (BN, 2)))
        o1, u1 = tl.split(tl.reshape(p1, (BN, 2)))
        o2, u2 = tl.split(tl.reshape(p2, (BN, 2)))
        o3, u3 = tl.split(tl.reshape(p3, (BN, 2)))
    else:
        rows_in = tl.where(row_mask, rows, 0).to(tl.int64)  # clamped: loads stay in bounds
        o0, o1, o2, o3 = _stream_pass(
            xp_ptr, qw_ptr, s_ptr, z_ptr, rows_in, KW, stride_q, stride_s, magic,
            HAS_ZEROS, GROUP, G, BT, NS, PREFETCH, SX, EVEN, PDL, AHEAD, HALF,
        )  # fmt: skip
        u0, u1, u2, u3 = o0, o1, o2, o3
        if FUSED:
            u0, u1, u2, u3 = _stream_pass(
                xp_ptr, qw_ptr, s_ptr, z_ptr, rows_in + up_offset, KW, stride_q, stride_s,
                magic, HAS_ZEROS, GROUP, G, BT, NS, PREFETCH, SX, EVEN, False, AHEAD, HALF,
            )  # fmt: skip
    _stream_store(y_ptr, o0, u0, rows, row_mask, 0, T, stride_y, FUSED)
    if BT > 1:
        _stream_store(y_ptr, o1, u1, rows, row_mask, 1, T, stride_y, FUSED)
    if BT > 2:
        _stream_store(y_ptr, o2, u2, rows, row_mask, 2, T, stride_y, FUSED)
        _stream_store(y_ptr, o3, u3, rows, row_mask, 3, T, stride_y, FUSED)


# --------------------------------------------------------------------------- round-1 kernels
# gemv / mma / dequant as measured in bench/results/int4-kernels-h100.json (sweep candidates)


@triton.jit
def _load_words(q_ptr, rows, gi, K, GROUP: tl.constexpr):
    # rows [BN] -> int32 [BN, W, 1], the words of group gi (a thread keeps whole words)
    words = tl.arange(0, GROUP // 8)
    return tl.load(
        q_ptr + rows[:, None, None] * (K // 8) + gi * (GROUP // 8) + words[None, :, None]
    )


@triton.jit
def _unpack_words(q, magic):
    # int32 [BN, W, 1] -> fp32 [BN, W, 8]: 2^23 + q * 2^pos (exact)
    # NOTE: `magic` is a kernel argument, not a literal: in a register it lets ptxas fuse the
    # and/or into one LOP3 (a LOP3 takes one immediate).
    shift, mask, _, _ = _nibble_consts()
    bits = (q.to(tl.uint32, bitcast=True) >> shift[None, None, :]) & mask[None, None, :]
    return (bits | magic.to(tl.uint32, bitcast=True)).to(tl.float32, bitcast=True)


@triton.jit
def _group_codes(q_ptr, rows, gi, K, magic, GROUP: tl.constexpr):
    # rows [BN] -> fp32 [BN, W, 8]: 2^23 + q * 2^pos for the words of group gi
    return _unpack_words(_load_words(q_ptr, rows, gi, K, GROUP), magic)


@triton.jit
def _group_sz(s_ptr, z_ptr, rows, gi, K, HAS_ZEROS: tl.constexpr, GROUP: tl.constexpr):
    # scales and zero points of group gi as fp32 [BN] (zero point 8 when symmetric)
    offs = rows * (K // GROUP) + gi
    s = tl.load(s_ptr + offs).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(z_ptr + offs).to(tl.float32)
    else:
        z = tl.zeros_like(s) + 8.0
    return s, z


@triton.jit
def _dequant_group(q_ptr, s_ptr, z_ptr, rows, gi, K, magic, HAS_ZEROS: tl.constexpr,
                   GROUP: tl.constexpr, BN: tl.constexpr):  # fmt: skip
    # rows [BN] -> fp32 [BN, GROUP] = (q - z) * s of group gi, exact
    _, _, mult, inv = _nibble_consts()
    s, z = _group_sz(s_ptr, z_ptr, rows, gi, K, HAS_ZEROS, GROUP)
    zero_magic = 8388608.0 + z[:, None, None] * mult[None, None, :]  # [BN, 1, 8]
    scale = s[:, None, None] * inv[None, None, :]
    w = (_group_codes(q_ptr, rows, gi, K, magic, GROUP) - zero_magic) * scale  # [BN, W, 8]
    return tl.reshape(w, [BN, GROUP])


@triton.jit
def _gemv_group(x_ptr, stride_x, q, s, z, gi, T, acc, magic, GROUP: tl.constexpr,
                BT: tl.constexpr):  # fmt: skip
    # q [BN, W, 1] words, s/z [BN] of group gi. BT == 1: acc [BN, W] += s * per-word partial
    # dots (threads reduce across words once, at the end); else acc [BN, BT] += s * group dot
    _, _, mult, inv = _nibble_consts()
    zero_magic = 8388608.0 + z[:, None, None] * mult[None, None, :]  # [BN, 1, 8]
    w = _unpack_words(q, magic) - zero_magic  # [BN, W, 8]: (q - z) * 2^pos, exact
    x_offs = gi * GROUP + tl.arange(0, GROUP // 8)[:, None] * 8 + tl.arange(0, 8)[None, :]
    if BT == 1:
        xv = tl.load(x_ptr + x_offs).to(tl.float32) * inv[None, :]  # [W, 8]
        acc += s[:, None] * tl.sum(w * xv[None, :, :], axis=2)
    else:
        t_ids = tl.arange(0, BT)
        for t in tl.static_range(BT):
            t_ok = tl.full([GROUP // 8, 8], t, tl.int32) < T
            xv = tl.load(x_ptr + t * stride_x + x_offs, mask=t_ok, other=0.0).to(tl.float32)
            p = tl.sum(tl.sum(w * (xv * inv[None, :])[None, :, :], axis=2), axis=1)  # [BN]
            acc += tl.where(t_ids[None, :] == t, (s * p)[:, None], 0.0)
    return acc


@triton.jit
def _gemv_rows(x_ptr, stride_x, q_ptr, s_ptr, z_ptr, rows, g_start, g_end, K, T, acc, magic,
               HAS_ZEROS: tl.constexpr, GROUP: tl.constexpr, BT: tl.constexpr,
               UNROLL: tl.constexpr, PREFETCH: tl.constexpr):  # fmt: skip
    # acc over groups g_start..g_end of the rows; PREFETCH: the next group's words, scales and
    # zeros load while this group computes (registers; triton does not pipeline these loads)
    if PREFETCH:
        q = _load_words(q_ptr, rows, g_start, K, GROUP)
        s, z = _group_sz(s_ptr, z_ptr, rows, g_start, K, HAS_ZEROS, GROUP)
        for gi in range(g_start, g_end):
            g_next = tl.minimum(gi + 1, g_end - 1)  # the last step reloads its own group
            q_next = _load_words(q_ptr, rows, g_next, K, GROUP)
            s_next, z_next = _group_sz(s_ptr, z_ptr, rows, g_next, K, HAS_ZEROS, GROUP)
            acc = _gemv_group(x_ptr, stride_x, q, s, z, gi, T, acc, magic, GROUP, BT)
            q, s, z = q_next, s_next, z_next
    else:
        for g0 in range(g_start, g_end, UNROLL):
            for u in tl.static_range(UNROLL):
                q = _load_words(q_ptr, rows, g0 + u, K, GROUP)
                s, z = _group_sz(s_ptr, z_ptr, rows, g0 + u, K, HAS_ZEROS, GROUP)
                acc = _gemv_group(x_ptr, stride_x, q, s, z, g0 + u, T, acc, magic, GROUP, BT)
    return acc


@triton.jit
def _sum_splits(acc, acc2, ws_ptr, cnt_ptr, rows, tokens, mask, N, T_pad, FUSED: tl.constexpr):
    # split-K: store this program's fp32 partials (acc, acc2 [BN, BT]); the last program of the
    # tile to arrive (counted with an atomic) gets every split's sum. -> (last, acc, acc2)
    # ws [splits, 2, T_pad, N] fp32; cnt [tiles] int32, zero between launches
    num_splits = tl.num_programs(2)
    offs = tokens[None, :].to(tl.int64) * N + rows[:, None]
    part = ws_ptr + tl.program_id(2) * 2 * T_pad * N + offs
    tl.store(part, acc, mask=mask)
    if FUSED:
        tl.store(part + T_pad * N, acc2, mask=mask)
    tl.debug_barrier()  # every thread's partial is written before the release below
    tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    last = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel") == num_splits - 1
    if last:
        acc = tl.zeros_like(acc)
        acc2 = tl.zeros_like(acc2)
        for k in range(num_splits):
            part = ws_ptr + k * 2 * T_pad * N + offs
            acc += tl.load(part, mask=mask, other=0.0, cache_modifier=".cg")
            if FUSED:
                acc2 += tl.load(part + T_pad * N, mask=mask, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(cnt_ptr + tile, 0)  # reset for the next launch
    return last, acc, acc2


@triton.jit
def _epilogue(acc, acc2, y_ptr, ws_ptr, cnt_ptr, rows, row_mask, tokens, t_mask, N, stride_y,
              FUSED: tl.constexpr):  # fmt: skip
    # acc, acc2 [BN, BT] fp32 -> y[tokens, rows], summing the K splits first (_sum_splits)
    mask = row_mask[:, None] & t_mask[None, :]
    last = True
    if tl.num_programs(2) > 1:
        t_pad = tl.num_programs(1) * acc.shape[1]
        last, acc, acc2 = _sum_splits(
            acc, acc2, ws_ptr, cnt_ptr, rows, tokens, mask, N, t_pad, FUSED
        )  # fmt: skip
    if last:
        if FUSED:
            acc = acc * tl.sigmoid(acc) * acc2
        y_ptrs = y_ptr + tokens[None, :].to(tl.int64) * stride_y + rows[:, None]
        tl.store(y_ptrs, _round(acc, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_block(N, BN: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    row_mask = rows < N
    return tl.where(row_mask, rows, 0).to(tl.int64), row_mask  # clamped: loads stay in bounds


@triton.jit(do_not_specialize=["T", "groups_per_split"])
def gemv(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, T, N, K, up_offset, stride_x,
         stride_y, groups_per_split, magic, HAS_ZEROS: tl.constexpr, FUSED: tl.constexpr,
         GROUP: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, UNROLL: tl.constexpr,
         PREFETCH: tl.constexpr):  # fmt: skip
    # y [T, N] = x [T, K] @ W^T, T <= BT (few tokens, FMA); FUSED: silu(gate) * up, where up
    # rows start at up_offset. grid (N / BN, 1, splits); split k covers groups_per_split groups.
    rows, row_mask = _row_block(N, BN)
    if BT == 1:
        acc = tl.zeros([BN, GROUP // 8], tl.float32)
    else:
        acc = tl.zeros([BN, BT], tl.float32)
    acc2 = acc
    g_start = tl.program_id(2) * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, K // GROUP)
    acc = _gemv_rows(
        x_ptr, stride_x, qw_ptr, s_ptr, z_ptr, rows, g_start, g_end, K, T, acc, magic,
        HAS_ZEROS, GROUP, BT, UNROLL, PREFETCH,
    )  # fmt: skip
    if FUSED:  # gate and up rows in two passes: both stream from HBM once, x stays in L1/L2
        acc2 = _gemv_rows(
            x_ptr, stride_x, qw_ptr, s_ptr, z_ptr, rows + up_offset, g_start, g_end, K, T, acc2,
            magic, HAS_ZEROS, GROUP, BT, UNROLL, PREFETCH,
        )  # fmt: skip
    if BT == 1:  # one cross-thread reduction per program
        acc = tl.sum(acc, axis=1)[:, None]
        acc2 = tl.sum(acc2, axis=1)[:, None]
    tokens = tl.arange(0, BT)
    _epilogue(
        acc, acc2, y_ptr, ws_ptr, cnt_ptr, rows, row_mask, tokens, tokens < T, N, stride_y,
        FUSED,
    )  # fmt: skip


@triton.jit
def _mma_group(x_ptr, stride_x, q_ptr, s_ptr, z_ptr, rows, gi, K, tokens, t_mask, acc, magic,
               HAS_ZEROS: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr,
               DOT_FP32: tl.constexpr):  # fmt: skip
    # acc [BN, BT] += s * ((q - z) 2^pos [BN, GROUP] @ (x 2^-pos)^T [GROUP, BT]) on tensor cores;
    # both operands are exact in bf16 and the scale is applied once per group, after the MMA
    ks = gi * GROUP + tl.arange(0, GROUP)
    x_ptrs = x_ptr + tokens[None, :].to(tl.int64) * stride_x + ks[:, None]
    xt = tl.load(x_ptrs, mask=t_mask[None, :], other=0.0).to(tl.float32)  # [GROUP, BT]
    j = ks % 8
    pos = j * 4 - tl.where(j < 5, 0, 12)
    xt = _round(xt * ((127 - pos) << 23).to(tl.float32, bitcast=True)[:, None], tl.bfloat16)
    _, _, mult, _ = _nibble_consts()
    s, z = _group_sz(s_ptr, z_ptr, rows, gi, K, HAS_ZEROS, GROUP)
    zero_magic = 8388608.0 + z[:, None, None] * mult[None, None, :]  # [BN, 1, 8]
    w = _group_codes(q_ptr, rows, gi, K, magic, GROUP) - zero_magic  # [BN, W, 8]
    w = _round(tl.reshape(w, [BN, GROUP]), tl.bfloat16)  # exact: |q - z| <= 16
    if DOT_FP32:  # the interpreter's bf16 dot is broken: same values as fp32 operands
        part = tl.dot(w.to(tl.float32), xt.to(tl.float32))
    else:
        part = tl.dot(w, xt)
    return acc + s[:, None] * part


@triton.jit(do_not_specialize=["T", "groups_per_split"])
def mma(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, T, N, K, up_offset, stride_x,
        stride_y, groups_per_split, magic, HAS_ZEROS: tl.constexpr, FUSED: tl.constexpr,
        GROUP: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, UNROLL: tl.constexpr,
        DOT_FP32: tl.constexpr):  # fmt: skip
    # y [T, N] = x [T, K] @ W^T via tl.dot (weights = A operand, tokens = N dim of the MMA).
    # grid (N / BN, T / BT, splits); split k covers groups_per_split groups
    rows, row_mask = _row_block(N, BN)
    tokens = tl.program_id(1) * BT + tl.arange(0, BT)
    t_mask = tokens < T
    acc = tl.zeros([BN, BT], tl.float32)
    acc2 = tl.zeros([BN, BT], tl.float32)
    g_start = tl.program_id(2) * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, K // GROUP)
    for g0 in range(g_start, g_end, UNROLL):
        for u in tl.static_range(UNROLL):
            gi = g0 + u
            acc = _mma_group(
                x_ptr, stride_x, qw_ptr, s_ptr, z_ptr, rows, gi, K, tokens, t_mask, acc, magic,
                HAS_ZEROS, GROUP, BN, DOT_FP32,
            )  # fmt: skip
            if FUSED:
                acc2 = _mma_group(
                    x_ptr, stride_x, qw_ptr, s_ptr, z_ptr, rows + up_offset, gi, K, tokens,
                    t_mask, acc2, magic, HAS_ZEROS, GROUP, BN, DOT_FP32,
                )  # fmt: skip
    _epilogue(
        acc, acc2, y_ptr, ws_ptr, cnt_ptr, rows, row_mask, tokens, t_mask, N, stride_y,
        FUSED,
    )  # fmt: skip


@triton.jit
def dequant(qw_ptr, s_ptr, z_ptr, out_ptr, N, K, magic, HAS_ZEROS: tl.constexpr,
            GROUP: tl.constexpr, BN: tl.constexpr, UNROLL: tl.constexpr):  # fmt: skip
    # out [N, K] = dequant(W); program (n-block, k-block of UNROLL groups)
    rows, row_mask = _row_block(N, BN)
    for u in tl.static_range(UNROLL):
        gi = tl.program_id(1) * UNROLL + u
        w = _dequant_group(qw_ptr, s_ptr, z_ptr, rows, gi, K, magic, HAS_ZEROS, GROUP, BN)
        out_ptrs = out_ptr + rows[:, None] * K + gi * GROUP + tl.arange(0, GROUP)[None, :]
        tl.store(out_ptrs, _round(w, out_ptr.dtype.element_ty), mask=row_mask[:, None])


@triton.jit
def read_words(q_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # sum of int32 words (bench only: the read-bandwidth ceiling of a weight matrix)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + tl.program_id(0), tl.sum(tl.load(q_ptr + offs, mask=offs < n, other=0)))
