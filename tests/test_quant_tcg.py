"""The Gluon mma.sync decode kernel (kind "tcg", quant/int4_tcg.py). Gluon has no interpreter:
the CPU test checks the x permutation the kernel's B fragments assume; the GPU test runs the
kernel at the real expert shapes against fp32 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from duoserve.quant.int4 import dequantize_int4, quantize_expert_int4
from duoserve.quant.int4_tcg import available, permute_x_tcg, supports
from duoserve.quant.triton_kernels import KernelConfig, int4_gate_up_silu, int4_linear


def test_permute_x_tcg_matches_the_b_fragments() -> None:
    # lane a (of 4) holds, for nibble plane j, x[128 g + 32 a + 8 v + j] at 128 g + 32 a + 4 j + v
    x = torch.arange(2 * 256, dtype=torch.float32).view(2, 256)
    xp = permute_x_tcg(x)
    for t in range(2):
        for g in range(2):
            for a in range(4):
                for j in range(8):
                    for v in range(4):
                        got = xp[t, 128 * g + 32 * a + 4 * j + v]
                        assert got == x[t, 128 * g + 32 * a + 8 * v + j]


def test_tcg_scope() -> None:
    assert supports(128, 8) and not supports(64, 1) and not supports(128, 9)
    assert not available(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 14336), (2048, 768)])  # Mixtral, Qwen3-30B-A3B
def test_tcg_gpu_real_shapes(shape: tuple[int, int]) -> None:
    h, i = shape
    gen = torch.Generator(device="cuda").manual_seed(3)
    mats = [torch.randn(r, c, generator=gen, device="cuda") * 0.02 for r, c in ((i, h),) * 2]
    mats.append(torch.randn(h, i, generator=gen, device="cuda") * 0.02)
    buffer, layout = quantize_expert_int4(*[m.bfloat16() for m in mats], group_size=128)
    gate_up, down = layout.gate_up_views(buffer), layout.down_views(buffer)
    w_gu = dequantize_int4(*gate_up, 128, dtype=torch.float32)
    w_d = dequantize_int4(*down, 128, dtype=torch.float32)
    configs = [
        KernelConfig("tcg", 16, block_t=8, num_warps=1, split_k=1),
        KernelConfig("tcg", 32, block_t=8, num_warps=2, split_k=4),
        KernelConfig("tcg", 64, block_t=8, num_warps=4, split_k=3, prefetch=True),
        KernelConfig("tcg", 16, block_t=8, num_warps=1, split_k=8, prefetch=True),
    ]
    for t in (1, 3, 8):
        x = torch.randn(t, h, generator=gen, device="cuda").bfloat16()
        gate, up = (x.float() @ w_gu.T).chunk(2, dim=1)
        act_ref = F.silu(gate) * up
        act_in = act_ref.bfloat16()
        for cfg in configs:
            act = torch.full((t, i), float("nan"), device="cuda")  # poisoned, fp32
            int4_gate_up_silu(x, *gate_up, 128, out=act, config=cfg)
            err = ((act - act_ref).norm() / act_ref.norm()).item()
            assert err < 1e-4, (shape, t, cfg, "gate_up", err)
            y = torch.full((t, h), float("nan"), device="cuda")
            int4_linear(act_in, *down, 128, out=y, config=cfg)
            ref = act_in.float() @ w_d.T
            err = ((y - ref).norm() / ref.norm()).item()
            assert err < 1e-4, (shape, t, cfg, "down", err)
