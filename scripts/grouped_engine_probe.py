"""GPU: the engine's int4 decode with grouped expert launches on and off
(offload.resident.GROUPED_INT4_DECODE), the built-in default model, all experts resident:
milliseconds per decode step for 1 and 4 prompts, and whether the greedy tokens agree.

    PYTHONPATH=$PWD python3 scripts/grouped_engine_probe.py
"""

import time

import torch

from duoserve import LLM, SamplingParams
from duoserve.offload import resident

STEPS = 64
params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)
llm = LLM(None, device="cuda", dtype="bfloat16", max_model_len=256, expert_dtype="int4")
prompts = ["The capital of France is", "A list is", "To open a file,", "Once upon a time"]
tokens = {}
for batch in (1, 4):
    for grouped in (True, False, True, False):
        resident.GROUPED_INT4_DECODE = grouped
        llm.generate(prompts[:batch], SamplingParams(temperature=0, max_tokens=4))  # warm
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = llm.generate(prompts[:batch], params)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3 / STEPS
        tokens[(batch, grouped)] = [o.output_token_ids for o in out]
        print(f"{batch} prompt(s), grouped {grouped}: {ms:.2f} ms per decode step (prefill incl.)")
    same = tokens[(batch, True)] == tokens[(batch, False)]
    print(f"{batch} prompt(s): greedy tokens grouped == one by one: {same}")
