"""int4 experts on the GPU under a 0.3 GiB budget (`pytest -m gpu`).

Its own file: an engine's budget caps the whole process (torch's per-process memory
fraction), so this test needs a process where no earlier test's engine still holds device
memory; scripts/gpu_tests.sh runs every GPU test file in its own process.
"""

from __future__ import annotations

import pytest
import torch

from duoserve import LLM, SamplingParams

pytestmark = pytest.mark.gpu
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def test_int4_experts_on_gpu_policies_agree():
    """int4 experts through the Triton kernels: fused GEMV (decode), dequant + matmul (prefill)."""
    kw = dict(device="cuda", dtype="bfloat16", max_model_len=128, expert_dtype="int4")
    prompts = ["A list is", "To open a file for reading, " * 4]  # the second: > 16 tokens
    resident = LLM(None, **kw)
    want_logits = resident.logits([resident.tokenizer.encode(p) for p in prompts])
    want = [o.output_token_ids for o in resident.generate(prompts, GREEDY)]
    del resident  # the budget caps the whole process: one engine at a time
    torch.cuda.empty_cache()
    for policy in ("lru", "ondemand"):
        llm = LLM(None, policy=policy, gpu_memory_budget=0.3, **kw)
        got_logits = llm.logits([llm.tokenizer.encode(p) for p in prompts])
        for got, ref in zip(got_logits, want_logits):
            assert torch.equal(got, ref), policy
        assert [o.output_token_ids for o in llm.generate(prompts, GREEDY)] == want, policy
        del llm
        torch.cuda.empty_cache()
    bf16 = LLM(None, device="cuda", dtype="bfloat16", max_model_len=128)
    ref = bf16.logits([bf16.tokenizer.encode(prompts[1])])[0]
    got = want_logits[1]
    rel = ((got - ref).norm() / ref.norm()).item()
    print(f"int4 vs bf16 experts, default model logits: relative L2 difference {rel:.4f}")
    assert rel < 0.1
