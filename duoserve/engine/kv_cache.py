"""KV cache: one [slots, kv_heads, max_len, head_dim] tensor pair per layer, allocated once."""

from __future__ import annotations

import torch

from duoserve.config import ModelConfig


def kv_cache_bytes(cfg: ModelConfig, num_slots: int, max_len: int, dtype: torch.dtype) -> int:
    """Bytes the cache of `num_slots` sequences of `max_len` tokens takes."""
    elem = torch.empty((), dtype=dtype).element_size()
    num_rows = num_slots + 1  # + the scratch slot
    return 2 * cfg.num_layers * num_rows * cfg.num_kv_heads * max_len * cfg.head_dim * elem


class KVCache:
    """Keys and values of every running sequence; a sequence owns one slot for its life.

    One extra slot, `scratch_slot`, is never handed out: CUDA-graph capture writes there.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        num_slots: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_slots + 1, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.scratch_slot = num_slots
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.values = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)
        ]
        self.num_slots = num_slots
        self.max_len = max_len
        self.free_slots = list(range(num_slots - 1, -1, -1))

    def allocate_slot(self) -> int:
        assert self.free_slots, "no free KV slot: the scheduler must check num_free_slots"
        return self.free_slots.pop()

    def free_slot(self, slot: int) -> None:
        assert slot not in self.free_slots, f"KV slot {slot} freed twice"
        self.free_slots.append(slot)

    @property
    def num_free_slots(self) -> int:
        return len(self.free_slots)

    def write(
        self,
        layer_id: int,
        token_slots: torch.Tensor,
        positions: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        """Store k, v [T, KVH, D] of T tokens at (slot, position) pairs."""
        self.keys[layer_id][token_slots, :, positions] = k
        self.values[layer_id][token_slots, :, positions] = v
