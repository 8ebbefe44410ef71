"""Choose and build the expert backend for a loaded model (the `--policy` switch)."""

from __future__ import annotations

import sys

import torch

from duoserve.config import EngineConfig, ModelConfig
from duoserve.models.moe_lm import MoELM
from duoserve.offload.backends import CachedExperts, OnDemandExperts
from duoserve.offload.host_store import HostExpertStore
from duoserve.offload.planner import MemoryPlan, plan_memory
from duoserve.offload.policies import EVICTION_POLICIES
from duoserve.offload.resident import ResidentExperts
from duoserve.quant.loading import expert_layout

POLICIES = ("full-gpu", "ondemand", *sorted(EVICTION_POLICIES))


def resolve_policy(engine: EngineConfig) -> str:
    policy = engine.policy
    if policy == "auto":
        policy = "full-gpu" if engine.gpu_memory_budget is None else "lru"
    if policy not in POLICIES:
        raise ValueError(f"unknown policy '{policy}'; known: {', '.join(POLICIES)}, auto")
    return policy


def plan_for(
    cfg: ModelConfig,
    engine: EngineConfig,
    dtype: torch.dtype,
    device: torch.device,
    verbose: bool = True,
) -> MemoryPlan | None:
    """The memory plan (printed), or None when no budget was given."""
    if engine.gpu_memory_budget is None:
        return None
    policy = resolve_policy(engine)
    plan = plan_memory(
        cfg, engine, dtype, device, policy, min_expert_slots=1 if policy == "ondemand" else None
    )
    if policy == "ondemand":
        plan = MemoryPlan(**{**plan.__dict__, "num_expert_slots": 1})
    if verbose:
        print(f"[duoserve] memory plan ({policy}, {device}):\n{plan.table()}", file=sys.stderr)
    return plan


def build_expert_runtime(
    model: MoELM,
    cfg: ModelConfig,
    engine: EngineConfig,
    source,
    device: torch.device,
    dtype: torch.dtype,
    plan: MemoryPlan | None,
    store: HostExpertStore | None = None,
):
    """Build the backend the policy names and attach it to the MoE blocks.

    Offloading policies read experts from `store` (built from `source` when None);
    full-gpu copies them from the store when there is one, else from `source`.
    With int4 experts (`--expert-dtype int4` or a quantized checkpoint) every place that holds
    experts holds int4 buffers of one layout. Returns (backend, store).
    """
    policy = resolve_policy(engine)
    staging = getattr(source, "device", "cpu")
    layout = expert_layout(cfg, engine)
    if store is not None and store.layout != layout:
        store = None  # a different expert format: rebuild the host store
    if policy == "full-gpu":
        backend = ResidentExperts(cfg, device, dtype, layout)
        if store is not None:
            backend.load_from_store(store)
        else:
            backend.load(source, staging)
    else:
        if store is None:
            store = HostExpertStore(cfg, dtype, pin=device.type == "cuda", layout=layout)
            store.load(source, staging)
        assert plan is not None, f"policy {policy} needs --gpu-memory-budget"
        if policy == "ondemand":
            backend = OnDemandExperts(cfg, store, device)
        else:
            backend = CachedExperts(cfg, store, plan.num_expert_slots, policy, device)
    for block in model.moe_blocks():
        block.backend = backend
    return backend, store
