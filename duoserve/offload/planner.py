"""Memory planner: split `--gpu-memory-budget` into its parts at start-up, or refuse.

Everything the process holds on the device must fit: dense weights, the KV cache for
max_model_len x max_num_seqs, activations of the largest step, the prefill staging ring,
expert slots (int4 experts: `layout.num_bytes` each, plus one expert's worth of serving-dtype
dequant scratch for prefill), and allocator slack. Pipeline policies also hold a prefill
staging ring of `num_ring_slots` expert slots (sized by `ring_slots`) in `staging_bytes`.
(The CUDA context itself, ~0.5 GiB, is outside torch's allocator and outside the budget, as in
vLLM's accounting.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from duoserve.config import EngineConfig, ModelConfig
from duoserve.engine.kv_cache import kv_cache_bytes
from duoserve.quant.loading import dequant_scratch_bytes, expert_slot_bytes
from duoserve.weights.mapping import dense_param_table

GiB = 2**30
# Prefill staging ring (offload/prefill.py), default size: enough slots that the copies queued
# ahead cover the host's per-layer gap (routing sync + issuing), R * copy time >= RING_COVER_S at
# the nominal pinned-link bandwidth, at least RING_MIN_SLOTS (double buffering), at most the
# experts of one layer, and never more than RING_MAX_FRACTION of what is left for expert slots
# (the decode cache keeps most of the budget). --prefill-ring-slots overrides.
RING_COVER_S = 4e-3
RING_LINK_BYTES_PER_S = 48e9
RING_MIN_SLOTS = 2
RING_MAX_FRACTION = 0.25
SLACK_BYTES = {"cuda": 256 * 2**20, "cpu": 2**20}  # fragmentation, small allocations
SLACK_FRACTION = 0.03


class BudgetError(ValueError):
    """The budget cannot hold the minimum the model needs; the message names the minimum."""


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes given to each part; `num_expert_slots` device slots of `expert_bytes` each."""

    budget_bytes: int
    dense_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    staging_bytes: int
    slack_bytes: int
    expert_bytes: int
    num_expert_slots: int
    num_experts_total: int
    dequant_scratch_bytes: int = 0  # int4 experts: the prefill dequant buffer
    num_ring_slots: int = 0  # prefill staging ring slots (staging_bytes holds them)

    @property
    def expert_cache_bytes(self) -> int:
        return self.num_expert_slots * self.expert_bytes

    def table(self) -> str:
        rows = [
            ("dense weights", self.dense_bytes),
            ("KV cache", self.kv_cache_bytes),
            ("activations", self.activation_bytes),
            (f"prefill staging ({self.num_ring_slots} ring slots)", self.staging_bytes),
            ("int4 dequant scratch", self.dequant_scratch_bytes),
            (
                f"expert slots ({self.num_expert_slots} of {self.num_experts_total})",
                self.expert_cache_bytes,
            ),
            ("allocator slack", self.slack_bytes),
        ]
        used = sum(b for _, b in rows)
        lines = [f"{'part':<34}{'GiB':>9}"]
        lines += [f"{name:<34}{b / GiB:>9.3f}" for name, b in rows]
        lines.append(
            f"{'total (budget ' + f'{self.budget_bytes / GiB:.2f})':<34}{used / GiB:>9.3f}"
        )
        return "\n".join(lines)


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def dense_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    numel = sum(_numel(shape) for _, shape in dense_param_table(cfg).values())
    return numel * _elem(dtype)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def activation_bytes(cfg: ModelConfig, engine: EngineConfig, dtype: torch.dtype, cpu: bool) -> int:
    """A generous estimate of the live activations of the largest step."""
    T, B, e = engine.max_num_batched_tokens, engine.max_num_seqs, _elem(dtype)
    H, K = cfg.hidden_size, cfg.num_experts_per_tok
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    inter = max(
        cfg.intermediate_size, cfg.shared_expert_intermediate_size, cfg.moe_intermediate_size
    )
    per_token = (8 * H + 2 * qkv + 3 * inter + 2 * K * H) * e + (K * H + 2 * cfg.num_experts) * 4
    scores = cfg.num_heads * T * min(T, engine.max_model_len) * 4 if cpu else 0  # math SDPA
    logits = 2 * B * cfg.vocab_size * 4
    return int(1.25 * (T * per_token + scores + logits))


def plan_memory(
    cfg: ModelConfig,
    engine: EngineConfig,
    dtype: torch.dtype,
    device: torch.device,
    policy: str,
    staging_bytes: int = 0,
    min_expert_slots: int | None = None,
    prefill_ring: bool = False,
) -> MemoryPlan:
    """Divide the budget; raise BudgetError if even the minimum does not fit.

    With `prefill_ring` (pipeline policies) the prefill staging ring is planned too (see
    `ring_slots`): its slots, plus int4 experts' dequant scratch for the pipeline, count in
    `staging_bytes`, and the minimum includes the smallest ring."""
    assert engine.gpu_memory_budget is not None, "plan_memory needs a budget"
    budget = int(engine.gpu_memory_budget * GiB)
    expert_bytes = expert_slot_bytes(cfg, engine, dtype)
    total_experts = cfg.num_moe_layers * cfg.num_experts
    fixed = dict(
        dense_bytes=dense_bytes(cfg, dtype),
        kv_cache_bytes=kv_cache_bytes(cfg, engine.max_num_seqs, engine.max_model_len, dtype),
        activation_bytes=activation_bytes(cfg, engine, dtype, device.type == "cpu"),
        staging_bytes=staging_bytes,
        dequant_scratch_bytes=dequant_scratch_bytes(cfg, engine, dtype)
        if device.type == "cuda"
        else 0,
        slack_bytes=SLACK_BYTES[device.type] + int(SLACK_FRACTION * budget),
    )
    fixed_total = sum(fixed.values())
    if policy == "full-gpu":
        need = fixed_total + total_experts * expert_bytes
        if need > budget:
            raise BudgetError(
                f"policy full-gpu needs {need / GiB:.2f} GiB (all {total_experts} experts "
                f"resident) but the budget is {budget / GiB:.2f} GiB; raise "
                "--gpu-memory-budget or pick an offloading policy (lru, ondemand)"
            )
        return MemoryPlan(
            budget,
            expert_bytes=expert_bytes,
            num_expert_slots=total_experts,
            num_experts_total=total_experts,
            **fixed,
        )
    min_slots = min_expert_slots if min_expert_slots is not None else cfg.num_experts_per_tok
    num_ring, ring_min = 0, 0
    if prefill_ring:
        ring_min = engine.prefill_ring_slots or RING_MIN_SLOTS
        ring_scratch = fixed["dequant_scratch_bytes"]  # the pipeline's own dequant buffer
        fixed["staging_bytes"] += ring_scratch
        fixed_total += ring_scratch
    minimum = fixed_total + (min_slots + ring_min) * expert_bytes
    if minimum > budget:
        parts = ", ".join(f"{k.removesuffix('_bytes')} {v / GiB:.3f}" for k, v in fixed.items())
        ring_note = f", {ring_min} prefill ring slots {ring_min * expert_bytes / GiB:.3f}"
        raise BudgetError(
            f"--gpu-memory-budget {budget / GiB:.3f} GiB is below the minimum "
            f"{minimum / GiB:.3f} GiB for this model with max_model_len={engine.max_model_len}, "
            f"max_num_seqs={engine.max_num_seqs}, max_num_batched_tokens="
            f"{engine.max_num_batched_tokens} (GiB: {parts}, {min_slots} expert slots "
            f"{min_slots * expert_bytes / GiB:.3f}{ring_note if ring_min else ''})"
        )
    if prefill_ring:
        num_ring = ring_slots(cfg, engine, expert_bytes, budget - fixed_total, min_slots)
        fixed["staging_bytes"] += num_ring * expert_bytes
        fixed_total += num_ring * expert_bytes
    num_slots = min((budget - fixed_total) // expert_bytes, total_experts)
    return MemoryPlan(
        budget,
        expert_bytes=expert_bytes,
        num_expert_slots=int(num_slots),
        num_experts_total=total_experts,
        num_ring_slots=num_ring,
        **fixed,
    )


def ring_slots(
    cfg: ModelConfig, engine: EngineConfig, expert_bytes: int, free_bytes: int, min_cache: int
) -> int:
    """Slots of the prefill staging ring given `free_bytes` left for ring + expert cache.

    --prefill-ring-slots wins; otherwise the smallest R with R * (expert copy time at
    RING_LINK_BYTES_PER_S) >= RING_COVER_S, in [RING_MIN_SLOTS, experts per layer], cut to
    RING_MAX_FRACTION of `free_bytes` and to what leaves `min_cache` cache slots (never below
    RING_MIN_SLOTS: the caller checked that the minimum fits).
    """
    if engine.prefill_ring_slots:
        return engine.prefill_ring_slots
    want = math.ceil(RING_COVER_S * RING_LINK_BYTES_PER_S / expert_bytes)
    want = max(RING_MIN_SLOTS, min(want, cfg.num_experts))
    cap = min(int(RING_MAX_FRACTION * free_bytes), free_bytes - min_cache * expert_bytes)
    return max(RING_MIN_SLOTS, min(want, cap // expert_bytes))
