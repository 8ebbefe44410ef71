"""The warp-specialized Gluon prefill kernel (kind "wgs", quant/int4_wgs.py). Gluon has no
interpreter: the CPU tests check its scope, its tile choice, the word-to-bf16-pairs inline asm
(emulated bit for bit against dequantize_int4) and that it compiles for sm_90; the GPU tests
run it at the real expert shapes against fp32 references."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from duoserve.quant import int4_wgs, triton_kernels
from duoserve.quant.int4 import Int4ExpertLayout, dequantize_int4, quantize_expert_int4
from duoserve.quant.int4_wgs import WgsConfig, configs_for, supports


def test_wgs_scope() -> None:
    assert supports(128, torch.bfloat16)
    assert not supports(64, torch.bfloat16) and not supports(128, torch.float16)
    assert not int4_wgs.available(torch.device("cpu"))
    mixtral = Int4ExpertLayout(4096, 14336, 128, has_zeros=True)
    assert not int4_wgs.takes(512, mixtral, torch.device("cpu"))
    with pytest.raises(AssertionError, match="bm 64"):
        WgsConfig(bm=64, swap=False)  # x as the A operand needs two warpgroups of m64
    with pytest.raises(AssertionError, match="split_k 3"):
        WgsConfig(split_k=3)


def test_configs_for_fills_the_sms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(int4_wgs, "_num_sms", lambda device: 132)  # an H100
    mixtral = Int4ExpertLayout(4096, 14336, 128, has_zeros=True)
    gate_up, down = configs_for(512, mixtral, torch.device("cpu"))
    # gate/up: 2 token tiles x 224 row tiles; down: 2 x 32 tiles, so split 2 -> 128 CTAs
    assert (gate_up.bm, gate_up.split_k, down.bm, down.split_k) == (256, 1, 256, 2)
    assert configs_for(100, mixtral, torch.device("cpu"))[0].bm == 128
    assert configs_for(40, mixtral, torch.device("cpu"))[0].bm == 64


# --- the inline asm of _int4_wgs_gluon._pairs_asm, emulated instruction by instruction ---


def _bf16(bits: int) -> float:
    return torch.tensor([bits & 0xFFFF], dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def _bits(x: torch.Tensor) -> int:
    return int(x.bfloat16().view(torch.int16).item()) & 0xFFFF


def _fma_bf16x2(a: int, b: int, c: int) -> int:
    # fma.rn.bf16x2 per half: a * b + c rounded once (fp64 holds the exact result here)
    out = 0
    for half in (0, 16):
        va, vb, vc = (_bf16(v >> half).double() for v in (a, b, c))
        out |= _bits(va * vb + vc) << half
    return out


def _run_asm(asm: str, regs: dict[str, int]) -> dict[str, int]:
    # the four instruction kinds the asm uses, on 32-bit registers
    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}." or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        d, *src = [a.strip() for a in args.split(",")]
        v = [regs[a] if a in regs else int(a, 0) for a in src]
        if op == "mov.b32":
            regs[d] = v[0]
        elif op == "shr.u32":
            regs[d] = v[0] >> v[1]
        elif op == "prmt.b32":  # selector nibble i picks byte i of d from {v1, v0}
            pool = [(v[0] >> 8 * i) & 0xFF for i in range(4)] + [
                (v[1] >> 8 * i) & 0xFF for i in range(4)
            ]
            regs[d] = sum(pool[(v[2] >> 4 * i) & 0xF] << 8 * i for i in range(4))
        elif op == "lop3.b32":
            assert v[3] == 0xEA, "only (a & b) | c"
            regs[d] = (v[0] & v[1]) | v[2]
        elif op == "fma.rn.bf16x2":
            regs[d] = _fma_bf16x2(*v)
        else:
            raise AssertionError(f"unemulated {op}")
    return regs


def test_pairs_asm_is_dequantize_int4_bit_for_bit() -> None:
    from duoserve.quant._int4_wgs_gluon import _pairs_asm

    asm = re.sub(r"\$(\d)", r"r\1", _pairs_asm())
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(-(2**31), 2**31, (16,), generator=gen, dtype=torch.int64)
    for word in words.tolist():
        word &= 0xFFFFFFFF
        for z in (0, 3, 8, 15):
            s = torch.randn(1, generator=gen).bfloat16()
            c = _bits(torch.tensor(-128.0 - z)) | _bits(torch.tensor(-16.0 - z)) << 16
            regs = _run_asm(asm, {"r4": word, "r5": c, "r6": _bits(s) | _bits(s) << 16})
            q = torch.tensor([[word]], dtype=torch.int64).to(torch.int32).view(1, 1)
            ref = dequantize_int4(q, s.view(1, 1), torch.tensor([[z]], dtype=torch.uint8), 8)
            got = [_bf16(regs[f"r{k}"] >> h).item() for k in range(4) for h in (0, 16)]
            assert got == ref.float().flatten().tolist(), (hex(word), z)


@pytest.mark.parametrize(
    "cfg, fused",
    [(WgsConfig(), True), (WgsConfig(bm=64, split_k=2), False)],
    ids=["gate_up_bm256", "down_bm64_split2"],
)
def test_wgs_compiles_for_sm90(cfg: WgsConfig, fused: bool) -> None:
    pytest.importorskip("triton.experimental.gluon")
    kernel = int4_wgs.compile_sm90(cfg, fused)
    ptx = kernel.asm["ptx"]
    assert "wgmma.mma_async" in ptx and "setmaxnreg" in ptx and "cp.async.bulk.tensor" in ptx
    assert kernel.metadata.shared <= 227 * 1024


# --- GPU ---


@pytest.fixture
def free_split_scratch():
    # the split-K workspace is cached per device: give it back for later tests' memory budgets
    yield
    triton_kernels._SCRATCH.clear()
    torch.cuda.empty_cache()


def _expert(h: int, i: int, symmetric: bool, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    mats = [torch.randn(r, c, generator=gen, device="cuda") * 0.02 for r, c in ((i, h),) * 2]
    mats.append(torch.randn(h, i, generator=gen, device="cuda") * 0.02)
    buffer, layout = quantize_expert_int4(*[m.bfloat16() for m in mats], symmetric=symmetric)
    w_gu = dequantize_int4(*layout.gate_up_views(buffer), 128, dtype=torch.float32)
    w_d = dequantize_int4(*layout.down_views(buffer), 128, dtype=torch.float32)
    return buffer, layout, w_gu, w_d


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.gpu
@pytest.mark.usefixtures("free_split_scratch")
@pytest.mark.parametrize("shape", [(4096, 14336), (2048, 768)])  # Mixtral, Qwen3-30B-A3B
def test_wgs_gpu_real_shapes(shape: tuple[int, int]) -> None:
    h, i = shape
    buffer, layout, w_gu, w_d = _expert(h, i, symmetric=False, seed=5)
    gate_up, down = layout.gate_up_views(buffer), layout.down_views(buffer)
    variants = [
        None,  # configs_for
        (WgsConfig(swap=False), WgsConfig(swap=False, split_k=2)),
        (WgsConfig(bm=128, tail_split=True), WgsConfig(bm=64, stages=3, halves_per_stage=2)),
    ]
    gen = torch.Generator(device="cuda").manual_seed(6)
    for t in (17, 100, 512):
        x = torch.randn(t, h, generator=gen, device="cuda").bfloat16()
        gate, up = (x.float() @ w_gu.T).chunk(2, dim=1)
        act_ref = F.silu(gate) * up
        y_ref = act_ref.bfloat16().float() @ w_d.T
        for cfgs in variants:
            gu_cfg, d_cfg = cfgs or configs_for(t, layout, x.device)
            act = torch.full((t, i), float("nan"), device="cuda", dtype=torch.bfloat16)
            int4_wgs.wgs_matmul(x, gate_up, 128, act, True, gu_cfg)
            y = torch.full((t, h), float("nan"), device="cuda", dtype=torch.bfloat16)
            int4_wgs.wgs_matmul(act_ref.bfloat16(), down, 128, y, False, d_cfg)
            assert _rel(act, act_ref) < 5e-3, (shape, t, gu_cfg)
            assert _rel(y, y_ref) < 5e-3, (shape, t, d_cfg)
        # the engine entry point takes wgs for > 16 tokens on sm_90
        got = triton_kernels.expert_forward_int4(x, buffer, layout)
        assert _rel(got, y_ref) < 1e-2, (shape, t)


@pytest.mark.gpu
@pytest.mark.usefixtures("free_split_scratch")
def test_wgs_gpu_symmetric_and_repeated_splits() -> None:
    # no zero points (HAS_ZEROS off), and split-K's arrival counters reset between launches
    buffer, layout, w_gu, w_d = _expert(4096, 14336, symmetric=True, seed=7)
    x = torch.randn(300, 4096, device="cuda").bfloat16()
    gate, up = (x.float() @ w_gu.T).chunk(2, dim=1)
    ref = (F.silu(gate) * up).bfloat16().float() @ w_d.T
    cfgs = (WgsConfig(), WgsConfig(split_k=2))  # down: 2 x 32 tiles, split in 2
    first = int4_wgs.expert_forward_wgs(x, buffer, layout, *cfgs)
    assert _rel(first, ref) < 1e-2
    for _ in range(3):
        assert torch.equal(int4_wgs.expert_forward_wgs(x, buffer, layout, *cfgs), first)
