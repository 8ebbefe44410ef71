"""Per-step state that the layers read: one small object, set and cleared in one place."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class StepContext:
    """What one forward pass over a flat batch of T tokens from B sequences needs to know.

    Tokens of sequence b are rows `token_offsets[b] : token_offsets[b + 1]` of the flat batch;
    they sit at positions `start_positions[b] ...` of KV-cache slot `slot_ids[b]`.
    """

    phase: str  # "prefill" or "decode": selects the expert schedule
    slot_ids: list[int]
    start_positions: list[int]
    num_new_tokens: list[int]
    positions_dev: torch.Tensor  # [T] int64
    token_slots_dev: torch.Tensor  # [T] int64
    seq_lens_dev: torch.Tensor | None = None  # [B] int64, decode only
    slot_ids_dev: torch.Tensor | None = None  # [B] int64, decode only
    static_kv_len: int | None = None  # decode attends over this many cache rows (CUDA graphs)
    capturing: bool = False  # a CUDA-graph warm-up or capture: skip host-side bookkeeping
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.slot_ids)

    @property
    def token_offsets(self) -> list[int]:
        offsets = [0]
        for n in self.num_new_tokens:
            offsets.append(offsets[-1] + n)
        return offsets

    @property
    def is_pure_decode(self) -> bool:
        return all(n == 1 for n in self.num_new_tokens)


def build_step_context(
    phase: str, slots: list[int], starts: list[int], counts: list[int], device=None
) -> StepContext:
    """The context of one step: sequence i in KV slot slots[i] gets counts[i] new tokens from
    position starts[i]; its per-token device tensors on `device` (pure decode: the sequences'
    lengths and slots too)."""
    positions = [s + i for s, n in zip(starts, counts) for i in range(n)]
    token_slots = [slot for slot, n in zip(slots, counts) for _ in range(n)]
    to_dev = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    ctx = StepContext(
        phase=phase,
        slot_ids=slots,
        start_positions=starts,
        num_new_tokens=counts,
        positions_dev=to_dev(positions),
        token_slots_dev=to_dev(token_slots),
    )
    if ctx.is_pure_decode:
        ctx.seq_lens_dev = to_dev([s + 1 for s in starts])
        ctx.slot_ids_dev = to_dev(slots)
    return ctx


_current: StepContext | None = None


@contextmanager
def step_context(ctx: StepContext) -> Iterator[StepContext]:
    """Make `ctx` current for the duration of one forward pass (nesting is refused)."""
    global _current
    assert _current is None, "step contexts do not nest"
    _current = ctx
    try:
        yield ctx
    finally:
        _current = None


def get_step_context() -> StepContext:
    assert _current is not None, "no step context: call the model inside step_context(...)"
    return _current
