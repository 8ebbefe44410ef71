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
from duoserve.engine.context import get_step_context
from duoserve.layers.moe import (
    MAX_GROUPS,
    RoutingPlan,
    grouped_mlp_views,
    grouped_mm_supported,
    pool_views,
)
from duoserve.offload.expert_cache import ExpertCache
from duoserve.offload.host_store import HostExpertStore
from duoserve.offload.resident import (
    compute_expert_rows,
    compute_experts_rows,
    make_dequant_scratch,
)
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
            num_slots,
            store.slot_numel,
            store.dtype,
            device,
            policy,
            record_trace,
            num_layers=cfg.num_layers,
        )
        self.transfer = transfer or TransferEngine(self.cache.num_slots, device)
        self.access_log: list[tuple[int, tuple[int, ...]]] | None = [] if record_trace else None
        self.layout = store.layout
        self.grouped = self.layout is None and grouped_mm_supported(
            cfg.hidden_size, cfg.moe_intermediate_size, store.dtype, device
        )
        self.scratch = make_dequant_scratch(self.layout, store.compute_dtype, device)
        self.device = device
        self.moe_index = {layer_id: i for i, layer_id in enumerate(cfg.moe_layer_ids)}
        # Sort key of each expert per MoE layer (slot, + S while its bytes are in flight),
        # written on the host into a (pinned) staging row and copied once per layer; a row is
        # rewritten only a step later, long after its copy ran (later routing syncs waited).
        shape = (cfg.num_moe_layers, cfg.num_experts)
        cuda = device.type == "cuda"
        self.keys_host = torch.zeros(shape, dtype=torch.long, pin_memory=cuda)
        self.keys_np = self.keys_host.numpy()
        self.keys_dev = torch.zeros(shape, dtype=torch.long, device=device) if cuda else None
        self.group_index = torch.arange(MAX_GROUPS, device=device)  # searchsorted probes
        H, inter = cfg.hidden_size, cfg.moe_intermediate_size
        self.pool_views = pool_views(self.cache.slots, inter, H) if self.grouped else None

    needs_host_plan = True  # misses must be known on the host to be copied

    # ------------------------------------------------------------ split decode compute
    # A decode layer (all of its experts fit the cache) runs in three stages: `prepare` on
    # the host after the routing sync (acquire, issue copies and prefetches, make compute wait
    # for the pending ones, write the slot of each expert), `device_compute` (device work only,
    # fixed shapes: captured in a segment decode graph, engine/cuda_graphs.py), then
    # `after_compute` once it was issued (done events, unpin). One grouped GEMM pass over the
    # whole slot pool: at decode sizes, computing hits while misses land saves less device time
    # than a second pass costs the host.

    def splits(self, num_tokens: int) -> bool:
        """Whether a decode layer of `num_tokens` rows runs split (static per batch size)."""
        phase_ok = get_step_context().phase == "decode"
        fits = num_tokens * self.cfg.num_experts_per_tok <= self.cache.num_slots
        return self.grouped and phase_ok and fits

    def prepare(self, x: torch.Tensor, plan: RoutingPlan) -> None:
        """Host stage of a split layer (see above); the acquired slots go in plan.acquired."""
        self.on_access(plan, range(len(plan.expert_ids)))
        slots = self.cache.acquire_group(plan.layer_id, plan.expert_ids)
        self._issue_misses(slots)
        self.after_misses_issued(x, plan)
        ready = self.transfer.ready_events
        self.transfer.wait_ready_slots([s.slot for s in slots if ready[s.slot] is not None])
        li = self.moe_index[plan.layer_id]
        row = self.keys_np[li]
        for s in slots:
            row[s.key[1]] = s.slot
        if self.keys_dev is not None:
            self.keys_dev[li].copy_(self.keys_host[li], non_blocking=True)
        plan.acquired = slots

    def device_compute(self, x: torch.Tensor, plan: RoutingPlan, out_rows: torch.Tensor) -> None:
        """Device stage: out_rows [T*K, H] in (token, choice) order from the slot pool, the
        slot of each expert read from the device key row that `prepare` wrote."""
        li, S = self.moe_index[plan.layer_id], self.cache.num_slots
        keys = self.keys_dev[li] if self.keys_dev is not None else self.keys_host[li]
        key_sorted, order = torch.sort(keys[plan.flat_ids_dev], stable=True)  # [n]
        x_sorted = x[order // plan.top_k]  # [n, H]
        out = None
        for base in range(0, S, MAX_GROUPS):  # torch's grouped GEMM takes <= MAX_GROUPS
            G = min(MAX_GROUPS, S - base)
            offs = torch.searchsorted(
                key_sorted - base, self.group_index[:G], right=True, out_int32=True
            )  # [G] end row of each group; rows of other windows are masked below
            gate_up, down = (v[base : base + G] for v in self.pool_views)
            part = grouped_mlp_views(x_sorted, gate_up, down, offs, self.cfg.moe_intermediate_size)
            if out is None and G == S:
                out = part
            else:
                inside = ((key_sorted >= base) & (key_sorted < base + G))[:, None]
                out = torch.where(inside, part, out if out is not None else torch.zeros_like(part))
        out_rows[order] = out

    def after_compute(self, plan: RoutingPlan) -> None:
        """After the device stage was issued: the slots' done event, unpin."""
        slots = plan.acquired
        self.transfer.mark_read_slots([s.slot for s in slots])
        self.cache.release(slots)
        if len(self.transfer.stats.pending_wait) > MAX_PENDING_EVENTS:
            self.transfer.resolve()

    # ------------------------------------------------------------ eager compute

    def on_access(self, plan: RoutingPlan, js: range) -> None:
        """Called before experts js of plan are acquired (the prefetching schedule ends the
        layer's protections and logs here)."""
        if self.access_log is not None:
            self.access_log.append((plan.layer_id, tuple(plan.expert_ids[js.start : js.stop])))

    def _issue_misses(self, slots) -> None:
        copy_in, cache_slots, store = self.transfer.copy_in, self.cache.slot_views, self.store
        flush_each = not self.grouped  # one expert at a time: each computes as it lands
        for s in slots:  # issue every miss before any compute
            if not s.is_hit:
                copy_in(s.slot, store.expert(*s.key), cache_slots[s.slot])
                if flush_each:
                    self.transfer.flush()
        self.transfer.flush()

    def compute(self, x: torch.Tensor, plan: RoutingPlan, out_rows: torch.Tensor) -> None:
        if self.splits(x.shape[0]):
            self.prepare(x, plan)
            self.device_compute(x, plan, out_rows)
            plan.rows_are_flat = True
            self.after_compute(plan)
            return
        wave, n = self.cache.num_slots, len(plan.expert_ids)
        plan.rows_are_flat = self.grouped  # grouped: rows written in (token, choice) order
        for lo in range(0, max(n, 1), wave):
            js = range(lo, min(lo + wave, n))
            self._compute_wave(x, plan, js, out_rows, first=lo == 0, last=lo + wave >= n)
        if len(self.transfer.stats.pending_wait) > MAX_PENDING_EVENTS:
            self.transfer.resolve()

    def after_misses_issued(self, x: torch.Tensor, plan: RoutingPlan) -> None:
        """Called once per layer after its (last wave's) misses were issued, before compute
        (the prefetching schedule issues its prefetches here)."""

    def _compute_wave(self, x, plan: RoutingPlan, js: range, out_rows, first, last) -> None:
        layer_id = plan.layer_id
        expert_ids = plan.expert_ids[js.start : js.stop]
        self.on_access(plan, js)
        slots = self.cache.acquire_group(layer_id, expert_ids)
        self._issue_misses(slots)
        cache_slots = self.cache.slot_views
        if last:
            self.after_misses_issued(x, plan)
        ready_events = self.transfer.ready_events
        # pending: a miss, or a hit whose copy (a prefetch) may still be in flight
        pending = [not s.is_hit or ready_events[s.slot] is not None for s in slots]
        if self.grouped:
            self._grouped_wave(x, plan, slots, pending, out_rows, first and last)
        else:  # hits first, together: they compute while the misses land
            inter = self.cfg.moe_intermediate_size
            ready = [(j, s) for j, s, wait in zip(js, slots, pending) if not wait]
            compute_experts_rows(x, plan, [j for j, _ in ready],
                                 [cache_slots[s.slot] for _, s in ready], inter, out_rows,
                                 self.layout, self.scratch)  # fmt: skip
            for j, s, wait in zip(js, slots, pending):
                if wait:
                    self.transfer.wait_ready(s.slot)
                    compute_expert_rows(x, plan, j, cache_slots[s.slot], inter, out_rows,
                                        self.layout, self.scratch)  # fmt: skip
        self.transfer.mark_read_slots([s.slot for s in slots])
        self.cache.release(slots)

    def _sort_keys(self, plan: RoutingPlan, slots, pending, only_wave: bool) -> torch.Tensor:
        """[E] device sort key per expert: slot (+ S if pending); 2S for experts of other waves."""
        S = self.cache.num_slots
        if not only_wave:  # a layer served in several waves (rare): a fresh small tensor
            keys = [2 * S] * self.cfg.num_experts
            for s, wait in zip(slots, pending):
                keys[s.key[1]] = s.slot + S * wait
            return torch.tensor(keys, dtype=torch.long, device=self.device)
        li = self.moe_index[plan.layer_id]
        row = self.keys_np[li]
        for s, wait in zip(slots, pending):
            row[s.key[1]] = s.slot + S * wait
        if self.keys_dev is None:
            return self.keys_host[li]
        return self.keys_dev[li].copy_(self.keys_host[li], non_blocking=True)

    def _grouped_wave(self, x, plan: RoutingPlan, slots, pending, out_rows, only_wave) -> None:
        """The wave's rows sorted by key: ready experts in grouped GEMMs over windows of the
        slot pool while the pending ones land, then the pending ones after their events.
        Writes rows in (token, choice) order (plan.rows_are_flat)."""
        # n = T*K assignments, S slots, G groups of one window
        S, inter = self.cache.num_slots, self.cfg.moe_intermediate_size
        keys = self._sort_keys(plan, slots, pending, only_wave)
        key_sorted, order = torch.sort(keys[plan.flat_ids_dev], stable=True)  # [n], [n]
        x_sorted = x[order // plan.top_k]  # [n, H]
        counts = dict(zip(plan.expert_ids, plan.token_counts))
        entries = sorted((s.slot + S * w, counts[s.key[1]]) for s, w in zip(slots, pending))
        waited = False
        for lo_key, hi_key, a, b in _key_runs(entries, S):
            if lo_key >= S and not waited:
                self.transfer.wait_ready_slots([s.slot for s, w in zip(slots, pending) if w])
                waited = True
            G, base = hi_key - lo_key + 1, lo_key % S
            offs = torch.searchsorted(
                key_sorted[a:b] - lo_key, self.group_index[:G], right=True, out_int32=True
            )  # [G] end row of each group
            gate_up, down = (v[base : base + G] for v in self.pool_views)
            out_rows[order[a:b]] = grouped_mlp_views(x_sorted[a:b], gate_up, down, offs, inter)

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


def _key_runs(entries: list[tuple[int, int]], num_slots: int) -> list[list[int]]:
    """[first key, last key, first row, end row] runs of (key, rows) entries sorted by key:
    a run never mixes ready (< S) and pending (>= S) keys and spans at most MAX_GROUPS keys."""
    runs: list[list[int]] = []
    pos = 0
    for key, n in entries:
        run = runs[-1] if runs else None
        if run and (run[0] >= num_slots) == (key >= num_slots) and key - run[0] < MAX_GROUPS:
            run[1], run[3] = key, run[3] + n
        else:
            runs.append([key, key, pos, pos + n])
        pos += n
    return runs


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
