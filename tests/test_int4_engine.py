"""Int4 experts in the engine, against oracles that dequantize the same int4 weights in torch.

Quantize-at-load: the oracle checkpoint holds dequantize(quantize(w)) for every expert weight
(rounded to bf16, as the int4 kernels' reference path does) and runs with bf16 experts.
AWQ/GPTQ: the test packs a tiny checkpoint's linears itself; the oracle holds the dequantized
values (experts rounded to bf16; dense linears exact, as the loader dequantizes them).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from duoserve import LLM, SamplingParams
from duoserve.config import EngineConfig
from duoserve.quant.int4 import dequantize_int4, quantize_int4
from duoserve.quant.loading import int4_group_size

from .conftest import budget_for_slots, make_hf_checkpoint
from .test_parity import PROMPTS

SMALL = dict(
    device="cpu", dtype="float32", max_model_len=64, max_num_seqs=3, max_num_batched_tokens=64
)
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
SIZES = {"mixtral": dict(intermediate_size=32), "qwen3_moe": {}}  # H, I multiples of 16
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # output column held by nibble i of an AWQ word


def budget_for(llm: LLM, num_slots: int) -> float:
    """A budget (GiB) that leaves room for `num_slots` slots of `llm`'s expert format."""
    return budget_for_slots(llm, num_slots)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118
    return out


def write_checkpoint(src: Path, dst: Path, tensors: dict[str, torch.Tensor], quant=None) -> Path:
    """A copy of `src` (config, tokenizer) holding `tensors` in one file."""
    dst.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)
    if quant is not None:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, "quantization_config": quant}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    return dst


def make_checkpoint(family: str, root: Path) -> Path:
    path, _ = make_hf_checkpoint(family, root / family, seed=3, **SIZES[family])
    return path


def assert_same_logits(llm: LLM, want: list[torch.Tensor], exact: bool = True) -> None:
    for got, ref in zip(llm.logits(PROMPTS), want):
        if exact:
            assert torch.equal(got, ref)
        else:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_expert_dtype_is_validated():
    with pytest.raises(ValueError, match="expert_dtype"):
        EngineConfig(expert_dtype="int8")
    assert int4_group_size(192, 112) == 16  # the shipped default model
    assert int4_group_size(4096, 14336) == 128 and int4_group_size(2048, 768) == 128


@pytest.mark.parametrize("family", list(SIZES))
def test_int4_equals_dequantized_oracle(tmp_path, family):
    path = make_checkpoint(family, tmp_path)
    oracle_tensors = {}
    resident_int4 = LLM(str(path), expert_dtype="int4", **SMALL)
    cfg = resident_int4.engine.model_config
    g = int4_group_size(cfg.hidden_size, cfg.moe_intermediate_size)
    for name, w in read_tensors(path).items():
        if ".experts." in name:
            w = dequantize_int4(*quantize_int4(w, g), g, torch.bfloat16).float()
        oracle_tensors[name] = w
    oracle = LLM(str(write_checkpoint(path, tmp_path / "oracle", oracle_tensors)), **SMALL)
    want = oracle.logits(PROMPTS)
    want_tokens = [o.output_token_ids for o in oracle.generate(PROMPTS, GREEDY)]
    top_k = cfg.num_experts_per_tok
    for policy, slots in [("full-gpu", 0), ("lru", top_k), ("ondemand", 1)]:
        llm = resident_int4
        if policy != "full-gpu":
            budget = budget_for(resident_int4, slots)
            llm = LLM(
                str(path), expert_dtype="int4", policy=policy, gpu_memory_budget=budget, **SMALL
            )
        assert llm.engine.experts.layout.group_size == g
        assert_same_logits(llm, want)  # offloaded == resident == oracle, exactly
        got_tokens = [o.output_token_ids for o in llm.generate(PROMPTS, GREEDY)]
        assert got_tokens == want_tokens, (family, policy)
        if policy == "lru":
            assert llm.engine.memory_plan.num_expert_slots == slots
        if policy != "full-gpu":
            stats = llm.engine.experts.stats()
            layout_bytes = llm.engine.experts.layout.num_bytes
            assert llm.engine.memory_plan.expert_bytes == layout_bytes
            assert stats["bytes_copied"] == stats["misses"] * layout_bytes
            assert stats["misses"] > 0


# --------------------------------------------------------------------------- AWQ / GPTQ


def quantize_for_checkpoint(w: torch.Tensor, g: int, perm: torch.Tensor):
    """RTN of W [N, K] over groups of W[:, perm]: codes q [N, K], zeros [G, N] (1..15, so GPTQ
    v1's zero - 1 stays a nibble), fp16 scales [G, N], g_idx [K]."""
    n, k = w.shape
    wp = w[:, perm].view(n, k // g, g)  # [N, G, g]
    lo, hi = wp.amin(-1).clamp(max=0), wp.amax(-1).clamp(min=0)
    s = ((hi - lo) / 15).clamp(min=1e-4).half()  # [N, G]
    z = torch.round(-lo / s.float()).clamp(1, 15)
    qp = (torch.round(wp / s.float()[..., None]) + z[..., None]).clamp(0, 15).view(n, k)
    q = torch.empty_like(qp)
    q[:, perm] = qp
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // g).to(torch.int32)
    return q.to(torch.int64), z.T.to(torch.int64).contiguous(), s.T.contiguous(), g_idx


def pack_words(codes: torch.Tensor) -> torch.Tensor:
    """int64 [R, C, 8] nibbles -> int32 [R, C] (nibble j in bits 4j..4j+3)."""
    words = (codes << torch.arange(0, 32, 4)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_awq(q, z, s) -> dict[str, torch.Tensor]:
    k, n = q.shape[1], q.shape[0]
    order = list(AWQ_ORDER)
    qweight = pack_words(q.T.reshape(k, n // 8, 8)[..., order])  # [K, N/8]
    qzeros = pack_words(z.reshape(z.shape[0], n // 8, 8)[..., order])  # [G, N/8]
    return {"qweight": qweight, "qzeros": qzeros, "scales": s}


def pack_gptq(q, z, s, g_idx) -> dict[str, torch.Tensor]:
    k, n = q.shape[1], q.shape[0]
    qweight = pack_words(q.T.reshape(k // 8, 8, n).transpose(1, 2))  # [K/8, N]
    qzeros = pack_words((z - 1).reshape(z.shape[0], n // 8, 8))  # v1: zero - 1
    return {"qweight": qweight, "qzeros": qzeros, "scales": s, "g_idx": g_idx}


def _quantizable(name: str, w: torch.Tensor, g: int) -> bool:
    return (
        name.endswith(".weight")
        and w.dim() == 2
        and "embed" not in name
        and "lm_head" not in name
        and not name.endswith(".gate.weight")  # routers stay unquantized
        and w.shape[1] % g == 0
        and w.shape[0] % 8 == 0
    )


def quantized_checkpoints(path: Path, fmt: str, g: int, act_order: bool, seed: int = 0):
    """(quantized tensors, oracle tensors) for format "awq" or "gptq"."""
    gen = torch.Generator().manual_seed(seed)
    quantized, oracle, perms = {}, {}, {}
    for name, w in read_tensors(path).items():
        if not _quantizable(name, w, g):
            quantized[name] = oracle[name] = w
            continue
        prefix, k = name.removesuffix(".weight"), w.shape[1]
        perm = torch.arange(k)
        if act_order:  # gate and up of one expert share their input permutation (same x)
            key = (prefix.rsplit(".", 1)[0], k) if ".experts." in name else name
            perm = perms.setdefault(key, torch.randperm(k, generator=gen))
        q, z, s, g_idx = quantize_for_checkpoint(w, g, perm)
        zk, sk = z[g_idx.long()].T, s[g_idx.long()].T.float()  # [N, K]
        w_deq = (q - zk).float() * sk
        oracle[name] = w_deq.bfloat16().float() if ".experts." in name else w_deq
        packed = pack_awq(q, z, s) if fmt == "awq" else pack_gptq(q, z, s, g_idx)
        quantized.update({f"{prefix}.{leaf}": t for leaf, t in packed.items()})
    return quantized, oracle


FORMATS = {
    "awq": dict(quant_method="awq", bits=4, group_size=16, zero_point=True, version="gemm"),
    "gptq": dict(quant_method="gptq", bits=4, group_size=16, sym=False, desc_act=False),
    "gptq-act-order": dict(quant_method="gptq", bits=4, group_size=16, sym=False, desc_act=True),
}


@pytest.mark.parametrize(
    "family,fmt", [("mixtral", "awq"), ("mixtral", "gptq"), ("qwen3_moe", "gptq-act-order")]
)
def test_quantized_checkpoint_equals_dequantized(tmp_path, family, fmt):
    path = make_checkpoint(family, tmp_path)
    act_order = fmt == "gptq-act-order"
    quantized, oracle = quantized_checkpoints(path, fmt.split("-")[0], 16, act_order)
    qpath = write_checkpoint(path, tmp_path / "quantized", quantized, FORMATS[fmt])
    want = LLM(str(write_checkpoint(path, tmp_path / "oracle", oracle)), **SMALL).logits(PROMPTS)
    llm = LLM(str(qpath), **SMALL)  # a quantized checkpoint serves int4 experts
    layout = llm.engine.experts.layout
    assert layout.scale_dtype == "fp16" and layout.has_act_order == act_order
    # act-order permutes the reduction order of gate/up/down: equal up to rounding
    assert_same_logits(llm, want, exact=not act_order)
    budget = budget_for(llm, llm.engine.model_config.num_experts_per_tok)
    offloaded = LLM(str(qpath), policy="lru", gpu_memory_budget=budget, **SMALL)
    for got, ref in zip(offloaded.logits(PROMPTS), llm.logits(PROMPTS)):
        assert torch.equal(got, ref)


def test_unsupported_quantization_config_is_refused(tmp_path):
    path = make_checkpoint("qwen3_moe", tmp_path)
    quantized, _ = quantized_checkpoints(path, "gptq", 16, False)
    bad = {**FORMATS["gptq"], "bits": 8}
    qpath = write_checkpoint(path, tmp_path / "bad", quantized, bad)
    with pytest.raises(ValueError, match="bits=8 is not supported"):
        LLM(str(qpath), **SMALL)
