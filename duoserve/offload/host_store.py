"""Host store: every expert packed in (pinned) host memory, one copy moves one expert.

One block per MoE layer, [E, 3*I*H]: row e is expert e packed as gate, up, down. Blocks are
pinned once, here, as they are allocated (pinning runs at ~1 GB/s, so the time is printed).
Experts are read one at a time from the checkpoint, so a load never holds the model twice.
"""

from __future__ import annotations

import sys
import time

import torch
from tqdm import tqdm

from duoserve.config import ModelConfig
from duoserve.weights.loader import iter_expert_weights, pack_expert


class HostExpertStore:
    """Packed experts of every MoE layer in host memory, pinned when a GPU is used."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, pin: bool) -> None:
        self.cfg = cfg
        self.dtype = dtype
        self.is_pinned = pin
        self.layer_index = {layer_id: i for i, layer_id in enumerate(cfg.moe_layer_ids)}
        self.expert_bytes = cfg.expert_numel * torch.empty((), dtype=dtype).element_size()
        self.blocks: list[torch.Tensor] = []
        self.load_seconds = 0.0
        self.pin_seconds = 0.0

    @property
    def num_bytes(self) -> int:
        return self.cfg.num_moe_layers * self.cfg.num_experts * self.expert_bytes

    def expert(self, layer_id: int, expert_id: int) -> torch.Tensor:
        """The packed expert [3*I*H] (a view into its layer's block)."""
        return self.blocks[self.layer_index[layer_id]][expert_id]

    def load(self, source, staging_device: str | torch.device = "cpu") -> None:
        """Allocate (and pin) the blocks, then fill them expert by expert from `source`."""
        cfg = self.cfg
        t0 = time.perf_counter()
        where = "pinned host" if self.is_pinned else "host"
        desc = f"experts -> {where} ({self.num_bytes / 2**30:.1f} GiB)"
        bar = tqdm(
            total=cfg.num_moe_layers * cfg.num_experts,
            desc=desc,
            unit="expert",
            disable=self.num_bytes < 2**30,
            file=sys.stderr,
        )
        with torch.no_grad():
            for layer_id in cfg.moe_layer_ids:
                t_pin = time.perf_counter()
                block = torch.empty(
                    cfg.num_experts, cfg.expert_numel, dtype=self.dtype, pin_memory=self.is_pinned
                )
                self.pin_seconds += time.perf_counter() - t_pin
                self.blocks.append(block)
                for e, gate, up, down in iter_expert_weights(cfg, source, layer_id, staging_device):
                    pack_expert(block[e], gate, up, down)
                    bar.update(1)
        bar.close()
        self.load_seconds = time.perf_counter() - t0
        if self.num_bytes > 2**30:
            print(
                f"[duoserve] host store: {self.num_bytes / 2**30:.1f} GiB of experts in "
                f"{self.load_seconds:.1f} s (allocating{' + pinning' if self.is_pinned else ''}: "
                f"{self.pin_seconds:.1f} s)",
                file=sys.stderr,
            )
