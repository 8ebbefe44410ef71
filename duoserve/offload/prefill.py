"""Prefill expert schedule: experts stream through a small ring of staging slots, two streams.

Per MoE layer, after the routing sync (the one host sync of the layer, in layers/moe.py):
- routed experts resident in the decode cache are computed from the cache's slots (pinned while
  used, never copied again);
- the others stream host -> ring slot on the transfer engine's copy stream, most tokens first,
  and are computed in batches as they land (one grouped GEMM over consecutive ring slots; int4
  experts or no grouped GEMM: one expert at a time); a ring slot's residency ends once the batch
  that read it has been issued, and the next copy may then take it;
- dense steps (T*K/E >= `dense_threshold`): at the end of a layer's compute the ring is filled
  with the next MoE layer's most-used experts (running per-layer counts of earlier prefill
  steps), so the link stays busy through that layer's attention and routing sync. A speculative
  copy that no token routes to is counted as wasted bytes. Sparse steps stream only the routed
  set once the router has fired.

Ordering (CUDA; on the CPU copies are synchronous and the same code runs without events):
- the copy into ring slot s waits, on the copy stream, for done[s], the event recorded on the
  compute stream after the last compute that read s (and its poisoning, in debug mode);
- compute reading s waits, on the compute stream, for the ready event of the copy;
- the host never waits: it issues the copy into s only after it has issued s's last reader (at
  most R entries in flight), which is bookkeeping, not a sync. Slots are taken round robin, so
  entries are issued, computed and freed in one FIFO order.

Debug: `poison=True` (or DUOSERVE_PREFILL_POISON=1) fills each freed ring slot with NaN (int4
buffers: 0xFF bytes, NaN scales) on the compute stream after its last reader and before the next
copy may start, so a read after free shows as NaN outputs. `order_log` (a list) records
(op, slot, generation) in issue order; `check_ring_order` verifies the ring discipline on it.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, fields

import torch

from duoserve.config import ModelConfig
from duoserve.layers.moe import MAX_GROUPS, RoutingPlan, grouped_expert_mlp, grouped_mm_supported
from duoserve.offload.expert_cache import ExpertCache, Slot
from duoserve.offload.host_store import HostExpertStore
from duoserve.offload.resident import compute_expert_rows, make_dequant_scratch
from duoserve.offload.transfer import TransferEngine, TransferStats, resolve_stats

# Dense when a step's assignments per expert (T*K/E) reach this: with uniform routing an expert
# goes unused with probability ~exp(-T*K/E) (13.5% at 2), and only R speculative copies per layer
# are at stake, most-used experts first.
DENSE_ASSIGNMENTS_PER_EXPERT = 2.0
POISON_ENV = "DUOSERVE_PREFILL_POISON"
MAX_PENDING_PAIRS = 4096  # timing event pairs kept before folding the fired ones


@dataclass
class RingEntry:
    """One expert staged in ring slot `slot` by the `generation`-th copy into that slot."""

    layer_id: int
    expert_id: int
    position: int  # order of the entry among its layer's ring entries
    slot: int
    generation: int
    ready: object  # CUDA event recorded after the copy; None on the CPU
    speculative: bool


@dataclass
class PrefillCounters:
    """What the prefill schedule did (bytes and seconds are in its TransferStats)."""

    dense_layers: int = 0
    sparse_layers: int = 0
    cache_hits: int = 0  # routed experts computed from the decode cache
    streamed: int = 0  # routed experts computed from the ring
    speculative_copies: int = 0
    wasted_copies: int = 0  # speculative copies of experts no token routed to
    wasted_bytes: int = 0
    batches: int = 0


@dataclass
class _LayerRows:
    """A layer's assignment rows sorted by key: cache slot for hits, S + ring position."""

    perm: torch.Tensor | None  # [T*K] sorted row -> (token, choice) row (grouped path only)
    token_rows: torch.Tensor | None  # [T*K] token of each sorted row
    keys: torch.Tensor | None  # [T*K] key of each sorted row
    start: dict[int, int]  # key -> first sorted row
    counts: dict[int, int]  # expert -> assignments (routed experts only)
    j_of: dict[int, int]  # expert -> index in plan.expert_ids


class PrefillPipeline:
    """Prefill experts: cache hits in place, the rest streamed through `num_ring_slots` slots."""

    name = "pipeline"
    needs_host_plan = True  # the routed set must be known on the host to be copied

    def __init__(
        self,
        cfg: ModelConfig,
        store: HostExpertStore,
        cache: ExpertCache,
        transfer: TransferEngine,
        num_ring_slots: int,
        device: torch.device,
        poison: bool | None = None,
        dense_threshold: float = DENSE_ASSIGNMENTS_PER_EXPERT,
    ) -> None:
        assert 1 <= num_ring_slots <= MAX_GROUPS, (
            f"the prefill ring needs 1..{MAX_GROUPS} slots, got {num_ring_slots} "
            "(plan.num_ring_slots: plan with a pipeline policy)"
        )
        self.cfg, self.store, self.cache, self.transfer = cfg, store, cache, transfer
        self.device = device
        self.num_ring_slots = num_ring_slots
        self.ring = torch.empty(num_ring_slots, store.slot_numel, dtype=store.dtype, device=device)
        self.ring_done: list = [None] * num_ring_slots  # last reader of each slot (CUDA event)
        self.generation = [0] * num_ring_slots
        self.cursor = 0  # the next ring slot to fill
        self.in_flight: deque[RingEntry] = deque()  # issued, not yet freed, in issue order
        self.batch_size = max(1, num_ring_slots // 2)  # one half computes, the other lands
        self.layout = store.layout
        self.grouped = self.layout is None and grouped_mm_supported(
            cfg.hidden_size, cfg.moe_intermediate_size, store.dtype, device
        )
        self.scratch = make_dequant_scratch(self.layout, store.compute_dtype, device)
        if poison is None:
            poison = os.environ.get(POISON_ENV, "0") not in ("", "0")
        self.poison = poison
        self.poison_value = float("nan") if store.dtype.is_floating_point else 255
        self.dense_threshold = dense_threshold
        self.unsafe_skip_free = False  # tests only: copy into slots not yet freed
        self.order_log: list[tuple[str, int, int]] | None = None
        self.timeline: list[tuple] | None = None
        self.moe_index = {layer_id: i for i, layer_id in enumerate(cfg.moe_layer_ids)}
        shape, cuda = (cfg.num_moe_layers, cfg.num_experts), device.type == "cuda"
        self.keys_host = torch.zeros(shape, dtype=torch.long, pin_memory=cuda)  # row sort keys
        self.keys_np = self.keys_host.numpy()
        self.keys_dev = torch.zeros(shape, dtype=torch.long, device=device) if cuda else None
        self.expert_counts = [[0] * cfg.num_experts for _ in cfg.moe_layer_ids]
        self.counters = PrefillCounters()
        self.link = TransferStats()  # this schedule's copies and waits (also in transfer.stats)

    # ------------------------------------------------------------------ one MoE layer

    def compute(self, x: torch.Tensor, plan: RoutingPlan, out_rows: torch.Tensor) -> None:
        """Fill out_rows for the plan's routed experts: (token, choice) rows in the grouped path
        (plan.rows_are_flat), else sorted assignment rows."""
        # T tokens, K top-k, E experts
        layer_id, E = plan.layer_id, self.cfg.num_experts
        self._drop_stale(layer_id)
        counts = dict(zip(plan.expert_ids, plan.token_counts))
        layer_counts = self.expert_counts[self.moe_index[layer_id]]
        for e, n in counts.items():
            layer_counts[e] += n
        dense = x.shape[0] * self.cfg.num_experts_per_tok / E >= self.dense_threshold
        self.counters.dense_layers += dense
        self.counters.sparse_layers += not dense
        spec = list(self.in_flight)  # issued at the end of the previous layer
        spec_ids = {entry.expert_id for entry in spec}
        resident = self.cache.slot_of
        hits = sorted(
            (resident[(layer_id, e)], e)
            for e in counts
            if e not in spec_ids and (layer_id, e) in resident
        )
        hit_ids = {e for _, e in hits}
        rest = sorted((e for e in counts if e not in spec_ids | hit_ids), key=lambda e: -counts[e])
        pending = deque((len(spec) + i, e) for i, e in enumerate(rest))
        self._issue(layer_id, pending, speculative=False)  # into free ring slots, at once
        rows = self._sort_rows(plan, counts, hits, spec, rest)
        self._compute_hits(x, plan, layer_id, hits, rows, out_rows)
        while self.in_flight:
            batch = self._next_batch()
            self._compute_batch(x, plan, batch, rows, out_rows)
            self._issue(layer_id, pending, speculative=False)
        assert not pending, "every routed expert was streamed"
        if dense:
            self._speculate(layer_id)
        self._fold_pending()

    def _sort_rows(self, plan, counts, hits, spec, rest) -> _LayerRows:
        """Row order for the grouped GEMMs: hits by cache slot, then ring entries in order."""
        S = self.cache.num_slots
        key_counts = [(slot, counts[e]) for slot, e in hits]
        key_counts += [(S + p, counts.get(entry.expert_id, 0)) for p, entry in enumerate(spec)]
        key_counts += [(S + len(spec) + i, counts[e]) for i, e in enumerate(rest)]
        start, pos = {}, 0
        for key, n in key_counts:
            start[key] = pos
            pos += n
        start[S + len(spec) + len(rest)] = pos  # end of the last ring entry
        j_of = {e: j for j, e in enumerate(plan.expert_ids)}
        if not self.grouped:
            return _LayerRows(None, None, None, start, counts, j_of)
        keys = self.keys_np[self.moe_index[plan.layer_id]]  # experts without rows: never read
        for slot, e in hits:
            keys[e] = slot
        for p, entry in enumerate(spec):
            keys[entry.expert_id] = S + p
        for i, e in enumerate(rest):
            keys[e] = S + len(spec) + i
        key_of_flat = self._keys_to_device(plan.layer_id)[plan.flat_ids_dev]  # [T*K]
        perm = torch.argsort(key_of_flat, stable=True)  # sorted row -> (token, choice) index
        plan.rows_are_flat = True  # out_rows[perm[r]] is written: (token, choice) order
        return _LayerRows(perm, perm // plan.top_k, key_of_flat[perm], start, counts, j_of)

    def _keys_to_device(self, layer_id: int) -> torch.Tensor:
        """The layer's sort keys on the device: a non-blocking copy from pinned memory (the
        host rewrites a layer's row only a step later, after routing syncs drained the copy)."""
        i = self.moe_index[layer_id]
        if self.keys_dev is None:
            return self.keys_host[i]
        self.keys_dev[i].copy_(self.keys_host[i], non_blocking=True)
        return self.keys_dev[i]

    # ------------------------------------------------------------------ compute

    def _compute_hits(self, x, plan, layer_id: int, hits, rows: _LayerRows, out_rows) -> None:
        """Routed experts resident in the decode cache, computed in place (pinned meanwhile)."""
        if not hits:
            return
        pinned = [Slot((layer_id, e), slot, True) for slot, e in hits]
        for s in pinned:
            self.cache.pins[s.slot] += 1
            self.transfer.wait_ready(s.slot)  # a decode copy into it may still be in flight
        inter = self.cfg.moe_intermediate_size
        if self.grouped:
            ends = {slot: rows.start[slot] + rows.counts[e] for slot, e in hits}
            windows: dict[int, list[int]] = {}
            for slot, _ in hits:
                windows.setdefault(slot // MAX_GROUPS, []).append(slot)
            for window, slots in windows.items():
                a, b, base = rows.start[slots[0]], ends[slots[-1]], window * MAX_GROUPS
                pool = self.cache.slots[base : base + MAX_GROUPS]
                y = grouped_expert_mlp(x[rows.token_rows[a:b]], pool, rows.keys[a:b] - base, inter)
                out_rows[rows.perm[a:b]] = y
        else:
            for slot, e in hits:
                weights = self.cache.slots[slot]
                compute_expert_rows(
                    x, plan, rows.j_of[e], weights, inter, out_rows, self.layout, self.scratch
                )
        for s in pinned:
            self.transfer.mark_read(s.slot)
        self.cache.release(pinned)
        self.counters.cache_hits += len(hits)

    def _next_batch(self) -> list[RingEntry]:
        """Up to `batch_size` entries from the front of the ring, in consecutive slots."""
        batch = [self.in_flight.popleft()]
        while (
            self.in_flight
            and len(batch) < self.batch_size
            and self.in_flight[0].slot == batch[-1].slot + 1
        ):
            batch.append(self.in_flight.popleft())
        return batch

    def _compute_batch(self, x, plan, batch: list[RingEntry], rows: _LayerRows, out_rows) -> None:
        """Compute the routed entries of `batch` once landed, then free all of its slots."""
        used = [entry for entry in batch if entry.expert_id in rows.counts]
        for entry in batch:
            if entry.speculative and entry.expert_id not in rows.counts:
                self.counters.wasted_copies += 1
                self.counters.wasted_bytes += self.store.expert_bytes
        if used or self.poison:  # the batch's GEMM views (or poison writes) cover every slot
            self.transfer.wait_events([entry.ready for entry in batch], also=self.link)
        t0 = self._mark() if self.timeline is not None and used else None
        inter, S = self.cfg.moe_intermediate_size, self.cache.num_slots
        if used and self.grouped:
            first, last = batch[0], batch[-1]
            a, b = rows.start[S + first.position], rows.start[S + last.position + 1]
            pool = self.ring[first.slot : last.slot + 1]
            groups = rows.keys[a:b] - (S + first.position)
            out_rows[rows.perm[a:b]] = grouped_expert_mlp(
                x[rows.token_rows[a:b]], pool, groups, inter
            )
        else:
            for entry in used:
                weights = self.ring[entry.slot]
                j = rows.j_of[entry.expert_id]
                compute_expert_rows(x, plan, j, weights, inter, out_rows, self.layout, self.scratch)
        if t0 is not None:
            self.timeline.append(("compute", plan.layer_id, len(used), t0, self._mark()))
        self._free(batch, used)

    def _free(self, batch: list[RingEntry], used: list[RingEntry]) -> None:
        """End the batch's residency: (poison,) then record the done event its slots wait on."""
        if self.order_log is not None:
            self.order_log += [("read", entry.slot, entry.generation) for entry in used]
        if self.poison:
            self.ring[batch[0].slot : batch[-1].slot + 1].fill_(self.poison_value)
        if used or self.poison:  # else nothing read the slots: the copy stream orders reuse
            done = self.transfer.record_compute()
            for entry in batch:
                self.ring_done[entry.slot] = done
        if self.order_log is not None:
            self.order_log += [("free", entry.slot, entry.generation) for entry in batch]
        self.counters.streamed += len(used)
        self.counters.batches += 1

    # ------------------------------------------------------------------ copies

    def _issue(self, layer_id: int, pending: deque, speculative: bool) -> None:
        """Copy pending (position, expert) pairs into ring slots while one is free (one batch
        of copies: one stream switch; each copy timed apart only for the timeline)."""
        R = self.num_ring_slots
        picked = []
        while pending and (len(self.in_flight) + len(picked) < R or self.unsafe_skip_free):
            position, e = pending.popleft()
            s = self.cursor
            self.cursor = (s + 1) % R
            self.generation[s] += 1
            picked.append((position, e, s))
        if not picked:
            return
        t0 = time.perf_counter()  # the CPU's copies are synchronous: timed here
        items = [(self.store.expert(layer_id, e), self.ring[s], self.ring_done[s])
                 for _, e, s in picked]  # fmt: skip
        timeline = self.timeline is not None
        readies = self.transfer.copy_after_many(items, also=self.link, time_each=timeline)
        if timeline and (readies[0] is None or self.transfer.timed):
            spans = self.link.pending_copy[-len(picked) :]
            for i, (_, e, _) in enumerate(picked):
                span = (t0, time.perf_counter()) if readies[0] is None else spans[i]
                self.timeline.append(("copy", layer_id, e, *span))
        for (position, e, s), ready in zip(picked, readies):
            entry = RingEntry(layer_id, e, position, s, self.generation[s], ready, speculative)
            self.in_flight.append(entry)
            if self.order_log is not None:
                self.order_log.append(("copy", s, entry.generation))
            self.counters.speculative_copies += speculative

    def _speculate(self, layer_id: int) -> None:
        """Fill the ring with the next MoE layer's most-used non-resident experts."""
        i = self.moe_index[layer_id] + 1
        if i >= len(self.cfg.moe_layer_ids):
            return
        next_id, counts = self.cfg.moe_layer_ids[i], self.expert_counts[i]
        order = sorted(range(self.cfg.num_experts), key=lambda e: -counts[e])  # stable: ids
        picks = [e for e in order if (next_id, e) not in self.cache.slot_of]
        pending = deque(enumerate(picks[: self.num_ring_slots]))
        self._issue(next_id, pending, speculative=True)

    def _drop_stale(self, layer_id: int) -> None:
        """Free entries staged for another layer (a forward that stopped early): wasted."""
        if not self.in_flight or self.in_flight[0].layer_id == layer_id:
            return
        while self.in_flight:
            entry = self.in_flight.popleft()
            if entry.speculative:
                self.counters.wasted_copies += 1
                self.counters.wasted_bytes += self.store.expert_bytes
            if self.poison:
                self.transfer.wait_event(entry.ready, also=self.link)
            self._free([entry], [])

    # ------------------------------------------------------------------ stats, timeline

    def _fold_pending(self) -> None:
        """Fold fired timing events now and then, so the lists stay short (never blocks)."""
        for stats in (self.link, self.transfer.stats):
            if len(stats.pending_copy) + len(stats.pending_wait) > MAX_PENDING_PAIRS:
                resolve_stats(stats, wait=False)

    def stats(self) -> dict[str, float]:
        """Counters of the prefill schedule (synchronizes with the device to fold timings)."""
        link = resolve_stats(self.link) if self.transfer.is_cuda else self.link
        out: dict[str, float] = {
            f.name: getattr(self.counters, f.name) for f in fields(self.counters)
        }
        out.update(
            bytes_copied=link.bytes_copied,
            copies=link.num_copies,
            copy_seconds=link.copy_seconds,
            wait_seconds=link.wait_seconds,
            ring_slots=self.num_ring_slots,
        )
        return out

    def _mark(self):
        """A timestamp: a timing event on the compute stream (CUDA) or perf_counter seconds."""
        if not self.transfer.is_cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def start_timeline(self) -> None:
        """Record copy and compute intervals from now on (see `timeline_intervals`)."""
        self.timeline = [("origin", self._mark())]

    def timeline_intervals(self) -> list[dict]:
        """The recorded intervals in ms since `start_timeline` (synchronizes with the device)."""
        assert self.timeline, "call start_timeline() first"
        origin = self.timeline[0][1]
        if self.transfer.is_cuda:
            torch.cuda.synchronize(self.device)
            ms = lambda ev: origin.elapsed_time(ev)  # noqa: E731
        else:
            ms = lambda t: (t - origin) * 1e3  # noqa: E731
        out = []
        for kind, layer_id, what, start, end in self.timeline[1:]:
            key = "expert" if kind == "copy" else "num_experts"
            out.append(
                {
                    "kind": kind,
                    "layer": layer_id,
                    key: what,
                    "start_ms": ms(start),
                    "end_ms": ms(end),
                }
            )
        return out


def check_ring_order(log: list[tuple[str, int, int]]) -> None:
    """Assert the ring discipline on an `order_log`: per slot, copy of generation g, reads of g,
    free of g, then copy of g + 1. With the events (a copy waits for the done event recorded after
    the free; a read waits for the copy's ready event) the issue order is the device order."""
    state: dict[int, tuple[int, bool]] = {}  # slot -> (generation held, loaded)
    for i, (op, slot, gen) in enumerate(log):
        held, loaded = state.get(slot, (gen - 1, False))  # a log may start mid-life
        where = f"order_log[{i}]: {op} of ring slot {slot} generation {gen}"
        if op == "copy":
            assert not loaded, f"{where} overwrites generation {held} before it was freed"
            assert gen == held + 1, f"{where} follows generation {held}"
            state[slot] = (gen, True)
        elif op == "read":
            assert loaded and gen == held, (
                f"{where}, but the slot holds generation {held} ({'loaded' if loaded else 'freed'})"
            )
        else:
            assert op == "free" and loaded and gen == held, f"{where}: not the loaded generation"
            state[slot] = (gen, False)
