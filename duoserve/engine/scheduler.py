"""Continuous batching with phase-specialised steps: a step is all prefill or all decode.

A prefill step takes prompt chunks (of running requests still prefilling first, then of
waiting requests while KV slots are free) up to the token budget; several prompts share
one step, so they share one sweep over the experts. A decode step advances every running
request whose prompt is computed by one token.

Without SLO targets (the default) a prefill runs as soon as there is one to run and waiting
requests are admitted first come, first served. With `SloTargets` the scheduler plans
against measured step times (`observe_step`):

* **when to prefill**: a prefill between decode steps stalls every decoding request; it is
  deferred while it would push some running request's TPOT so far above the TPOT target,
  unless the most urgent waiting request would otherwise miss its TTFT target. Deferred
  prompts accumulate, so the next prefill shares one expert sweep among more of them.
* **batch size**: no request is admitted beyond the largest decode batch whose estimated
  step time still meets the TPOT target (at least one request always runs).
* **admission order**: earliest TTFT deadline first; a request that has already missed its
  deadline yields to ones that can still meet theirs, for at most one more TTFT period
  (so nobody starves).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
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


@dataclass(frozen=True)
class SloTargets:
    """Latency objectives in seconds (None: no objective on that metric)."""

    ttft_s: float | None = None
    tpot_s: float | None = None

    def __post_init__(self) -> None:
        for name, value in (("ttft_s", self.ttft_s), ("tpot_s", self.tpot_s)):
            assert value is None or value > 0, f"SLO {name} must be > 0, got {value}"


class StepCostModel:
    """Online estimate of a step's seconds as `a + b * x`, fitted to the last observations.

    x is the prefill token count or the decode batch size. Least squares over a short window
    follows drift (the expert cache warming up); with one distinct x it returns their mean.
    """

    def __init__(self, window: int = 32) -> None:
        self.samples: deque[tuple[float, float]] = deque(maxlen=window)

    def observe(self, x: float, seconds: float) -> None:
        self.samples.append((float(x), seconds))

    def estimate(self, x: float) -> float | None:
        """Estimated seconds at `x`, or None before the first observation."""
        if not self.samples:
            return None
        n = len(self.samples)
        mean_x = sum(s[0] for s in self.samples) / n
        mean_t = sum(s[1] for s in self.samples) / n
        var_x = sum((s[0] - mean_x) ** 2 for s in self.samples)
        if var_x == 0:
            return mean_t
        slope = sum((s[0] - mean_x) * (s[1] - mean_t) for s in self.samples) / var_x
        slope = max(slope, 0.0)
        intercept = max(mean_t - slope * mean_x, 0.0)
        return intercept + slope * x


class Scheduler:
    """Waiting and running queues over a fixed pool of KV slots."""

    def __init__(
        self,
        kv: KVCache,
        max_num_batched_tokens: int,
        max_model_len: int,
        slo: SloTargets | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.slo = slo  # may be set after construction (the server does)
        self.clock = clock
        self.prefill_cost = StepCostModel()
        self.decode_cost = StepCostModel()
        self.last_batch: ScheduledBatch | None = None

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> ScheduledBatch | None:
        """The next step's batch: a prefill when one is due, otherwise a decode."""
        decoding = [r for r in self.running if not r.is_prefilling]
        batch = None
        if not (decoding and self._should_defer_prefill(decoding)):
            batch = self._schedule_prefill()
        if batch is None and decoding:
            batch = ScheduledBatch("decode", decoding, [1] * len(decoding))
        self.last_batch = batch
        return batch

    def observe_step(self, seconds: float) -> None:
        """Record how long the last scheduled batch took (feeds the SLO planner)."""
        batch = self.last_batch
        if batch is None:
            return
        if batch.phase == "prefill":
            self.prefill_cost.observe(batch.num_tokens, seconds)
        else:
            self.decode_cost.observe(len(batch.requests), seconds)
        self.last_batch = None

    def _schedule_prefill(self) -> ScheduledBatch | None:
        budget = self.max_num_batched_tokens
        reqs, counts = [], []
        for req in self.running:
            if req.is_prefilling and budget > 0:
                n = min(req.num_prompt_tokens - req.num_computed_tokens, budget)
                reqs.append(req)
                counts.append(n)
                budget -= n
        max_running = self._max_running()
        while (
            self.waiting
            and budget > 0
            and self.kv.num_free_slots > 0
            and len(self.running) < max_running
        ):
            req = self._pop_next_waiting()
            req.slot = self.kv.allocate_slot()
            req.first_scheduled_time = time.monotonic()
            self.running.append(req)
            n = min(req.num_prompt_tokens, budget)
            reqs.append(req)
            counts.append(n)
            budget -= n
        return ScheduledBatch("prefill", reqs, counts) if reqs else None

    # ------------------------------------------------------------------ SLO planning

    def _deadline_key(self, req: Request, now: float) -> float:
        """Admission priority (lower first): the TTFT deadline, one period later once missed."""
        assert self.slo is not None and self.slo.ttft_s is not None
        deadline = req.arrival_time + self.slo.ttft_s
        return deadline if deadline >= now else deadline + self.slo.ttft_s

    def _pop_next_waiting(self) -> Request:
        if self.slo is None or self.slo.ttft_s is None or len(self.waiting) == 1:
            return self.waiting.popleft()
        now = self.clock()
        best = min(self.waiting, key=lambda r: self._deadline_key(r, now))
        self.waiting.remove(best)
        return best

    def _max_running(self) -> int:
        """Largest decode batch whose estimated step time meets the TPOT target."""
        limit = self.kv.num_slots
        if self.slo is None or self.slo.tpot_s is None or not self.decode_cost.samples:
            return limit
        n = max(len(self.running), 1)
        while n < limit and (self.decode_cost.estimate(n + 1) or 0.0) <= self.slo.tpot_s:
            n += 1
        return n

    def _should_defer_prefill(self, decoding: list[Request]) -> bool:
        """Whether to run a decode step now and the pending prefill later."""
        slo = self.slo
        if slo is None or slo.tpot_s is None:
            return False
        pending = [r for r in self.running if r.is_prefilling]
        if self.kv.num_free_slots > 0 and len(self.running) < self._max_running():
            pending += list(self.waiting)
        if not pending:
            return False
        num_tokens = sum(r.num_prompt_tokens - r.num_computed_tokens for r in pending)
        prefill_s = self.prefill_cost.estimate(min(num_tokens, self.max_num_batched_tokens))
        if prefill_s is None:
            return False  # nothing measured yet: behave as without SLOs
        decode_s = self.decode_cost.estimate(len(decoding)) or 0.0
        now = self.clock()
        if slo.ttft_s is not None:
            # NOTE: a missed TTFT cannot be repaired later, so urgency wins over TPOT.
            first_deadline = min(self._deadline_key(r, now) for r in pending)
            if first_deadline - now - prefill_s <= decode_s:
                return False
        return any(
            self._tpot_after_stall(r, now, prefill_s + decode_s) > slo.tpot_s for r in decoding
        )

    @staticmethod
    def _tpot_after_stall(req: Request, now: float, stall_s: float) -> float:
        """The request's mean time per output token so far if its next token came after stall_s."""
        first = req.first_token_time if req.first_token_time is not None else now
        num_decoded = max(req.num_output_tokens - 1, 0)
        return (now - first + stall_s) / (num_decoded + 1)

    # ------------------------------------------------------------------ finishing

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
