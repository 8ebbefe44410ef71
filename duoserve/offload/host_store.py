"""Host store: every expert packed in (pinned) host memory, one copy moves one expert.

One block per MoE layer, [E, 3*I*H]: row e is expert e packed as gate, up, down; with int4
experts the block is uint8 [E, layout.num_bytes], row e one int4 expert buffer (quant/int4.py),
quantized as it is read or converted from an AWQ/GPTQ checkpoint. Blocks are pinned once,
here, as they are allocated (pinning runs at ~1 GB/s, so the time is printed).
Experts are read one at a time from the checkpoint, so a load never holds the model twice.
"""

from __future__ import annotations

import sys
import time

import torch
from tqdm import tqdm

from duoserve.config import ModelConfig
from duoserve.quant.int4 import Int4ExpertLayout
from duoserve.quant.loading import load_int4_layer
from duoserve.weights.loader import iter_expert_weights, pack_expert


class HostExpertStore:
    """Packed experts of every MoE layer in host memory, pinned when a GPU is used."""

    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype,
        pin: bool,
        layout: Int4ExpertLayout | None = None,
    ) -> None:
        self.cfg = cfg
        self.compute_dtype = dtype  # the serving dtype
        self.layout = layout  # None: experts in the serving dtype
        self.dtype = dtype if layout is None else torch.uint8  # element type of a slot
        self.slot_numel = cfg.expert_numel if layout is None else layout.num_bytes
        self.is_pinned = pin
        self.layer_index = {layer_id: i for i, layer_id in enumerate(cfg.moe_layer_ids)}
        self.expert_bytes = self.slot_numel * torch.empty((), dtype=self.dtype).element_size()
        self.blocks: list[torch.Tensor] = []
        self._views: dict[tuple[int, int], torch.Tensor] = {}  # expert(): views made once
        self.load_seconds = 0.0
        self.pin_seconds = 0.0

    @property
    def num_bytes(self) -> int:
        return self.cfg.num_moe_layers * self.cfg.num_experts * self.expert_bytes

    def expert(self, layer_id: int, expert_id: int) -> torch.Tensor:
        """The packed expert [3*I*H] or int4 buffer [num_bytes] (a view into its layer's block).

        Views are made once and kept: a decode step asks for hundreds of them, and making a
        tensor view costs the host microseconds each time."""
        view = self._views.get((layer_id, expert_id))
        if view is None:
            view = self._views[(layer_id, expert_id)] = self.blocks[self.layer_index[layer_id]][
                expert_id
            ]
        return view

    def load(self, source, staging_device: str | torch.device = "cpu") -> None:
        """Allocate (and pin) the blocks, then fill them expert by expert from `source`."""
        cfg = self.cfg
        t0 = time.perf_counter()
        self._views.clear()
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
                    cfg.num_experts, self.slot_numel, dtype=self.dtype, pin_memory=self.is_pinned
                )
                self.pin_seconds += time.perf_counter() - t_pin
                self.blocks.append(block)
                if self.layout is not None:
                    load_int4_layer(cfg, source, layer_id, self.layout, block, staging_device)
                    bar.update(cfg.num_experts)
                    continue
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
