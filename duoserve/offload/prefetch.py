"""Decode schedule: the expert cache plus predictor-driven prefetch of the next layers.

Per MoE layer l (after routing, before the routing sync, on the device):
  the predictor (predictor/online.py) names, per token row, the `budget` experts it expects
  at layers l+1..l+d; their ids ride the layer's one routing sync (`before_sync`, appended to
  the counts: no second host sync). With more rows than fit (R * budget > E, e.g. prefill
  under `uniform`) the rows' votes per expert [d, E] ride instead.
Then on the host (CachedExperts.compute):
  1. layer l's group is acquired; its misses are issued on the copy stream;
  2. predicted keys of layers l+1..l+d are protected (predictor-aware eviction: a protected
     key is never a victim) and the non-resident ones prefetched (cache.prefetch +
     transfer.copy_in), nearest layer first, most likely first, while the protected set plus
     the largest group this step can route still fits the cache (so a later acquire always
     finds a victim) and a victim that is neither pinned nor protected exists;
  3. hits compute while misses land; a prefetched expert still in flight is computed after
     its ready event, like a miss.
A layer's protection ends when that layer is acquired (its routed keys are then pinned).

When (PREFETCH_AT): in a split decode layer (CachedExperts.prepare; segmented decode graphs)
step 2 runs either in `prepare`, before the graph that computes layer l is launched
("prepare": the GPU idles while the host picks victims), or in `after_compute`, right after
that launch and before layer l's slots are unpinned ("launch": the GPU computes layer l while
the host works; the copies are issued a graph launch later, still behind layer l's misses on
the copy stream, and never into a slot layer l reads).

Accounting (cache.stats, exact; tests replay it through a brute-force simulation):
prefetches, prefetch_hits (an access found a prefetched, not yet used expert), prefetch
evicted unused, prefetched still unused (resident, never accessed yet), bytes of the last two.
"""

from __future__ import annotations

import time

import torch

from duoserve.config import EngineConfig, ModelConfig
from duoserve.engine.context import get_step_context
from duoserve.layers.moe import RoutingPlan
from duoserve.offload.backends import CachedExperts
from duoserve.offload.expert_cache import ExpertCache
from duoserve.offload.host_store import HostExpertStore
from duoserve.offload.transfer import TransferEngine
from duoserve.predictor.online import StepState, build_predictor

PREFETCH_AT = "prepare"  # split decode layers: "prepare" or "launch" (module docstring)


class PrefetchingExperts(CachedExperts):
    """CachedExperts plus predictor-driven prefetch of layers l+1..l+d (module docstring)."""

    def __init__(
        self,
        cfg: ModelConfig,
        store: HostExpertStore,
        cache: ExpertCache,
        transfer: TransferEngine,
        device: torch.device,
        predictor: str,
        engine: EngineConfig,
        model,
    ) -> None:
        eviction = cache.policy.name
        super().__init__(
            cfg, store, cache.num_slots, eviction, device, cache=cache, transfer=transfer
        )
        self.name = f"prefetch:{predictor}"
        self.distance = engine.prefetch_distance
        self.budget = engine.prefetch_budget or default_budget(cfg.num_experts_per_tok)
        self.budget = min(self.budget, cfg.num_experts)
        self.phases = ("prefill", "decode")  # the runtime narrows this when paired
        num_kv_slots = engine.max_num_seqs + 1  # + the CUDA-graph scratch slot
        max_rows = max(engine.max_num_batched_tokens, engine.max_num_seqs)
        self.state = StepState(cfg, max_rows, num_kv_slots, device)
        self.blocks = model.moe_blocks()
        distances = tuple(range(1, self.distance + 1))
        self.predictor = build_predictor(
            predictor, cfg, engine, self.blocks, self.state, distances, device, num_kv_slots
        )
        self.protected_by_layer: dict[int, set] = {}
        self.counters = dict(predict_calls=0, predict_host_s=0.0, decode_steps=0, deferred=0)
        self.cuda_times: list = []  # (start, end) events around predictor calls
        self.predict_device_s = 0.0
        # tests: ("access", layer, ids, protected) / ("prefetch", key, protected, pinned keys)
        self.event_log: list[tuple] | None = None
        self._wave_keys: tuple = ()
        self.prefetch_at = PREFETCH_AT
        self._preparing = False  # inside prepare(): step 2 may be deferred to after_compute
        self._deferred: RoutingPlan | None = None  # the plan whose step 2 waits for its launch

    # ---------------------------------------------------------------- device side

    def graph_version(self) -> int:
        """Changes when captured decode graphs must be captured again (a new trace-match
        library: new tensors)."""
        return getattr(self.predictor, "version", 0)

    def begin_step(self, ctx) -> None:
        """Host-side start of a forward pass: protections of the last one end. Called by
        before_sync on a new context, and by segmented decode graphs at each replay."""
        self.state.begin(ctx)
        self.clear_protection()
        if not ctx.capturing:
            self.predictor.begin(ctx)
            self.counters["decode_steps"] += ctx.phase == "decode"

    def before_sync(self, layer_id: int, x: torch.Tensor, topk_ids: torch.Tensor, plan):
        """Record the routing; predict layers l+1..l+d; the [n] int64 ids for the sync (their
        meaning, for after_misses_issued, in plan.extra_info). Device work only, apart from
        the first call of a pass (begin_step): capturable in a decode graph."""
        ctx = get_step_context()
        if ctx is not self.state.ctx:  # a new forward pass
            self.begin_step(ctx)
        li = self.moe_index[layer_id]
        self.state.observe(li, topk_ids)
        self.predictor.observe(li, topk_ids)
        L = self.cfg.num_moe_layers
        distances = tuple(d for d in range(1, self.distance + 1) if li + d < L)
        if ctx.phase not in self.phases or not distances:
            return None
        timed = not ctx.capturing  # a captured call costs the host nothing at replay
        t0 = time.perf_counter()
        events = self._start_event() if timed else None
        preds = [self.predictor.predict(li, d, x, self.budget) for d in distances]
        out = None
        if all(p is not None for p in preds):
            ids = torch.stack(preds)  # [D, R, b]
            R = ids.shape[1]
            votes = R * self.budget > self.cfg.num_experts
            if votes:  # many rows: how many rows predict each expert, [D, E]
                E = self.cfg.num_experts
                counts = torch.zeros(len(distances), E, dtype=torch.long, device=ids.device)
                ids = counts.scatter_add_(1, ids.flatten(1), torch.ones_like(ids.flatten(1)))
            out = ids.flatten()
            plan.extra_info = (li, distances, R, votes)
        if timed:
            self._end_event(events)
            self.counters["predict_host_s"] += time.perf_counter() - t0
        return out

    def _start_event(self):
        if self.device.type != "cuda":
            return None
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        return start

    def _end_event(self, start) -> None:
        if start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.cuda_times.append((start, end))

    # ---------------------------------------------------------------- host side

    def on_access(self, plan: RoutingPlan, js: range) -> None:
        if js.start == 0:  # this layer's protection ends: its routed keys are pinned by the acquire
            for key in self.protected_by_layer.pop(plan.layer_id, ()):
                self.cache.protected.discard(key)
        if self.event_log is not None:
            ids = tuple(plan.expert_ids[js.start : js.stop])
            self.event_log.append(("access", plan.layer_id, ids, frozenset(self.cache.protected)))
            self._wave_keys = tuple((plan.layer_id, e) for e in ids)
        super().on_access(plan, js)

    def prepare(self, x: torch.Tensor, plan: RoutingPlan) -> None:
        assert self.prefetch_at in ("prepare", "launch"), f"bad prefetch_at {self.prefetch_at!r}"
        self._preparing = self.prefetch_at == "launch"
        try:
            super().prepare(x, plan)
        finally:
            self._preparing = False

    def after_compute(self, plan: RoutingPlan) -> None:
        if self._deferred is plan:  # layer l's compute is launched; its slots still pinned
            self._deferred = None
            self.counters["deferred"] += 1
            self._issue_prefetches(plan)
        super().after_compute(plan)

    def after_misses_issued(self, x: torch.Tensor, plan: RoutingPlan) -> None:
        """Protect and prefetch the predicted experts of layers l+1..l+d (module docstring),
        issued as one batch of copies; in a split layer with prefetch_at "launch", later, in
        after_compute."""
        if plan.extra_info is None or plan.extra_host is None:
            return
        if self._preparing:
            self._deferred = plan
            return
        self._issue_prefetches(plan)

    def _issue_prefetches(self, plan: RoutingPlan) -> None:
        try:
            self._prefetch(plan)
        finally:
            self.transfer.flush()

    def _prefetch(self, plan: RoutingPlan) -> None:
        li, distances, R, votes = plan.extra_info
        self.counters["predict_calls"] += 1
        per_d = len(plan.extra_host) // len(distances)
        cache, max_group = self.cache, min(R * self.cfg.num_experts_per_tok, self.cfg.num_experts)
        room = cache.num_slots - max_group - len(cache.protected)
        for i, d in enumerate(distances):
            values = plan.extra_host[i * per_d : (i + 1) * per_d]
            target = self.cfg.moe_layer_ids[li + d]
            for e in _ranked(values, R, votes):
                key = (target, e)
                if key in cache.protected:
                    continue
                if room <= 0:
                    return
                cache.protected.add(key)
                self.protected_by_layer.setdefault(target, set()).add(key)
                room -= 1
                if key not in cache.slot_of:
                    if self.event_log is not None:
                        log = ("prefetch", key, frozenset(cache.protected), self._wave_keys)
                        self.event_log.append(log)
                    s = cache.prefetch(key)
                    if s is None:  # nothing evictable: stop for this layer
                        return
                    self.transfer.copy_in(s.slot, self.store.expert(*key), cache.slot_views[s.slot])
                    cache.release([s])

    def clear_protection(self) -> None:
        """Drop every protection (e.g. a forward pass that stopped midway)."""
        self.cache.protected.clear()
        self.protected_by_layer.clear()
        self._deferred = None

    def stats(self) -> dict[str, float]:
        out = super().stats()
        c, expert_bytes = self.cache, self.store.slot_numel * self.cache.slots.element_size()
        still_unused = len(c.unused_prefetched)
        useless = c.stats.prefetch_unused + still_unused
        if self.cuda_times:
            torch.cuda.synchronize(self.device)
            self.predict_device_s += sum(a.elapsed_time(b) for a, b in self.cuda_times) / 1e3
            self.cuda_times.clear()
        out.update(
            prefetch_evicted_unused=c.stats.prefetch_unused,
            prefetch_still_unused=still_unused,
            prefetch_useless=useless,
            prefetch_unused_bytes=useless * expert_bytes,
            prefetch_bytes=c.stats.prefetches * expert_bytes,
            predictor_calls=self.counters["predict_calls"],
            predictor_host_s=self.counters["predict_host_s"],
            predictor_device_s=self.predict_device_s,
            decode_steps=self.counters["decode_steps"],
        )
        return out


def default_budget(top_k: int) -> int:
    """Experts prefetched per token, layer and distance by default: the likeliest 3/4 of the
    top-k, rounded up (Mixtral's top-2: 2; Qwen3's top-8: 6). On a link-bound decode the last
    ranks cost more link time than their hits save: at Qwen3-30B-A3B, 12 GiB, H100, budget 6
    against 8 took 50.6 against 53.5 ms at batch 1 and 211.2 against 230.7 ms at batch 4
    (bench/results/decode-qwen3-h100-budgets-s5.json, docs/offloading.md)."""
    return -(-3 * top_k // 4)


def _ranked(values: list[int], rows: int, votes: bool) -> list[int]:
    """Expert ids, most wanted first: [R, b] ids rank-major, or [E] votes descending."""
    if votes:
        order = sorted(range(len(values)), key=lambda e: -values[e])
        return [e for e in order if values[e] > 0]
    b = len(values) // rows
    seen: dict[int, None] = {}
    for r in range(b):
        for t in range(rows):
            seen.setdefault(values[t * b + r])
    return list(seen)
