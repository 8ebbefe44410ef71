"""Int4 experts: format, RTN quantizer, AWQ/GPTQ conversion (bit-exact), config parsing, kernels.

Oracles: exactly representable weights, a straightforward AWQ/GPTQ dequantizer written here
from the format descriptions, and fp32 matmuls. Triton kernels run under the interpreter at tiny
shapes when triton is installed.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from duoserve.quant.checkpoints import (
    AWQ_NIBBLE_COLUMN,
    awq_to_int4,
    gptq_to_int4,
    pack_expert_from_linears,
    parse_quantization_config,
    regroup,
)
from duoserve.quant.int4 import (
    ALIGN_BYTES,
    Int4ExpertLayout,
    dequantize_int4,
    expert_forward_int4_reference,
    pack_expert_int4,
    pack_nibbles,
    quantize_expert_int4,
    quantize_int4,
    unpack_nibbles,
)
from duoserve.quant.triton_kernels import (
    KernelConfig,
    candidate_configs,
    dequantize_int4_into,
    expert_forward_int4,
    int4_gate_up_silu,
    int4_linear,
    kinds_for_tokens,
    set_autotune,
)

from .conftest import run_interpreted


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# --------------------------------------------------------------------------- format, RTN


def test_nibble_order() -> None:
    codes = torch.arange(1, 9, dtype=torch.uint8)[None]  # k = 0..7 hold 1..8
    word = pack_nibbles(codes)
    assert word.dtype == torch.int32 and word.item() == -0x789ABCDF  # 0x87654321 as int32
    assert torch.equal(word.view(torch.uint8)[0], torch.tensor([0x21, 0x43, 0x65, 0x87]).byte())
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)


def _grid_weights(n, k, g, symmetric, gen):
    # values exactly on each group's grid, with the grid's extremes present in every group
    num_groups = k // g
    scales = (torch.rand(n, num_groups, generator=gen) + 0.5).bfloat16()
    if symmetric:
        ints = torch.randint(-7, 8, (n, num_groups, g), generator=gen)
        ints[..., 0], ints[..., 1] = -7, 7
        zeros = None
    else:
        zeros = torch.randint(0, 16, (n, num_groups), generator=gen)
        codes = torch.randint(0, 16, (n, num_groups, g), generator=gen)
        codes[..., 0], codes[..., 1] = 0, 15
        ints = codes - zeros[..., None]
    w = (ints.float() * scales.float()[..., None]).view(n, k)
    return w, scales, zeros


@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_roundtrip_exact_on_grid(symmetric: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    w, scales, zeros = _grid_weights(16, 256, 64, symmetric, gen)
    q = quantize_int4(w, 64, symmetric=symmetric)
    assert torch.equal(q.scales, scales)
    assert (q.zeros is None) == symmetric
    if zeros is not None:
        assert torch.equal(q.zeros, zeros.to(torch.uint8))
    assert torch.equal(dequantize_int4(*q, 64, dtype=torch.float32), w)


@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_error_bound(symmetric: bool) -> None:
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(1)).bfloat16()
    q = quantize_int4(w, 128, symmetric=symmetric)
    err = (dequantize_int4(*q, 128, dtype=torch.float32) - w.float()).abs().view(64, 4, 128)
    # half a step, plus the bf16 rounding of the scale over up to 15 steps
    assert (err <= 0.55 * q.scales.float()[..., None]).all()
    clipped = quantize_int4(w, 128, symmetric=symmetric, method="clip")
    err_clip = dequantize_int4(*clipped, 128, dtype=torch.float32) - w.float()
    assert err_clip.square().sum() < 0.97 * err.square().sum()


def test_layout_offsets_and_views() -> None:
    mixtral = Int4ExpertLayout(4096, 14336)
    assert mixtral.num_bytes == 92_209_152  # 3*4096*14336/2 + (2 + 1) bytes per group of 128
    for layout in (mixtral, Int4ExpertLayout(96, 64, 32, False, "fp16", True)):
        end = 0
        for offset, size in layout.sections.values():
            assert offset % ALIGN_BYTES == 0 and offset >= end
            end = offset + size
        assert layout.num_bytes % ALIGN_BYTES == 0 and layout.num_bytes >= end
    layout = Int4ExpertLayout(96, 64, 32, has_zeros=True)
    gen = torch.Generator().manual_seed(2)
    mats = [torch.randn(64, 96, generator=gen), torch.randn(64, 96, generator=gen)]
    mats.append(torch.randn(96, 64, generator=gen))
    quantized = [quantize_int4(m, 32) for m in mats]
    buffer = pack_expert_int4(*quantized, layout)
    assert buffer.dtype == torch.uint8 and buffer.numel() == layout.num_bytes
    for view, src in zip(layout.views(buffer), quantized):
        for a, b in zip(view, src):
            assert a.dtype == b.dtype and torch.equal(a, b)
    gate_up = layout.gate_up_views(buffer)
    assert gate_up.qweight.shape == (128, 12) and gate_up.scales.shape == (128, 3)
    assert gate_up.qweight.data_ptr() - buffer.data_ptr() == 0
    with pytest.raises(AssertionError, match="buffer holds"):
        layout.views(buffer[: layout.num_bytes - 256])
    with pytest.raises(AssertionError, match="multiple of group"):
        Int4ExpertLayout(100, 64, 32)


def test_reference_forward_matches_fp32_dequant_matmul() -> None:
    gen = torch.Generator().manual_seed(3)
    gate, up = torch.randn(64, 128, generator=gen), torch.randn(64, 128, generator=gen)
    down = torch.randn(128, 64, generator=gen)
    buffer, layout = quantize_expert_int4(gate, up, down, 32)
    g, u, d = (dequantize_int4(*v, 32, dtype=torch.float32) for v in layout.views(buffer))
    x = torch.randn(5, 128, generator=gen).bfloat16()
    xf = x.float()
    expected = (F.silu(xf @ g.T) * (xf @ u.T)) @ d.T
    out = expert_forward_int4_reference(x, buffer, layout)
    assert out.dtype == torch.bfloat16 and _rel(out, expected) < 1e-2
    exact = expert_forward_int4_reference(x.float(), buffer, layout, weight_dtype=torch.float32)
    assert _rel(exact, expected) < 1e-5
    bf16_out = (F.silu(x.float() @ gate.T) * (x.float() @ up.T)) @ down.T
    assert _rel(out, bf16_out) < 0.35  # 4-bit error, not a bug


# --------------------------------------------------------------------------- AWQ / GPTQ


def _pack_words(codes: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    # codes [R, C] -> int32 [R, C/8]: nibble i of word c holds column 8c + order[i]
    words = torch.zeros(codes.shape[0], codes.shape[1] // 8, dtype=torch.int64)
    for i, col in enumerate(order):
        words |= codes[:, col::8].to(torch.int64) << (4 * i)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _nibble(words: torch.Tensor, i: int) -> torch.Tensor:
    return (words.to(torch.int64) >> (4 * i)) & 0xF


def _ref_dequant_awq(qweight, qzeros, scales, g) -> torch.Tensor:
    # the straightforward way: W[o, i] = (q - z) * s, in fp16 as AWQ's kernels compute it
    q = torch.zeros(qweight.shape[0], qweight.shape[1] * 8, dtype=torch.int64)
    z = torch.zeros(qzeros.shape[0], qzeros.shape[1] * 8, dtype=torch.int64)
    for i, col in enumerate(AWQ_NIBBLE_COLUMN):
        q[:, col::8] = _nibble(qweight, i)
        z[:, col::8] = _nibble(qzeros, i)
    rows = torch.arange(q.shape[0]) // g
    return ((q - z[rows]).half() * scales[rows]).T  # [out, in]


def _ref_dequant_gptq(qweight, qzeros, scales, g_idx, zero_offset) -> torch.Tensor:
    q = torch.stack([_nibble(qweight, j) for j in range(8)], dim=1).reshape(-1, qweight.shape[1])
    z = torch.stack([_nibble(qzeros, j) for j in range(8)], dim=2).reshape(qzeros.shape[0], -1)
    z = z + zero_offset
    return ((q - z[g_idx]).half() * scales[g_idx]).T  # [out, in]


def _random_codes(num_in, num_out, g, gen):
    codes = torch.randint(0, 16, (num_in, num_out), generator=gen)
    zeros = torch.randint(0, 16, (num_in // g, num_out), generator=gen)
    scales = (torch.rand(num_in // g, num_out, generator=gen) * 0.01 + 1e-3).half()
    return codes, zeros, scales


def test_awq_conversion_bit_exact() -> None:
    gen = torch.Generator().manual_seed(4)
    codes, zeros, scales = _random_codes(128, 48, 32, gen)
    qweight, qzeros = _pack_words(codes, AWQ_NIBBLE_COLUMN), _pack_words(zeros, AWQ_NIBBLE_COLUMN)
    lin = awq_to_int4(qweight, qzeros, scales, 32)
    ref = _ref_dequant_awq(qweight, qzeros, scales, 32)
    assert lin.in_perm is None and lin.weights.scales.dtype == torch.float16
    assert torch.equal(dequantize_int4(*lin.weights, 32, dtype=torch.float16), ref)
    ref32 = _ref_dequant_awq(qweight, qzeros, scales.float(), 32).float()
    assert torch.equal(dequantize_int4(*lin.weights, 32, dtype=torch.float32), ref32)
    with pytest.raises(ValueError, match="shapes disagree"):
        awq_to_int4(qweight, qzeros, scales, 64)


def _gptq_tensors(num_in, num_out, g, gen, act_order, zero_offset):
    codes, zeros, scales = _random_codes(num_in, num_out, g, gen)
    zeros[0, :8] = 15 + zero_offset  # v1: zero 16 is stored as 15 (its "+1" quirk)
    stored = (zeros - zero_offset) & 0xF
    qweight = _pack_words(codes.T.contiguous(), tuple(range(8))).T.contiguous()  # [in/8, out]
    qzeros = _pack_words(stored, tuple(range(8)))
    g_idx = torch.arange(num_in, dtype=torch.int32) // g
    if act_order:  # GPTQ: column perm[i] is quantized i-th and lands in group i // g
        perm = torch.randperm(num_in, generator=gen)
        g_idx = torch.empty_like(g_idx)
        g_idx[perm] = torch.arange(num_in, dtype=torch.int32) // g
    return qweight, qzeros, scales, g_idx


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq_conversion_bit_exact(act_order: bool, fmt: str) -> None:
    gen = torch.Generator().manual_seed(5)
    offset = 1 if fmt == "gptq" else 0
    qweight, qzeros, scales, g_idx = _gptq_tensors(128, 40, 32, gen, act_order, offset)
    lin = gptq_to_int4(qweight, qzeros, scales, 32, g_idx, checkpoint_format=fmt)
    ref = _ref_dequant_gptq(qweight, qzeros, scales, g_idx.long(), offset)
    assert (lin.in_perm is not None) == act_order
    ours = dequantize_int4(*lin.weights, 32, dtype=torch.float16)
    if act_order:  # ours holds W[:, in_perm]
        assert torch.equal(ours, ref[:, lin.in_perm.long()])
    else:
        assert torch.equal(ours, ref)
    if fmt == "gptq":
        assert lin.weights.zeros.max() == 16  # the v1 quirk survives conversion


def test_gptq_bad_g_idx_and_per_channel() -> None:
    gen = torch.Generator().manual_seed(6)
    qweight, qzeros, scales, g_idx = _gptq_tensors(64, 16, 32, gen, True, 1)
    bad = g_idx.clone()
    bad[bad == 1] = 0  # group 0 now owns 64 rows
    with pytest.raises(ValueError, match="cannot be represented"):
        gptq_to_int4(qweight, qzeros, scales, 32, bad)
    with pytest.raises(ValueError, match="checkpoint_format"):
        gptq_to_int4(qweight, qzeros, scales, 32, g_idx, checkpoint_format="marlin")
    per_channel = gptq_to_int4(qweight, qzeros[:1], scales[:1], -1)
    assert per_channel.group_size == 64
    finer = regroup(per_channel, 16)
    for dtype in (torch.float16, torch.float32):
        a = dequantize_int4(*per_channel.weights, 64, dtype=dtype)
        assert torch.equal(dequantize_int4(*finer.weights, 16, dtype=dtype), a)


def test_gptq_act_order_expert() -> None:
    # gate/up share one g_idx (same inputs); down has its own, absorbed into gate/up rows
    h, i, g = 64, 32, 16
    gen = torch.Generator().manual_seed(7)
    gate_t = _gptq_tensors(h, i, g, gen, True, 1)
    up_t = _gptq_tensors(h, i, g, gen, True, 1)
    up_t = (*up_t[:3], gate_t[3])
    down_t = _gptq_tensors(i, h, g, gen, True, 1)
    lins = [gptq_to_int4(*t[:3], g, t[3]) for t in (gate_t, up_t, down_t)]
    buffer, layout = pack_expert_from_linears(*lins)
    assert layout.has_act_order and layout.scale_dtype == "fp16"
    wg, wu, wd = (
        _ref_dequant_gptq(t[0], t[1], t[2].float(), t[3].long(), 1) for t in (gate_t, up_t, down_t)
    )
    x = torch.randn(3, h, generator=gen)
    expected = (F.silu(x @ wg.T) * (x @ wu.T)) @ wd.T
    out = expert_forward_int4_reference(x, buffer, layout, weight_dtype=torch.float32)
    assert _rel(out, expected) < 1e-5
    other = _gptq_tensors(h, i, g, gen, True, 1)
    up_other = gptq_to_int4(*other[:3], g, other[3])
    with pytest.raises(ValueError, match="different act-order"):
        pack_expert_from_linears(lins[0], up_other, lins[2])


# --------------------------------------------------------------------------- config parsing


def test_parse_quantization_config() -> None:
    awq = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 128,
        "zero_point": True,
        "version": "GEMM",
    }
    cfg = parse_quantization_config({"quantization_config": awq})
    assert (cfg.method, cfg.group_size, cfg.checkpoint_format) == ("awq", 128, "gemm")
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": -1, "desc_act": True, "sym": False}
    cfg = parse_quantization_config(gptq)
    assert (cfg.method, cfg.group_size, cfg.desc_act, cfg.checkpoint_format) == (
        "gptq",
        -1,
        True,
        "gptq",
    )
    v2 = parse_quantization_config({**gptq, "checkpoint_format": "gptq_v2"})
    assert v2.checkpoint_format == "gptq_v2"


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        ({"quant_method": "fp8"}, "quant_method"),
        ({"quant_method": "awq", "bits": 8}, "bits"),
        ({"quant_method": "gptq", "bits": 3}, "bits"),
        ({"quant_method": "awq", "version": "gemv"}, "version"),
        ({"quant_method": "awq", "version": "exllama"}, "version"),
        ({"quant_method": "awq", "version": "marlin"}, "version"),
        ({"quant_method": "awq", "zero_point": False}, "zero_point"),
        ({"quant_method": "gptq", "checkpoint_format": "marlin"}, "checkpoint_format"),
        ({"quant_method": "gptq", "is_marlin_format": True}, "is_marlin_format"),
        ({"quant_method": "gptq", "group_size": 100}, "group_size"),
        ({"quant_method": "gptq", "pack_dtype": "int16"}, "pack_dtype"),
        ({"quant_method": "gptq", "dynamic": {"-:.*": {}}}, "dynamic"),
    ],
)
def test_parse_quantization_config_errors(cfg: dict, key: str) -> None:
    with pytest.raises(ValueError, match=rf"quantization_config\.{key}=.*supported"):
        parse_quantization_config(cfg)


# --------------------------------------------------------------------------- kernels


def test_torch_backend_entry_points() -> None:
    gen = torch.Generator().manual_seed(8)
    w = quantize_int4(torch.randn(48, 64, generator=gen), 32)
    x = torch.randn(3, 64, generator=gen).bfloat16()
    expected = x.float() @ dequantize_int4(*w, 32).float().T
    assert _rel(int4_linear(x, *w, 32), expected) < 1e-2  # CPU tensors: torch reference
    out = torch.empty(48, 64, dtype=torch.bfloat16)
    assert torch.equal(dequantize_int4_into(*w, 32, out), dequantize_int4(*w, 32))


def _tiny_expert(symmetric: bool, seed: int, group: int = 32, inter: int = 96):
    gen = torch.Generator().manual_seed(seed)
    h, i = 128, inter  # 96: 3 groups of 32, so 64-row blocks are partly masked
    mats = [torch.randn(i, h, generator=gen), torch.randn(i, h, generator=gen)]
    mats.append(torch.randn(h, i, generator=gen))
    return quantize_expert_int4(*mats, group_size=group, symmetric=symmetric)


def _check_kernel_case(
    config: KernelConfig,
    num_tokens: int,
    symmetric: bool,
    seed: int = 9,
    group: int = 32,
    inter: int = 96,
) -> tuple:
    """Fused gate/up + silu and down, each against fp32 matmuls of the dequantized weights;
    returns (x, buffer, layout, silu(gate) * up, down weights) for further checks."""
    buffer, layout = _tiny_expert(symmetric, seed, group, inter)
    g, h, i = layout.group_size, layout.hidden_size, layout.intermediate_size
    gate_up, down = layout.gate_up_views(buffer), layout.down_views(buffer)
    # every fused kernel computes with the exact weights (q - z) * s (fp32)
    w_gu = dequantize_int4(*gate_up, g, dtype=torch.float32)
    w_down = dequantize_int4(*down, g, dtype=torch.float32)
    x = torch.randn(num_tokens, h, generator=torch.Generator().manual_seed(10)).bfloat16()
    act = torch.full((num_tokens, i), float("nan"))  # poisoned fp32 outputs
    int4_gate_up_silu(x, *gate_up, g, out=act, backend="triton", config=config)
    gate, up = (x.float() @ w_gu.T).chunk(2, dim=1)
    assert _rel(act, F.silu(gate) * up) < 1e-5, (config, "gate_up")
    act_bf16 = act.bfloat16()
    y = torch.full((num_tokens, h), float("nan"))
    int4_linear(act_bf16, *down, g, out=y, backend="triton", config=config)
    assert _rel(y, act_bf16.float() @ w_down.T) < 1e-5, (config, "down")
    return x, buffer, layout, F.silu(gate) * up, w_down


def _check_dequant_and_expert() -> None:
    buffer, layout = _tiny_expert(False, seed=11)
    gate_up, g = layout.gate_up_views(buffer), layout.group_size
    out = torch.full((192, 128), float("nan"), dtype=torch.bfloat16)  # [2I, H]
    config = KernelConfig("dequant", 16, unroll=2)
    dequantize_int4_into(*gate_up, g, out, backend="triton", config=config)
    assert torch.equal(out, dequantize_int4(*gate_up, g)), "dequant kernel not bit-exact"
    out.fill_(float("nan"))
    dequantize_int4_into(*gate_up, g, out, backend="triton")  # the config _pick_config picks
    assert torch.equal(out, dequantize_int4(*gate_up, g)), "dequant kernel not bit-exact"
    x = torch.randn(18, 128, generator=torch.Generator().manual_seed(12)).bfloat16()
    expected = expert_forward_int4_reference(x, buffer, layout)
    for t in (1, 2, 18):  # default configs: stream 1 and 2 tokens, dequant + matmul
        got = expert_forward_int4(x[:t], buffer, layout, backend="triton")
        assert _rel(got, expected[:t]) < 1e-2, f"expert T={t}"


# (config, tokens, symmetric). stream: K steps of 2 groups (down: K = 96, the last step half
# masked) and of the whole K, 1..4 tokens in tiles of 1, 2, 4, masked rows (block_n does not
# divide N), gate and up in one pass, prefetch 1 and 2 steps ahead; gemv/mma (round 1):
# split-K (uneven too), unrolled groups, several token tiles.
INTERPRETER_CASES = [
    (KernelConfig("stream", 64, 64, 1), 1, False),
    (KernelConfig("stream", 16, 128, 2, num_stages=2), 2, True),
    (KernelConfig("stream", 32, 64, 4), 3, False),
    (KernelConfig("stream", 64, 4096, 4), 4, True),
    (KernelConfig("stream", 32, 64, 1, prefetch=True), 1, False),
    (KernelConfig("stream", 16, 64, 2, prefetch=True), 2, True),
    (KernelConfig("stream", 16, 64, 1, prefetch=True, one_pass=True, ahead=2), 1, False),
    (KernelConfig("stream", 32, 128, 2, one_pass=True), 2, True),
    (KernelConfig("stream", 16, 64, 4, prefetch=True, ahead=2), 3, True),
    (KernelConfig("stream", 32, 64, 1, prefetch=True, half=True), 1, False),
    (KernelConfig("stream", 16, 128, 2, one_pass=True, half=True), 2, True),
    (KernelConfig("stream", 16, 64, 4, prefetch=True, ahead=2, half=True), 3, False),
    (KernelConfig("gemv", 32, split_k=3, prefetch=True), 1, False),
    (KernelConfig("gemv", 64, split_k=2, unroll=2), 1, True),
    (KernelConfig("mma", 16, block_t=16, split_k=2), 3, False),
    (KernelConfig("mma", 64, block_t=16, split_k=3, unroll=1), 16, True),
    (KernelConfig("mma", 64, block_t=32, split_k=1, unroll=3), 37, False),
]


def _check_stream_precision() -> None:
    # the stream kernel's lifted products (m_j x'_j = x'_j + q_j x_j, lifts cancelling per word)
    # at K = 4096 with 1% outliers of 100x: fp32-level error against an fp64 reference
    gen = torch.Generator().manual_seed(21)
    mats = [torch.randn(r, c, generator=gen) * 0.02 for r, c in ((128, 4096),) * 2]
    mats.append(torch.randn(4096, 128, generator=gen) * 0.02)
    buffer, layout = quantize_expert_int4(*[m.bfloat16() for m in mats], group_size=128)
    w = layout.gate_up_views(buffer)
    w_ref = dequantize_int4(*w, 128, dtype=torch.float32).double()
    outlier = torch.rand(2, 4096, generator=gen) < 0.01
    x = (torch.randn(2, 4096, generator=gen) * torch.where(outlier, 100.0, 1.0)).bfloat16()
    out = torch.empty(2, 256)
    config = KernelConfig("stream", 4, 1024, 2, 1, prefetch=True)
    int4_linear(x, *w, 128, out=out, backend="triton", config=config)
    assert _rel(out.double(), x.double() @ w_ref.T) < 1e-5


def _xh_reference(x: torch.Tensor, block_t: int, sx: int) -> torch.Tensor:
    # prep_xh's output from its definition: per 4-word chunk the power of two putting max |x|
    # in [32, 64); rows 0..3 fp16 pairs {x~[8w + i], x~[8w + i + 4]} (/ 16 for odd i); row 4
    # the chunk's inverse power of two as fp32 bits
    t, k = x.shape
    xf = torch.zeros(block_t, 8 * sx)
    xf[:t, :k] = x.float()
    chunks = xf.view(block_t, sx // 4, 32)
    biased = ((chunks.abs().amax(-1).view(torch.int32) >> 23) & 255).clamp(min=6)
    scale = ((259 - biased) << 23).view(torch.float32)
    xs = (chunks * scale[..., None]).view(block_t, sx, 2, 4)
    f = torch.tensor([1.0, 1 / 16, 1.0, 1 / 16])
    lo = (xs[:, :, 0] * f).half().view(torch.int16).int() & 0xFFFF
    hi = (xs[:, :, 1] * f).half().view(torch.int16).int()
    inv = ((biased - 5) << 23).repeat_interleave(4, dim=1)
    return torch.cat([(lo | (hi << 16)).transpose(1, 2), inv[:, None]], dim=1)


def _check_prep_xh() -> None:
    # zeros, huge, tiny and mixed chunks, a padding token and words past K: bit for bit
    from duoserve.quant.triton_kernels import _kernels

    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(13))
    x[0, :32] = 0.0
    x[0, 32:64] *= 1e30
    x[1, 64:96] *= 1e-30
    x[2, 96:128] = torch.where(torch.arange(32) % 2 == 0, 1e4, 1e-4)
    x = x.bfloat16()
    block_t, sx = 4, 40
    xp = torch.full((block_t, 5, sx), -1, dtype=torch.int32)
    _kernels().prep_xh[(block_t, 2)](
        x, xp, 3, 32, x.stride(0), SX=sx, BW=32, PDL=False, num_warps=1
    )  # fmt: skip
    assert torch.equal(xp, _xh_reference(x, block_t, sx)), "prep_xh"
    pairs = xp[:, :4].contiguous().view(torch.float16).float()  # x~ per input, unscaled
    assert pairs.abs().max() < 64, "a chunk's max |x~| must stay below 64"


def _check_grouped() -> None:
    # grouped decode (4 experts of one pool in scrambled order, 1 and 2 tokens: two buckets,
    # at most 2 experts per launch; pinned fp32 configs, then fp16x2 ones with gate and up in
    # one pass) against expert_forward_int4 per expert (the same configs), bit for bit, and
    # against the fp32 reference
    from duoserve.quant import triton_kernels as tk

    experts = [_tiny_expert(False, seed=30 + e) for e in range(4)]
    layout = experts[0][1]
    pool = torch.zeros(5, layout.num_bytes + 12, dtype=torch.uint8)
    bufs = [pool[s, : layout.num_bytes] for s in (2, 0, 4, 1)]
    for b, (src, _) in zip(bufs, experts):
        b.copy_(src)
    spans = [(0, 2), (2, 1), (3, 2), (5, 2)]
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(31)).bfloat16()
    fp32 = {(192, 128, True, t): KernelConfig("stream", 64, 64, t, prefetch=t == 1) for t in (1, 2)}
    fp32.update({(128, 96, False, t): KernelConfig("stream", 64, 128, t) for t in (1, 2)})
    half = {
        (192, 128, True, t): KernelConfig(
            "stream", 32, 64, t, prefetch=True, one_pass=True, half=True
        )
        for t in (1, 2)
    }
    half.update({(128, 96, False, t): KernelConfig("stream", 64, 64, t, half=True) for t in (1, 2)})
    saved, max_group, launch = dict(tk.PINNED), tk.MAX_GROUP, tk.stream_grouped_launch
    experts_per_launch = []

    def counted(cfg, x, spans, *args) -> None:
        experts_per_launch.append(len(spans))
        launch(cfg, x, spans, *args)

    try:
        tk.MAX_GROUP, tk.stream_grouped_launch = 2, counted
        for pin in (fp32, half):
            tk.PINNED.update(pin)
            out = torch.full_like(x, float("nan"))
            experts_per_launch.clear()
            tk.experts_forward_int4_grouped(x, spans, bufs, layout, out, backend="triton")
            # bucket 2: experts 0, 2 then 3 (gate/up and down each); bucket 1: expert 1
            assert experts_per_launch == [2, 2, 1, 1, 1, 1], experts_per_launch
            for (a, n), b in zip(spans, bufs):
                alone = tk.expert_forward_int4(x[a : a + n], b, layout, backend="triton")
                assert torch.equal(out[a : a + n], alone), ("grouped != alone", a)
                ref = expert_forward_int4_reference(x[a : a + n], b, layout)
                assert _rel(out[a : a + n], ref) < 1e-2, ("grouped vs reference", a)
    finally:
        tk.PINNED.clear()
        tk.PINNED.update(saved)
        tk.MAX_GROUP, tk.stream_grouped_launch = max_group, launch


def run_interpreter_checks() -> None:
    """Triton kernels vs fp32 references at tiny shapes; needs TRITON_INTERPRET=1 set before
    triton is first imported, hence a fresh process (see test_triton_kernels_interpreted)."""
    for config, num_tokens, symmetric in INTERPRETER_CASES:
        _check_kernel_case(config, num_tokens, symmetric)
    _check_dequant_and_expert()
    _check_stream_precision()
    _check_prep_xh()
    _check_grouped()


def test_group_offsets() -> None:
    from duoserve.quant.triton_kernels import group_offsets

    class Buf:  # only the address matters
        def __init__(self, ptr: int) -> None:
            self.ptr = ptr

        def data_ptr(self) -> int:
            return self.ptr

    a, b, c = Buf(1000 + 96), Buf(1000), Buf(1000 + 3 * 96)
    base, unit, index = group_offsets([a, b, c])
    assert (base, unit, index) == (b, 96, [1, 0, 3])
    same = [Buf(8), Buf(8)]
    assert group_offsets(same) == (same[0], 4, [0, 0])
    assert group_offsets([Buf(0), Buf(6)]) is None  # 6 bytes apart: int32 views misalign
    assert group_offsets([Buf(0), Buf(4), Buf(4 << 32)]) is None  # an index past int32


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_interpreted() -> None:
    run_interpreted("import tests.test_quant as t; t.run_interpreter_checks()")


# --------------------------------------------------------------------------- GPU, real shapes

GPU_SHAPES = {"mixtral": (4096, 14336), "qwen3-30b-a3b": (2048, 768)}  # (H, I)


def _gpu_expert(h: int, i: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    mats = [torch.randn(r, c, generator=gen, device="cuda") * 0.02 for r, c in ((i, h),) * 2]
    mats.append(torch.randn(h, i, generator=gen, device="cuda") * 0.02)
    return quantize_expert_int4(*[m.bfloat16() for m in mats], group_size=128)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_kernels_gpu_real_shapes(shape: str) -> None:
    # the default config of every kernel kind, each op, fp32 outputs: tight tolerances
    set_autotune(False)
    h, i = GPU_SHAPES[shape]
    buffer, layout = _gpu_expert(h, i)
    ops = {"gate_up": layout.gate_up_views(buffer), "down": layout.down_views(buffer)}
    gen = torch.Generator(device="cuda").manual_seed(1)
    for t in (1, 3, 16, 100):
        for kind in kinds_for_tokens(t):
            if kind.startswith("tc"):  # tests/test_quant_tc.py (tc_s rounds weights to bf16)
                continue
            config = candidate_configs(kind)[0]
            for op, w in ops.items():
                w_ref = dequantize_int4(*w, 128, dtype=torch.float32)  # exact weights
                x = torch.randn(t, w_ref.shape[1], generator=gen, device="cuda").bfloat16()
                ref = x.float() @ w_ref.T
                n_out = w_ref.shape[0] // 2 if op == "gate_up" else w_ref.shape[0]
                out = torch.full((t, n_out), float("nan"), device="cuda")  # poisoned, fp32
                if op == "gate_up":
                    int4_gate_up_silu(x, *w, 128, out=out, config=config)
                    gate, up = ref.chunk(2, dim=1)
                    ref = F.silu(gate) * up
                else:
                    int4_linear(x, *w, 128, out=out, config=config)
                assert _rel(out, ref) < 1e-4, (shape, t, kind, op, _rel(out, ref))
    for w in ops.values():
        shape_nk = (w[0].shape[0], w[0].shape[1] * 8)
        scratch = torch.full(shape_nk, float("nan"), dtype=torch.bfloat16, device="cuda")
        dequantize_int4_into(*w, 128, scratch, config=candidate_configs("dequant")[0])
        assert torch.equal(scratch, dequantize_int4(*w, 128)), "dequant kernel not bit-exact"


def _gpu_ops(shape: str):
    # (H, I, gate/up views, down views, their fp32 dequantized weights) of the shape's expert
    h, i = GPU_SHAPES[shape]
    buffer, layout = _gpu_expert(h, i)
    gate_up, down = layout.gate_up_views(buffer), layout.down_views(buffer)
    w_gu = dequantize_int4(*gate_up, 128, dtype=torch.float32)
    return h, i, gate_up, down, w_gu, dequantize_int4(*down, 128, dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_stream_variants_gpu_real_shapes(shape: str) -> None:
    # gate and up in one pass, prefetch two steps ahead (EVEN and masked K), fp32 outputs
    h, i, gate_up, down, w_gu, w_d = _gpu_ops(shape)
    gen = torch.Generator(device="cuda").manual_seed(4)
    configs = [
        KernelConfig("stream", 1, 1024, 1, 1, prefetch=True, one_pass=True, ahead=2),
        KernelConfig("stream", 2, 2048, 2, 2, prefetch=True, one_pass=True),
        KernelConfig("stream", 4, 4096, 4, 4, prefetch=True, ahead=2),  # K = 14336: masked
    ]
    for cfg in configs:
        t = cfg.block_t
        x = torch.randn(t, h, generator=gen, device="cuda").bfloat16()
        gate, up = (x.float() @ w_gu.T).chunk(2, dim=1)
        act = torch.full((t, i), float("nan"), device="cuda")
        int4_gate_up_silu(x, *gate_up, 128, out=act, config=cfg)
        assert _rel(act, F.silu(gate) * up) < 1e-4, (shape, cfg, "gate_up")
        a = act.bfloat16()
        y = torch.full((t, h), float("nan"), device="cuda")
        int4_linear(a, *down, 128, out=y, config=cfg)
        assert _rel(y, a.float() @ w_d.T) < 1e-4, (shape, cfg, "down")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_stream_half_gpu_real_shapes(shape: str) -> None:
    # fp16x2 products (half) against fp64 references, fp32 outputs: plain x, 1% outliers of
    # 100x, and x spanning 1e-6..1e6 (beyond fp16's range: each chunk is rescaled)
    h, i, gate_up, down, w_gu, w_d = _gpu_ops(shape)
    w_gu, w_d = w_gu.double(), w_d.double()
    gen = torch.Generator(device="cuda").manual_seed(5)
    configs = [
        KernelConfig("stream", 1, 1024, 1, 1, prefetch=True, one_pass=True, ahead=2, half=True),
        KernelConfig("stream", 4, 2048, 2, 2, prefetch=True, half=True),
        KernelConfig("stream", 2, 1024, 4, 1, prefetch=True, half=True),  # K = 14336: masked
    ]

    def inputs(t: int, k: int):
        x = torch.randn(t, k, generator=gen, device="cuda")
        outliers = torch.rand(t, k, generator=gen, device="cuda") < 0.01
        wide = 10.0 ** (torch.rand(t, k, generator=gen, device="cuda") * 12 - 6)
        wide *= torch.randint(0, 2, (t, k), generator=gen, device="cuda") * 2 - 1
        return {"plain": x, "outliers": x * (1 + 99 * outliers), "wide": wide}

    for cfg in configs:
        t = cfg.block_t
        for label, x in inputs(t, h).items():
            x = x.bfloat16()
            gate, up = (x.double() @ w_gu.T).chunk(2, dim=1)
            act = torch.full((t, i), float("nan"), device="cuda")
            int4_gate_up_silu(x, *gate_up, 128, out=act, config=cfg)
            assert _rel(act.double(), F.silu(gate) * up) < 1e-3, (shape, cfg, label, "gate_up")
        for label, a in inputs(t, i).items():
            a = a.bfloat16()
            y = torch.full((t, h), float("nan"), device="cuda")
            int4_linear(a, *down, 128, out=y, config=cfg)
            assert _rel(y.double(), a.double() @ w_d.T) < 1e-3, (shape, cfg, label, "down")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_expert_forward_gpu_real_shapes(shape: str) -> None:
    # the engine's entry point (PINNED or default configs) vs the torch reference, bf16 output
    set_autotune(False)
    h, i = GPU_SHAPES[shape]
    buffer, layout = _gpu_expert(h, i)
    x = torch.randn(512, h, generator=torch.Generator().manual_seed(2)).bfloat16().cuda()
    expected = expert_forward_int4_reference(x, buffer, layout)
    for t in (1, 2, 4, 8, 16, 64, 512):
        got = expert_forward_int4(x[:t], buffer, layout)
        assert _rel(got, expected[:t]) < 1e-2, (shape, t, _rel(got, expected[:t]))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_experts_grouped_gpu_real_shapes(shape: str) -> None:
    # grouped decode (GROUPED_PINNED / PINNED configs) of 12 experts in a pool, scrambled,
    # 1..4 tokens each (three buckets, 8 + 1 experts in the 1-token bucket's launches) against
    # each expert alone in a grouped launch and through expert_forward_int4 with the same
    # configs pinned (bit for bit), and against the torch reference
    from duoserve.quant import triton_kernels as tk

    set_autotune(False)
    h, i = GPU_SHAPES[shape]
    experts = [_gpu_expert(h, i, seed=20 + e) for e in range(3)]
    layout = experts[0][1]
    pool = torch.empty(12, layout.num_bytes, dtype=torch.uint8, device="cuda")
    order = [7, 2, 9, 0, 5, 1, 8, 3, 6, 4, 11, 10]
    counts = [1, 2, 1, 1, 4, 1, 3, 1, 1, 1, 1, 1]
    bufs = [pool[s] for s in order]
    for e, b in enumerate(bufs):
        b.copy_(experts[e % 3][0])
    spans = [(sum(counts[:e]), n) for e, n in enumerate(counts)]
    x = torch.randn(sum(counts), h, generator=torch.Generator().manual_seed(3)).bfloat16().cuda()
    out = torch.full_like(x, float("nan"))
    tk.experts_forward_int4_grouped(x, spans, bufs, layout, out)
    keys = [(2 * i, h, True, b) for b in (1, 2, 4)] + [(h, i, False, b) for b in (1, 2, 4)]
    saved = dict(tk.PINNED)
    tk.PINNED.update({k: tk.GROUPED_PINNED[k] for k in keys if k in tk.GROUPED_PINNED})
    try:
        for (a, n), b in zip(spans, bufs):
            one = torch.full_like(x[a : a + n], float("nan"))
            tk.experts_forward_int4_grouped(x[a : a + n], [(0, n)], [b], layout, one)
            assert torch.equal(out[a : a + n], one), (shape, a, n, "alone in its launch")
            alone = expert_forward_int4(x[a : a + n], b, layout)  # the same configs pinned
            assert torch.equal(out[a : a + n], alone), (shape, a, n)
            ref = expert_forward_int4_reference(x[a : a + n], b, layout)
            assert _rel(out[a : a + n], ref) < 1e-2, (shape, a, n, _rel(out[a : a + n], ref))
    finally:
        tk.PINNED.clear()
        tk.PINNED.update(saved)


@pytest.mark.gpu
def test_experts_prefill_overlapped_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # dequant of expert e+1 on a side stream: the same outputs as one expert after the other
    # on the dequant + cuBLAS path (the one experts_prefill_overlapped overlaps)
    from duoserve.quant import triton_kernels
    from duoserve.quant.int4_prefill import experts_prefill_overlapped

    monkeypatch.setattr(triton_kernels, "PREFILL_MODE", "dequant")
    set_autotune(False)
    h, i = GPU_SHAPES["qwen3-30b-a3b"]
    experts = [_gpu_expert(h, i) for _ in range(3)]
    layout = experts[0][1]
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(t, h, generator=gen).bfloat16().cuda() for t in (300, 17, 512)]
    numel = 3 * h * i
    scratches = tuple(torch.empty(numel, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    got = experts_prefill_overlapped(
        xs, [b for b, _ in experts], layout, scratches, torch.cuda.Stream()
    )
    for x, (buffer, _), y in zip(xs, experts, got, strict=True):
        expected = expert_forward_int4(x, buffer, layout, scratch=torch.empty_like(scratches[0]))
        assert torch.equal(y, expected), "overlapped prefill differs from the serial path"
