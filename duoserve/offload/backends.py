"""Offloaded expert backends: `ondemand` (no cache) and cached (`lru`, `lfu`, `fifo`).

Both read packed experts from the host store. The cached backend serves each layer's
routed experts as one access group of the expert cache: misses are issued on the copy
stream first, hits are computed while the misses land, then each miss is computed after
its ready event. A group larger than the cache is served in waves of at most `num_slots`.
With int4 experts (store.layout set) slots are uint8 int4 buffers and each expert runs
through the int4 kernels, one at a time (no grouped GEMM).
"""

from __future__ import annotations

import torch

from duoserve.config import ModelConfig
from duoserve.layers.moe import (
    MAX_GROUPS,
    RoutingPlan,
    grouped_expert_mlp,
    grouped_mm_supported,
)
from duoserve.offload.expert_cache import ExpertCache
from duoserve.offload.host_store import HostExpertStore
from duoserve.offload.resident import compute_expert_rows, make_dequant_scratch
from duoserve.offload.transfer import TransferEngine

MAX_PENDING_EVENTS = 4096


class CachedExperts:
    """Experts served from a device cache of `num_slots` slots, filled from the host store."""

    def __init__(
        self,
        cfg: ModelConfig,
        store: HostExpertStore,
        num_slots: int,
        policy: str,
        device: torch.device,
        record_trace: bool = False,
        cache: ExpertCache | None = None,
        transfer: TransferEngine | None = None,
    ) -> None:
        """With `cache` and `transfer` given (shared with a prefill schedule), `num_slots` and
        `policy` are taken from the cache."""
        self.name = policy
        self.cfg = cfg
        self.store = store
        self.cache = cache or ExpertCache(
            num_slots, store.slot_numel, store.dtype, device, policy, record_trace
        )
        self.transfer = transfer or TransferEngine(self.cache.num_slots, device)
        self.access_log: list[tuple[int, tuple[int, ...]]] | None = [] if record_trace else None
        self.layout = store.layout
        self.grouped = self.layout is None and grouped_mm_supported(
            cfg.hidden_size, cfg.moe_intermediate_size, store.dtype, device
        )
        self.scratch = make_dequant_scratch(self.layout, store.compute_dtype, device)
        self.device = device

    needs_host_plan = True  # misses must be known on the host to be copied

    def compute(self, x: torch.Tensor, plan: RoutingPlan, out_rows: torch.Tensor) -> None:
        wave = self.cache.num_slots
        for lo in range(0, len(plan.expert_ids), wave):
            self._compute_wave(x, plan, range(lo, min(lo + wave, len(plan.expert_ids))), out_rows)
        if len(self.transfer.stats.pending_wait) > MAX_PENDING_EVENTS:
            self.transfer.resolve()

    def _compute_wave(self, x, plan: RoutingPlan, js: range, out_rows: torch.Tensor) -> None:
        layer_id, inter = plan.layer_id, self.cfg.moe_intermediate_size
        expert_ids = [plan.expert_ids[j] for j in js]
        if self.access_log is not None:
            self.access_log.append((layer_id, tuple(expert_ids)))
        slots = self.cache.acquire_group(layer_id, expert_ids)
        by_expert = {s.key[1]: s for s in slots}
        for s in slots:  # issue every miss before any compute
            if not s.is_hit:
                self.transfer.copy_in(s.slot, self.store.expert(*s.key), self.cache.slots[s.slot])
        if self.grouped:
            self._grouped_wave(x, plan, js, slots, out_rows)
        else:
            ordered = sorted(js, key=lambda j: not by_expert[plan.expert_ids[j]].is_hit)
            for j in ordered:  # hits first: they compute while the misses land
                s = by_expert[plan.expert_ids[j]]
                if not s.is_hit:
                    self.transfer.wait_ready(s.slot)
                weights = self.cache.slots[s.slot]
                compute_expert_rows(x, plan, j, weights, inter, out_rows, self.layout, self.scratch)
                self.transfer.mark_read(s.slot)
        self.cache.release(slots)

    def _grouped_wave(self, x, plan: RoutingPlan, js: range, slots, out_rows) -> None:
        """The wave's hits in grouped GEMMs over the slot pool while its misses land, then the
        misses once their ready events fired (one GEMM per window of MAX_GROUPS slots)."""
        S, inter = self.cache.num_slots, self.cfg.moe_intermediate_size
        offsets = plan.row_offsets
        lo, hi = offsets[js[0]], offsets[js[-1] + 1]
        key_of_expert = [0] * self.cfg.num_experts  # slot, plus S for misses: hits sort first
        entries = []
        for j, s in zip(js, slots):
            key_of_expert[s.key[1]] = s.slot + (0 if s.is_hit else S)
            entries.append((key_of_expert[s.key[1]], plan.token_counts[j]))
        keys = torch.tensor(key_of_expert, dtype=torch.long, device=self.device)
        key_of_row = keys[plan.expert_of_row_dev[lo:hi]]  # [n]
        perm = torch.argsort(key_of_row, stable=True)
        slot_of_row = key_of_row[perm] % S
        token_rows = plan.token_rows_dev[lo:hi][perm]
        waited = False
        for is_miss, window, a, b in _row_ranges(sorted(entries), S):
            if is_miss and not waited:
                for s in slots:
                    if not s.is_hit:
                        self.transfer.wait_ready(s.slot)
                waited = True
            base = window * MAX_GROUPS
            pool = self.cache.slots[base : base + MAX_GROUPS]
            y = grouped_expert_mlp(x[token_rows[a:b]], pool, slot_of_row[a:b] - base, inter)
            out_rows[lo + perm[a:b]] = y
        for s in slots:
            self.transfer.mark_read(s.slot)

    def stats(self) -> dict[str, float]:
        t = self.transfer.resolve()
        c = self.cache.stats
        return {
            "hits": c.hits,
            "misses": c.misses,
            "hit_rate": c.hit_rate,
            "evictions": c.evictions,
            "bytes_copied": t.bytes_copied,
            "copies": t.num_copies,
            "copy_seconds": t.copy_seconds,
            "wait_seconds": t.wait_seconds,
            "prefetches": c.prefetches,
            "prefetch_hits": c.prefetch_hits,
            "prefetch_unused": c.prefetch_unused,
        }


def _row_ranges(entries: list[tuple[int, int]], num_slots: int) -> list[list]:
    """[is_miss, window, first row, end row] runs of rows sorted by key (slot, + S if miss)."""
    ranges: list[list] = []
    pos = 0
    for key, n in entries:
        is_miss, window = key >= num_slots, (key % num_slots) // MAX_GROUPS
        if ranges and ranges[-1][0] == is_miss and ranges[-1][1] == window:
            ranges[-1][3] += n
        else:
            ranges.append([is_miss, window, pos, pos + n])
        pos += n
    return ranges


class OnDemandExperts:
    """No cache: every routed expert is copied when needed, on the compute stream.

    One scratch slot; copy and compute serialize on one stream and nothing is reused across
    layers or steps: this is what module-hook offloading (fetch on call) costs.
    """

    name = "ondemand"
    needs_host_plan = True

    def __init__(self, cfg: ModelConfig, store: HostExpertStore, device: torch.device) -> None:
        self.cfg = cfg
        self.store = store
        self.layout = store.layout
        self.slot = torch.empty(store.slot_numel, dtype=store.dtype, device=device)
        self.dequant_scratch = make_dequant_scratch(store.layout, store.compute_dtype, device)
        self.transfer = TransferEngine(1, device)
        self.num_fetches = 0

    def compute(self, x: torch.Tensor, plan: RoutingPlan, out_rows: torch.Tensor) -> None:
        for j, e in enumerate(plan.expert_ids):
            self.transfer.copy_sync(self.store.expert(plan.layer_id, e), self.slot)
            inter, layout = self.cfg.moe_intermediate_size, self.layout
            compute_expert_rows(
                x, plan, j, self.slot, inter, out_rows, layout, self.dequant_scratch
            )
            self.num_fetches += 1
        if len(self.transfer.stats.pending_wait) > MAX_PENDING_EVENTS:
            self.transfer.resolve()

    def stats(self) -> dict[str, float]:
        t = self.transfer.resolve()
        return {
            "hits": 0,
            "misses": self.num_fetches,
            "hit_rate": 0.0,
            "evictions": 0,
            "bytes_copied": t.bytes_copied,
            "copies": t.num_copies,
            "copy_seconds": t.copy_seconds,
            "wait_seconds": t.wait_seconds,
        }
