"""Choose and build the expert backend for a loaded model (the `--policy` switch)."""

from __future__ import annotations

import torch

from duoserve.config import EngineConfig, ModelConfig
from duoserve.models.moe_lm import MoELM
from duoserve.offload.resident import ResidentExperts


def build_expert_runtime(
    model: MoELM,
    cfg: ModelConfig,
    engine: EngineConfig,
    source,
    device: torch.device,
    dtype: torch.dtype,
):
    """Load every expert into the backend the policy names and attach it to the MoE blocks."""
    policy = engine.policy
    if policy == "auto":
        policy = "full-gpu" if engine.gpu_memory_budget is None else "lru"
    if policy != "full-gpu":
        raise ValueError(f"unknown policy '{policy}'; known: full-gpu")
    backend = ResidentExperts(cfg, device, dtype)
    staging = source.device if hasattr(source, "device") else "cpu"
    backend.load(source, staging)
    for block in model.moe_blocks():
        block.backend = backend
    return backend
