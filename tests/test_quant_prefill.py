"""The fused W4A16 prefill GEMM (quant/int4_gemm.py, quant/_int4_prefill_triton.py).

Oracle: fp32 matmuls of the exact dequantized weights (q - z) * s. CPU: the Triton interpreter
(a subprocess with TRITON_INTERPRET=1) at a tiny expert; GPU: the real Mixtral and Qwen3-30B-A3B
shapes against the torch reference.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from duoserve.quant import triton_kernels
from duoserve.quant.int4 import dequantize_int4, expert_forward_int4_reference, quantize_expert_int4
from duoserve.quant.int4_gemm import expert_forward_w4a16, group_sums, permute_x, supports
from duoserve.quant.triton_kernels import (
    KernelConfig,
    candidate_configs,
    expert_forward_int4,
    int4_gate_up_silu,
    int4_linear,
    set_autotune,
)

from .conftest import run_interpreted
from .test_quant import _check_kernel_case as check_kernel_case
from .test_quant import _rel
from .test_quant import _tiny_expert as tiny_expert


def test_permute_and_group_sums() -> None:
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0)).bfloat16()
    xp = permute_x(x)  # [T, 4, K/4]
    for j in range(4):
        assert torch.equal(xp[:, j], x[:, j::4])
    expected = x.float().view(3, 4, 64).sum(-1)  # groups of 64 inputs
    assert torch.allclose(group_sums(xp, 64), expected, rtol=1e-6, atol=1e-5)
    assert supports(64) and not supports(32)


def _tiny_expert(symmetric: bool, seed: int):
    # group 64 (the kernel's smallest): down has 3 groups, gate/up 2; I = 192 rows mask a
    # 128-row block
    return tiny_expert(symmetric, seed, group=64, inter=192)


def _check_case(config: KernelConfig, num_tokens: int, symmetric: bool) -> None:
    # gate/up + silu and down against fp32 matmuls of the exact weights (test_quant's check),
    # then the expert: the activation goes to down in the permuted layout, rounded to bf16
    x, buffer, layout, act, w_down = check_kernel_case(
        config, num_tokens, symmetric, seed=1, group=64, inter=192
    )
    got = expert_forward_w4a16(x, buffer, layout, config, config)
    assert _rel(got, act.bfloat16().float() @ w_down.T) < 1e-2, (config, "expert")  # bf16 out
    assert _rel(got, expert_forward_int4_reference(x, buffer, layout)) < 1e-2


# (config, tokens, symmetric): token tiles of 16 and 32 with the last one partly masked, row
# blocks of 64 and 128 (gate/up: 192 rows, the second 128-row block half masked), both MMA
# operand orders
INTERPRETER_CASES = [
    (KernelConfig("w4a16", 64, block_t=16), 37, False),
    (KernelConfig("w4a16", 128, block_t=32), 20, True),
    (KernelConfig("w4a16_b", 64, block_t=16), 19, True),
]


def run_interpreter_checks() -> None:
    """The kernels under the interpreter; TRITON_INTERPRET=1 must be set before triton is
    imported, hence a fresh process (see test_w4a16_interpreted)."""
    for config, num_tokens, symmetric in INTERPRETER_CASES:
        _check_case(config, num_tokens, symmetric)
    # the engine entry point: PREFILL_MODE "w4a16" takes the kernel for > 16 tokens
    buffer, layout = _tiny_expert(False, seed=3)
    x = torch.randn(24, 128, generator=torch.Generator().manual_seed(4)).bfloat16()
    mode, triton_kernels.PREFILL_MODE = triton_kernels.PREFILL_MODE, "w4a16"
    try:
        got = expert_forward_int4(x, buffer, layout, backend="triton")
    finally:
        triton_kernels.PREFILL_MODE = mode
    assert _rel(got, expert_forward_int4_reference(x, buffer, layout)) < 1e-2


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_w4a16_interpreted() -> None:
    run_interpreted("import tests.test_quant_prefill as t; t.run_interpreter_checks()")


def test_auto_mode_needs_pinned_w4a16() -> None:
    # "auto" takes the fused GEMM only where PINNED holds w4a16 configs for both matrices
    pick = triton_kernels._prefill_w4a16_configs
    _, layout = _tiny_expert(False, seed=5)
    h, i = layout.hidden_size, layout.intermediate_size
    keys = [(2 * i, h, True, 512), (h, i, False, 512)]
    cfg = KernelConfig("w4a16", 64, block_t=128)
    saved = {k: triton_kernels.PINNED.pop(k, None) for k in keys}
    try:
        assert pick(100, layout) is None
        triton_kernels.PINNED[keys[0]] = cfg
        assert pick(100, layout) is None  # only one matrix pinned
        triton_kernels.PINNED[keys[1]] = cfg
        assert pick(100, layout) == (cfg, cfg)  # bucket 128 falls back to the 512 entry
    finally:
        for k, v in saved.items():
            triton_kernels.PINNED.pop(k, None)
            if v is not None:
                triton_kernels.PINNED[k] = v


# --------------------------------------------------------------------------- GPU, real shapes

GPU_SHAPES = {"mixtral": (4096, 14336), "qwen3-30b-a3b": (2048, 768)}  # (H, I)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_w4a16_gpu_real_shapes(shape: str) -> None:
    # every w4a16 candidate, both ops, fp32 outputs vs the exact weights; the expert vs the
    # torch reference for several token counts
    set_autotune(False)
    h, i = GPU_SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    mats = [torch.randn(r, c, generator=gen, device="cuda") * 0.02 for r, c in ((i, h),) * 2]
    mats.append(torch.randn(h, i, generator=gen, device="cuda") * 0.02)
    buffer, layout = quantize_expert_int4(*[m.bfloat16() for m in mats], group_size=128)
    gate_up, down = layout.gate_up_views(buffer), layout.down_views(buffer)
    w_gu, w_d = (dequantize_int4(*w, 128, dtype=torch.float32) for w in (gate_up, down))
    x = torch.randn(300, h, generator=gen, device="cuda").bfloat16()
    gate, up = (x.float() @ w_gu.T).chunk(2, dim=1)
    act = (F.silu(gate) * up).bfloat16()
    for config in candidate_configs("w4a16"):
        out = torch.full((300, i), float("nan"), device="cuda")
        int4_gate_up_silu(x, *gate_up, 128, out=out, config=config, backend="triton")
        assert _rel(out, F.silu(gate) * up) < 1e-4, (shape, config, "gate_up")
        out = torch.full((300, h), float("nan"), device="cuda")
        int4_linear(act, *down, 128, out=out, config=config, backend="triton")
        assert _rel(out, act.float() @ w_d.T) < 1e-4, (shape, config, "down")
    expected = expert_forward_int4_reference(x, buffer, layout)
    config = candidate_configs("w4a16")[0]
    for t in (17, 100, 300):
        got = expert_forward_w4a16(x[:t], buffer, layout, config, config)
        assert _rel(got, expected[:t]) < 1e-2, (shape, t, _rel(got, expected[:t]))
