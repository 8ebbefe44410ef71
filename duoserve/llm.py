"""The offline Python API: `LLM(...).generate(prompts, SamplingParams(...))` and `.logits(...)`."""

from __future__ import annotations

from typing import Any

import torch

from duoserve.config import EngineConfig
from duoserve.engine.llm_engine import LLMEngine
from duoserve.engine.request import RequestOutput
from duoserve.layers.sampler import SamplingParams


class LLM:
    """A model loaded for offline generation (no server)."""

    def __init__(
        self,
        model: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        **engine_options: Any,
    ) -> None:
        self.engine = LLMEngine(model, EngineConfig(device=device, dtype=dtype, **engine_options))
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        ids = [self.engine.add_request(p, sp).request_id for p, sp in zip(prompts, params_list)]
        final: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def chat(
        self, messages: list[dict[str, Any]], sampling_params: SamplingParams | None = None
    ) -> RequestOutput:
        """Render one conversation with the chat template and generate the reply."""
        ids = self.tokenizer.encode_chat(messages)
        return self.generate([ids], sampling_params)[0]

    def logits(self, batch: list[list[int]]) -> list[torch.Tensor]:
        """Float32 logits [T, V] of every position of each token-id sequence (one prefill)."""
        engine = self.engine
        assert not engine.has_unfinished_requests(), "logits() needs an idle engine"
        results = []
        for start in range(0, len(batch), engine.kv.num_slots):
            chunk = batch[start : start + engine.kv.num_slots]
            for ids in chunk:
                engine.validate_prompt(ids, SamplingParams(max_tokens=1))
            slots = [engine.kv.allocate_slot() for _ in chunk]
            try:
                logits = engine.runner.forward(
                    "prefill", chunk, slots, [0] * len(chunk), all_logits=True
                )
            finally:
                for slot in slots:
                    engine.kv.free_slot(slot)
            offsets = [0]
            for ids in chunk:
                offsets.append(offsets[-1] + len(ids))
            results += [logits[offsets[i] : offsets[i + 1]].cpu() for i in range(len(chunk))]
        return results
