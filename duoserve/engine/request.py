"""Requests are counters: tokens computed vs tokens known; phases are derived, not stored."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from duoserve.layers.sampler import SamplingParams


@dataclass
class Request:
    """One generation request and its progress."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    slot: int | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None
    output_text: str = ""
    generator: torch.Generator | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def is_prefilling(self) -> bool:
        """Prompt tokens remain to be computed (a chunked prefill is under way or not begun)."""
        return self.num_computed_tokens < self.num_prompt_tokens

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Token ids [start, stop) of prompt + output."""
        n = self.num_prompt_tokens
        if stop <= n:
            return self.prompt_token_ids[start:stop]
        return (self.prompt_token_ids + self.output_token_ids)[start:stop]


@dataclass
class RequestOutput:
    """What a caller sees of a request after an engine step."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    text: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    stop_reason: str | int | None
    arrival_time: float
    first_token_time: float | None
    finished_time: float | None

    @classmethod
    def of(cls, req: Request, num_new: int) -> RequestOutput:
        return cls(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            output_token_ids=list(req.output_token_ids),
            text=req.output_text,
            new_token_ids=req.output_token_ids[len(req.output_token_ids) - num_new :]
            if num_new
            else [],
            finished=req.is_finished,
            finish_reason=req.finish_reason,
            stop_reason=req.stop_reason,
            arrival_time=req.arrival_time,
            first_token_time=req.first_token_time,
            finished_time=req.finished_time,
        )
