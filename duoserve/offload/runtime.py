"""Choose and build the expert backend for a loaded model (the `--policy` switch)."""

from __future__ import annotations

import sys

import torch

from duoserve.config import EngineConfig, ModelConfig
from duoserve.models.moe_lm import MoELM
from duoserve.offload.backends import CachedExperts, OnDemandExperts
from duoserve.offload.expert_cache import ExpertCache
from duoserve.offload.host_store import HostExpertStore
from duoserve.offload.phased import PhasedExperts
from duoserve.offload.planner import MemoryPlan, plan_memory
from duoserve.offload.policies import EVICTION_POLICIES
from duoserve.offload.resident import ResidentExperts
from duoserve.offload.transfer import TransferEngine
from duoserve.quant.loading import expert_layout

# Offloading policies built from a shared cache: (prefill schedule, decode schedule).
# "cache:P": the expert cache with eviction policy P serves every routed expert (misses
# fetched when routed); "pipeline": the prefill streaming pipeline (offload/prefill.py);
# "prefetch:PRED": the cache plus predictor-driven prefetch (offload/prefetch.py).
SCHEDULES: dict[str, tuple[str, str]] = {
    **{name: (f"cache:{name}", f"cache:{name}") for name in sorted(EVICTION_POLICIES)},
    "pipeline": ("pipeline", "cache:lru"),
    "uniform": ("prefetch:ours", "prefetch:ours"),
    "duoserve": ("pipeline", "prefetch:ours"),
    "gate-lookahead": ("pipeline", "prefetch:gate-lookahead"),
    "trace-match": ("pipeline", "prefetch:trace-match"),
}
POLICIES = ("full-gpu", "ondemand", *SCHEDULES)


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
        cfg,
        engine,
        dtype,
        device,
        policy,
        min_expert_slots=1 if policy == "ondemand" else None,
        prefill_ring=SCHEDULES.get(policy, ("",))[0] == "pipeline",
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
            backend = _build_scheduled(policy, model, cfg, engine, store, device, plan)
    for block in model.moe_blocks():
        block.backend = backend
    return backend, store


def _build_scheduled(policy, model, cfg, engine, store, device, plan: MemoryPlan):
    """A cache-based policy: one cache and one copy stream shared by both phases' schedules."""
    prefill_kind, decode_kind = SCHEDULES[policy]
    if decode_kind.startswith("cache:"):
        eviction = decode_kind.split(":")[1]
    else:
        eviction = engine.prefetch_eviction if decode_kind.startswith("prefetch:") else "lru"
    cache = ExpertCache(
        plan.num_expert_slots,
        store.slot_numel,
        store.dtype,
        device,
        eviction,
        num_layers=cfg.num_layers,
    )
    transfer = TransferEngine(plan.num_expert_slots, device)
    built: dict[str, object] = {}

    def schedule(kind: str):
        if kind in built:  # the same schedule serves both phases: one object
            return built[kind]
        if kind.startswith("cache:"):
            out = CachedExperts(
                cfg, store, cache.num_slots, eviction, device, cache=cache, transfer=transfer
            )
        elif kind == "pipeline":
            from duoserve.offload.prefill import PrefillPipeline

            out = PrefillPipeline(cfg, store, cache, transfer, plan.num_ring_slots, device)
        elif kind.startswith("prefetch:"):
            from duoserve.offload.prefetch import PrefetchingExperts

            out = PrefetchingExperts(
                cfg, store, cache, transfer, device, kind.split(":", 1)[1], engine, model
            )
        else:
            raise AssertionError(f"unknown schedule {kind}")
        built[kind] = out
        return out

    prefill, decode = schedule(prefill_kind), schedule(decode_kind)
    for s in {id(prefill): prefill, id(decode): decode}.values():
        if hasattr(s, "phases"):  # a schedule that also sees the other phase's routing
            s.phases = tuple(p for p, b in (("prefill", prefill), ("decode", decode)) if b is s)
    if prefill is decode:
        decode.name = policy
        return decode
    return PhasedExperts(policy, prefill, decode)
