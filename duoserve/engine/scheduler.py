"""Continuous batching with phase-specialised steps: a step is all prefill or all decode.

A prefill step takes prompt chunks (of running requests still prefilling first, then of
waiting requests while KV slots are free) up to the token budget; several prompts share
one step, so they share one sweep over the experts. A decode step advances every running
request whose prompt is computed by one token.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from duoserve.engine.kv_cache import KVCache
from duoserve.engine.request import Request


@dataclass
class ScheduledBatch:
    """The requests of one step and how many new tokens each computes."""

    phase: str  # "prefill" | "decode"
    requests: list[Request]
    num_new_tokens: list[int]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    """Waiting and running queues over a fixed pool of KV slots."""

    def __init__(self, kv: KVCache, max_num_batched_tokens: int, max_model_len: int) -> None:
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> ScheduledBatch | None:
        batch = self._schedule_prefill()
        if batch is not None:
            return batch
        decoding = [r for r in self.running if not r.is_prefilling]
        if not decoding:
            return None
        return ScheduledBatch("decode", decoding, [1] * len(decoding))

    def _schedule_prefill(self) -> ScheduledBatch | None:
        budget = self.max_num_batched_tokens
        reqs, counts = [], []
        for req in self.running:
            if req.is_prefilling and budget > 0:
                n = min(req.num_prompt_tokens - req.num_computed_tokens, budget)
                reqs.append(req)
                counts.append(n)
                budget -= n
        while self.waiting and budget > 0 and self.kv.num_free_slots > 0:
            req = self.waiting.popleft()
            req.slot = self.kv.allocate_slot()
            req.first_scheduled_time = time.monotonic()
            self.running.append(req)
            n = min(req.num_prompt_tokens, budget)
            reqs.append(req)
            counts.append(n)
            budget -= n
        return ScheduledBatch("prefill", reqs, counts) if reqs else None

    def finish(self, req: Request, reason: str, stop_reason: str | int | None = None) -> None:
        """Mark `req` finished and give back its KV slot."""
        assert not req.is_finished, f"request {req.request_id} finished twice"
        req.finish_reason, req.stop_reason = reason, stop_reason
        req.finished_time = time.monotonic()
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if req.slot is not None:
            self.kv.free_slot(req.slot)
            req.slot = None
