"""MoE block: router (top-k on the device), one named host sync, experts through a backend.

Where expert weights live (all on the GPU, in a cache fed from pinned host memory, streamed
for prefill...) is the backend's business; this module only routes and combines, and does
so deterministically: each (token, choice) pair gets its own output row, so the order in
which a backend computes experts never changes the result.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from duoserve.config import ModelConfig
from duoserve.engine.context import get_step_context


@dataclass
class RoutingPlan:
    """Which experts a layer's tokens use.

    Assignment rows (one per token x choice, T*K of them) sorted by expert are built on first
    use (`order_dev` ...), so a backend that sorts by its own key pays for one sort only. The
    host lists come from the one routing sync and are None for backends that need no sync.
    """

    layer_id: int
    flat_ids_dev: torch.Tensor  # [T*K] expert of each (token, choice), token-major
    top_k: int
    counts_dev: torch.Tensor  # [E] assignments per expert
    expert_ids: list[int] | None = None  # experts used by >= 1 token, ascending
    token_counts: list[int] | None = None  # assignments per used expert
    extra_dev: torch.Tensor | None = None  # a backend's [n] int64 tensor to ride the sync
    extra_host: list[int] | None = None  # ... and its values after the sync
    extra_info: object = None  # the backend's host-side note on extra_dev (set with it)
    sync_dev: torch.Tensor | None = None  # [E (+ n)] what the sync brings: counts (+ extra)
    rows_are_flat: bool = False  # set by a backend that filled out_rows in (token, choice) order
    acquired: list | None = None  # a split backend's cache slots, from prepare to after_compute

    def fresh(self) -> RoutingPlan:
        """The same device tensors without host results: a captured decode graph rewrites
        these tensors at each replay, whose plan starts again from here."""
        return dataclasses.replace(
            self,
            expert_ids=None,
            token_counts=None,
            extra_host=None,
            rows_are_flat=False,
            acquired=None,
        )

    @cached_property
    def order_dev(self) -> torch.Tensor:
        """[T*K] flat assignment index, sorted by expert (stable: token order within one)."""
        return torch.argsort(self.flat_ids_dev, stable=True)

    @cached_property
    def token_rows_dev(self) -> torch.Tensor:
        """[T*K] token row of each sorted assignment."""
        return self.order_dev // self.top_k

    @cached_property
    def expert_of_row_dev(self) -> torch.Tensor:
        """[T*K] expert of each sorted assignment."""
        return self.flat_ids_dev[self.order_dev]

    @property
    def row_offsets(self) -> list[int]:
        assert self.token_counts is not None, "row offsets need the host sync"
        offsets = [0]
        for n in self.token_counts:
            offsets.append(offsets[-1] + n)
        return offsets


def plan_routing(
    layer_id: int, topk_ids: torch.Tensor, num_experts: int, sync: bool
) -> RoutingPlan:
    """Count a layer's assignments per expert; with `sync`, bring the counts to the host.

    topk_ids: [T, K] expert ids on the device.
    """
    flat = topk_ids.flatten()  # [T*K]
    plan = RoutingPlan(layer_id, flat, topk_ids.shape[1], count_groups(flat, num_experts))
    if sync:
        sync_routed_experts(plan)
    return plan


_ONES: dict[tuple[int, torch.device], torch.Tensor] = {}


def count_groups(group_ids: torch.Tensor, num_groups: int) -> torch.Tensor:
    """How many entries of `group_ids` fall in each group, [G] int64, without a host sync.

    (torch.bincount syncs on CUDA to size its output; a scatter-add of fixed size does not.)
    """
    n, device = group_ids.numel(), group_ids.device
    ones = _ONES.get((n, device))
    if ones is None:
        ones = torch.ones(n, dtype=torch.long, device=device)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _ONES[(n, device)] = ones  # NOTE: never keep a tensor of a graph's private pool
    counts = torch.zeros(num_groups, dtype=torch.long, device=device)
    return counts.scatter_add_(0, group_ids, ones)


def prepare_sync(plan: RoutingPlan) -> None:
    """Set plan.sync_dev: the counts, with a backend's `extra_dev` concatenated (one transfer)."""
    plan.sync_dev = (
        plan.counts_dev if plan.extra_dev is None else torch.cat([plan.counts_dev, plan.extra_dev])
    )


_STAGING: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # pinned, grown on demand


def host_list(t: torch.Tensor) -> list:
    """`t.tolist()` of a 1-D tensor; from a CUDA tensor through a reused pinned buffer, after
    the current stream's work (what .tolist() waits for too, without its pageable copy and
    fresh host tensor each call)."""
    if t.device.type != "cuda":
        return t.tolist()
    n, key = t.numel(), (t.device, t.dtype)
    buf = _STAGING.get(key)
    if buf is None or buf.numel() < n:
        buf = _STAGING[key] = torch.empty(max(n, 4096), dtype=t.dtype, pin_memory=True)
    host = buf[:n]
    host.copy_(t, non_blocking=True)
    torch.cuda.current_stream(t.device).synchronize()
    return host.tolist()


def sync_routed_experts(plan: RoutingPlan) -> None:
    """THE per-layer host sync: bring plan.sync_dev (prepare_sync) to the host, timed."""
    t0 = time.perf_counter()
    if plan.sync_dev is None:
        prepare_sync(plan)
    values = host_list(plan.sync_dev)  # NOTE: the one host sync of a MoE layer
    stats = get_step_context().stats
    stats["routing_sync_s"] = stats.get("routing_sync_s", 0.0) + time.perf_counter() - t0
    stats["routing_syncs"] = stats.get("routing_syncs", 0) + 1
    E = plan.counts_dev.shape[0]
    counts = values[:E] if plan.extra_dev is not None else values
    plan.extra_host = values[E:] if plan.extra_dev is not None else None
    plan.expert_ids = [e for e, n in enumerate(counts) if n]
    plan.token_counts = [counts[e] for e in plan.expert_ids]


def expert_mlp(x: torch.Tensor, weights: torch.Tensor, inter: int) -> torch.Tensor:
    """down(silu(gate x) * up x) for x [n, H] and one packed expert [3*I*H] (gate, up, down)."""
    H = x.shape[-1]
    gate_up = weights[: 2 * inter * H].view(2 * inter, H)  # [2I, H]
    down = weights[2 * inter * H :].view(H, inter)  # [H, I]
    gate, up = F.linear(x, gate_up).split(inter, dim=-1)
    return F.linear(F.silu(gate) * up, down)


MAX_GROUPS = 1000  # torch._grouped_mm refuses 1024 groups and more


def grouped_expert_mlp(
    x_rows: torch.Tensor,
    pool: torch.Tensor,
    group_of_row: torch.Tensor | None,
    inter: int,
    offs: torch.Tensor | None = None,
) -> torch.Tensor:
    """expert_mlp for many rows at once: row r uses packed expert pool[group_of_row[r]].

    x_rows [N, H] sorted by group; pool [G, 3*I*H]; one grouped GEMM per projection, no loop
    and no host sync (empty groups cost nothing). `offs` [G] int32 (end row of each group)
    may be given instead of `group_of_row`.
    """
    # N rows, G groups, H hidden, I intermediate
    G, H = pool.shape[0], x_rows.shape[1]
    assert G <= MAX_GROUPS, f"grouped GEMM takes at most {MAX_GROUPS} groups, got {G}"
    if offs is None:
        offs = torch.cumsum(count_groups(group_of_row, G), 0).to(torch.int32)  # [G]
    gate_up, down = pool_views(pool, inter, H)
    return grouped_mlp_views(x_rows, gate_up, down, offs, inter)


def pool_views(pool: torch.Tensor, inter: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed experts [G, 3*I*H] as grouped-GEMM operands: gate_up [G, H, 2I], down [G, I, H]
    (views: make them once per pool and slice windows from them)."""
    G, H = pool.shape[0], hidden
    gate_up = pool[:, : 2 * inter * H].view(G, 2 * inter, H).transpose(1, 2)  # [G, H, 2I]
    down = pool[:, 2 * inter * H :].view(G, H, inter).transpose(1, 2)  # [G, I, H]
    return gate_up, down


def grouped_mlp_views(
    x_rows: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, offs: torch.Tensor, inter: int
) -> torch.Tensor:
    """grouped_expert_mlp on pool_views operands; offs [G] int32 end row of each group."""
    h = torch._grouped_mm(x_rows, gate_up, offs=offs)  # [N, 2I]
    h = F.silu(h[:, :inter]) * h[:, inter:]  # [N, I]
    return torch._grouped_mm(h, down, offs=offs)  # [N, H]


def grouped_mm_supported(hidden: int, inter: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether torch's grouped GEMM takes these shapes (16-byte aligned rows) on this device."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    elem = torch.empty((), dtype=dtype).element_size()
    if (hidden * elem) % 16 or (inter * elem) % 16:
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    return dtype in (torch.float32, torch.bfloat16)


class ExpertBackend(Protocol):
    """Computes the routed experts of one MoE layer: returns one output row per assignment."""

    needs_host_plan: bool  # whether compute() needs plan.expert_ids (the routing sync)

    def compute(self, x: torch.Tensor, plan: RoutingPlan, out_rows: torch.Tensor) -> None:
        """Fill out_rows[r] (sorted assignment rows, [T*K, H]) with expert(x[token of r]),
        or, setting plan.rows_are_flat, out_rows[t*K + k] with expert k of token t."""
        ...

    # Optional: before_sync(layer_id, x, topk_ids, plan) -> [n] int64 device tensor or None,
    # called after routing and before the routing sync; its values arrive in plan.extra_host
    # with the same sync (the decode predictor's ids: offload/prefetch.py).


class DenseMLP(nn.Module):
    """Gated SiLU MLP (dense layers and the Qwen2-MoE shared expert)."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEBlock(nn.Module):
    """Router + routed experts (+ the sigmoid-gated shared expert of Qwen2-MoE)."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.keep_fp32_weights = cfg.family == "mixtral"
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.shared_expert = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = DenseMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.backend: ExpertBackend | None = None  # set by the engine after loading
        # optional fn(layer_id, x [T, H], topk_ids, topk_weights) -> (ids, weights): tracers
        # record routing (and the hidden state, for lookahead features); replay forces it
        self.routing_hook = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert ids [T, K] and weights [T, K] (softmax over all experts, then top-k)."""
        probs = F.softmax(self.router(x).float(), dim=-1)  # [T, E]
        topk_weights, topk_ids = torch.topk(probs, self.top_k, dim=-1)  # [T, K]
        if self.norm_topk_prob:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        if not self.keep_fp32_weights:
            topk_weights = topk_weights.to(x.dtype)
        return topk_ids, topk_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        point = self.run_experts(self.begin(x))
        out = self.finish(point)
        self.after_experts(point)
        return out

    # The stages of forward. Segmented decode graphs (engine/cuda_graphs.py) capture `begin`
    # and `finish` and run `run_experts` (which waits for the routing) and `after_experts`
    # eagerly. A backend that `splits` a layer (offload/backends.py) does its host work in
    # run_experts and its device work in finish, where a graph captures it.

    def begin(self, x: torch.Tensor) -> MoEPoint:
        """Route x [T, H] and prepare the routing sync (device work only, no host sync)."""
        # T tokens, K top-k, H hidden
        assert self.backend is not None, "MoE block has no expert backend: load the model first"
        T, H = x.shape
        topk_ids, topk_weights = self.route(x)
        if self.routing_hook is not None:
            topk_ids, topk_weights = self.routing_hook(self.layer_id, x, topk_ids, topk_weights)
        backend = self.backend
        plan = plan_routing(self.layer_id, topk_ids, self.num_experts, sync=False)
        if backend.needs_host_plan:
            before_sync = getattr(backend, "before_sync", None)
            if before_sync is not None:
                plan.extra_dev = before_sync(self.layer_id, x, topk_ids, plan)
            prepare_sync(plan)
        rows = torch.empty(T * self.top_k, H, dtype=x.dtype, device=x.device)
        split = getattr(backend, "splits", None)
        return MoEPoint(x, plan, topk_weights, rows, split is not None and split(T))

    def run_experts(self, point: MoEPoint, plan: RoutingPlan | None = None) -> MoEPoint:
        """Sync the routing (when the backend needs it) and compute the routed experts into
        point.rows, in (token, choice) order, or only prepare them (split backends).
        `plan`: a fresh copy of point.plan (graph replays)."""
        plan = point.host_plan = plan or point.plan
        if self.backend.needs_host_plan:
            sync_routed_experts(plan)
        if point.split:
            self.backend.prepare(point.x, plan)
            return point
        rows = point.rows
        self.backend.compute(point.x, plan, rows)
        if not plan.rows_are_flat:  # back to (token, choice) order, in place
            rows[plan.order_dev] = rows.clone()
        return point

    def finish(self, point: MoEPoint) -> torch.Tensor:
        """(A split backend's device stage, then) combine the rows with the routing weights
        (+ the shared expert)."""
        x, rows = point.x, point.rows
        if point.split:
            self.backend.device_compute(x, point.plan, rows)
        T, H = x.shape
        out = rows.view(T, self.top_k, H).float() * point.topk_weights[:, :, None].float()
        out = out.sum(1).to(x.dtype)
        if self.shared_expert is not None:
            gate = torch.sigmoid(self.shared_expert_gate(x))
            out = out + gate * self.shared_expert(x)
        return out

    def after_experts(self, point: MoEPoint) -> None:
        """Once finish was issued: a split backend's last host stage."""
        if point.split:
            self.backend.after_compute(point.host_plan)


@dataclass
class MoEPoint:
    """One MoE layer between `begin` and `finish`: its input, routing and output rows."""

    x: torch.Tensor  # [T, H] MoE input
    plan: RoutingPlan
    topk_weights: torch.Tensor  # [T, K]
    rows: torch.Tensor  # [T*K, H] expert outputs, (token, choice) order once computed
    split: bool = False  # the backend splits this layer (prepare / device_compute / after)
    host_plan: RoutingPlan | None = None  # the plan run_experts synced (point.plan or a copy)
