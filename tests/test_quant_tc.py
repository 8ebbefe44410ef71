"""The tensor-core int4 kernel ("tc", "tc_s"; quant/_int4_tc_triton.py, quant/int4_tc.py).

Oracles: the PTX block's semantics emulated bit by bit in Python against the format's
definition; fp32 matmuls of the exact weights (tc) and of the bf16 weights `dequantize_int4`
gives (tc_s), under the Triton interpreter at tiny shapes and on the GPU at real shapes.
"""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch
import torch.nn.functional as F

from duoserve.quant.int4 import (
    Int4ExpertLayout,
    dequantize_int4,
    pack_expert_int4,
    quantize_int4,
)
from duoserve.quant.triton_kernels import KernelConfig, candidate_configs

from .conftest import run_interpreted

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# --------------------------------------------------------------------------- the PTX block


def _bf16_halves(bits: int) -> tuple[float, float]:
    # a 32-bit register -> its two bf16 values (low half, high half)
    words = torch.tensor([(bits & 0xFFFF) << 16, (bits >> 16) << 16], dtype=torch.int64)
    return tuple(words.to(torch.int32).view(torch.float32).tolist())


def _bf16_bits(lo: float, hi: float) -> int:
    # two values -> a bf16x2 register, each rounded to nearest even
    halves = torch.tensor([lo, hi], dtype=torch.float32).bfloat16().view(torch.int16)
    lo_bits, hi_bits = (int(v) & 0xFFFF for v in halves)
    return lo_bits | hi_bits << 16


def _emulate_ptx(asm: str, regs: dict[str, int]) -> dict[str, int]:
    """Run the block's instructions (the subset it uses) on 32-bit values."""
    env = dict(regs)

    def val(operand: str) -> int:
        return int(operand, 16) if operand.startswith("0x") else env[operand]

    for line in asm.strip("{}\n").splitlines():
        line = line.strip().rstrip(";")
        if not line or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        a = [s.strip() for s in rest.split(",")]
        if op == "mov.b32":
            env[a[0]] = val(a[1])
        elif op == "prmt.b32":  # d.byte i = {b, a}.byte[selector nibble i]
            pool = [(val(a[1]) >> 8 * i) & 255 for i in range(4)]
            pool += [(val(a[2]) >> 8 * i) & 255 for i in range(4)]
            env[a[0]] = sum(pool[(val(a[3]) >> 4 * i) & 7] << 8 * i for i in range(4))
        elif op == "shr.u32":
            env[a[0]] = val(a[1]) >> int(a[2])
        elif op == "lop3.b32":
            assert a[4] == "0xea", "only (a & b) | c is emulated"
            env[a[0]] = (val(a[1]) & val(a[2])) | val(a[3])
        elif op == "fma.rn.bf16x2":  # exact a * b + c for these operands, rounded once
            x, y, z = (_bf16_halves(val(r)) for r in a[1:4])
            env[a[0]] = _bf16_bits(*(x[i] * y[i] + z[i] for i in range(2)))
        else:
            raise AssertionError(f"unexpected instruction {op}")
    return env


@needs_triton
@pytest.mark.parametrize("pre_scale", [False, True])
def test_planes_ptx_semantics(pre_scale: bool) -> None:
    # plane j of words (a, b) = (q_j - z) [* s] per half, exactly / rounded as dequantize_int4
    from duoserve.quant._int4_tc_triton import _planes_asm

    asm, rng = _planes_asm(pre_scale), random.Random(0)
    for _ in range(300):
        words = [rng.getrandbits(32) for _ in range(2)]
        zeros = [rng.randint(0, 16) for _ in range(2)]  # GPTQ v1 zero points reach 16
        scales = torch.randn(2).mul(0.01).bfloat16().float().tolist()
        regs = {"$8": words[0], "$9": words[1], "$10": _bf16_bits(-128 - zeros[0], -128 - zeros[1])}
        regs["$11"] = _bf16_bits(*scales)
        env = _emulate_ptx(asm, regs)
        for j in range(8):
            want = [float((w >> 4 * j & 15) - z) for w, z in zip(words, zeros, strict=True)]
            if pre_scale:
                want = torch.tensor(want).mul(torch.tensor(scales)).bfloat16().float().tolist()
            assert list(_bf16_halves(env[f"${j}"])) == want, (j, words, zeros)


# --------------------------------------------------------------------------- interpreter


def _expert(h, i, symmetric, scale_dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    mats = [torch.randn(r, c, generator=gen, device=device) * 0.02 for r, c in ((i, h),) * 2]
    mats.append(torch.randn(h, i, generator=gen, device=device) * 0.02)
    gate, up, down = (
        quantize_int4(m.bfloat16(), 128, symmetric=symmetric, scale_dtype=scale_dtype) for m in mats
    )
    scale_name = "bf16" if scale_dtype == torch.bfloat16 else "fp16"
    layout = Int4ExpertLayout(h, i, 128, has_zeros=not symmetric, scale_dtype=scale_name)
    return pack_expert_int4(gate, up, down, layout), layout


def check_tc(config: KernelConfig, num_tokens: int, symmetric: bool, scale_dtype, device,
             h: int = 256, i: int = 384, tol: float = 1e-5) -> None:  # fmt: skip
    """Both matrices (fp32 outputs) against fp32 matmuls of the weights the kernel promises,
    then the whole expert (permuted activation between the two launches)."""
    from duoserve.quant.int4_tc import expert_forward_tc, tc_matmul

    buffer, layout = _expert(h, i, symmetric, scale_dtype, device)
    wdt = torch.float32 if config.kernel == "tc" else torch.bfloat16
    gate_up, down = layout.gate_up_views(buffer), layout.down_views(buffer)
    w_gu = dequantize_int4(*gate_up, 128, dtype=wdt).float()
    w_d = dequantize_int4(*down, 128, dtype=wdt).float()
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(num_tokens, h, generator=gen, device=device).bfloat16()
    act = torch.full((num_tokens, i), float("nan"), device=device)  # poisoned fp32
    tc_matmul(config, x, gate_up, 128, act, True)
    gate, up = (x.float() @ w_gu.T).chunk(2, dim=1)
    assert _rel(act, F.silu(gate) * up) < tol, (config, num_tokens, "gate_up")
    act = act.bfloat16()
    y = torch.full((num_tokens, h), float("nan"), device=device)
    tc_matmul(config, act, down, 128, y, False)
    assert _rel(y, act.float() @ w_d.T) < tol, (config, num_tokens, "down")
    expected = (F.silu(gate) * up).bfloat16().float() @ w_d.T
    got = expert_forward_tc(x, buffer, layout, config, config)
    assert _rel(got, expected) < 1e-2, (config, num_tokens, "expert")  # bf16 output


# (config, tokens, symmetric, scale dtype): one and several token tiles, split-K (uneven:
# down has 3 groups), prefetched and wide scale loads (3 groups: the last pair and quad are
# partly past the row), fp16 scales (AWQ/GPTQ) with the deferred scale
INTERPRETER_CASES = [
    (KernelConfig("tc", 64, block_t=16, num_stages=2, split_k=1), 1, False, torch.bfloat16),
    (KernelConfig("tc", 64, block_t=16, split_k=2, prefetch=True), 3, True, torch.float16),
    (KernelConfig("tc", 128, block_t=16, split_k=3, wide_sz=True), 18, False, torch.float16),
    (KernelConfig("tc_s", 64, block_t=16, num_stages=3, split_k=2), 1, False, torch.bfloat16),
    (KernelConfig("tc_s", 64, block_t=32, split_k=1, wide_sz=True), 40, True, torch.bfloat16),
]


def check_engine_entry() -> None:
    """expert_forward_int4 takes the tc expert path where PINNED names tc for both matrices."""
    from duoserve.quant import triton_kernels as tk
    from duoserve.quant.int4 import expert_forward_int4_reference

    buffer, layout = _expert(256, 384, False, torch.bfloat16, "cpu")
    config = KernelConfig("tc", 64, block_t=16, split_k=2)
    keys = [(768, 256, True, 4), (256, 384, False, 4)]  # gate/up, down at the bucket of 3
    assert tk._decode_tc_configs(3, layout) is None
    tk.PINNED.update(dict.fromkeys(keys, config))
    try:
        assert tk._decode_tc_configs(3, layout) == (config, config)
        x = torch.randn(3, 256, generator=torch.Generator().manual_seed(4)).bfloat16()
        got = tk.expert_forward_int4(x, buffer, layout, backend="triton")
        assert _rel(got, expert_forward_int4_reference(x, buffer, layout)) < 1e-2
    finally:
        for key in keys:
            tk.PINNED.pop(key)


def run_interpreter_checks() -> None:
    """See test_tc_interpreted (TRITON_INTERPRET=1 must be set before triton is imported)."""
    for config, num_tokens, symmetric, scale_dtype in INTERPRETER_CASES:
        check_tc(config, num_tokens, symmetric, scale_dtype, "cpu")
    check_engine_entry()


@needs_triton
def test_tc_interpreted() -> None:
    run_interpreted("import tests.test_quant_tc as t; t.run_interpreter_checks()")


def test_tc_refuses_what_it_cannot_take() -> None:
    from duoserve.quant.int4_tc import launch_tc, permute_x, supports

    assert supports(128, torch.float16, "tc") and not supports(128, torch.float16, "tc_s")
    assert not supports(64, torch.bfloat16) and not supports(384, torch.bfloat16)
    buffer, layout = _expert(256, 128, False, torch.float16, "cpu")
    x = permute_x(torch.zeros(1, 256, dtype=torch.bfloat16), 128)
    y = torch.empty(1, 128, dtype=torch.bfloat16)
    with pytest.raises(AssertionError, match="bf16 scales"):
        launch_tc(KernelConfig("tc_s", 64, block_t=16), x, layout.gate_up_views(buffer), 128, y,
                  True, False)  # fmt: skip


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 14336), (2048, 768)])  # Mixtral, Qwen3-30B-A3B
def test_tc_gpu_real_shapes(shape: tuple[int, int]) -> None:
    # every candidate config at decode and prefill token counts, then fp16 scales and no zeros
    h, i = shape
    for kind, counts in (("tc", (1, 5, 16)), ("tc_prefill", (100, 512))):
        for config in candidate_configs(kind):
            for t in counts:
                check_tc(config, t, False, torch.bfloat16, "cuda", h, i, tol=1e-4)
    check_tc(KernelConfig("tc", 64, block_t=16, split_k=4), 3, True, torch.float16, "cuda", h, i,
             tol=1e-4)  # fmt: skip
