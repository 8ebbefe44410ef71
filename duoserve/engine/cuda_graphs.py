"""CUDA-graph decode: capture one decode step per batch size, then replay it.

Only for backends that need no host sync inside the step (full-gpu's grouped GEMM): a
captured graph cannot stop for the routing sync that offloading needs. Inputs live in static
buffers; attention runs over a fixed number of cache rows (`static_kv_len`, masked beyond
each sequence's length), so one graph serves every step of that batch size.
"""

from __future__ import annotations

import torch

from duoserve.engine.context import StepContext, step_context
from duoserve.engine.kv_cache import KVCache
from duoserve.models.moe_lm import MoELM


class GraphedDecode:
    """Lazily captured decode graphs, one per batch size."""

    def __init__(self, model: MoELM, kv: KVCache, device: torch.device) -> None:
        self.model, self.kv, self.device = model, kv, device
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.pool = None

    @staticmethod
    def supported(model: MoELM, device: torch.device) -> bool:
        blocks = model.moe_blocks()
        return device.type == "cuda" and all(
            not b.backend.needs_host_plan
            and (b.routing_hook is None or getattr(b.routing_hook, "graph_safe", False))
            for b in blocks
        )

    def _static_context(self, inputs: torch.Tensor) -> StepContext:
        B = inputs.shape[1]
        # inputs rows: token ids, positions, slots, sequence lengths
        return StepContext(
            phase="decode",
            slot_ids=[0] * B,
            start_positions=[0] * B,
            num_new_tokens=[1] * B,
            positions_dev=inputs[1],
            token_slots_dev=inputs[2],
            seq_lens_dev=inputs[3],
            slot_ids_dev=inputs[2],
            static_kv_len=self.kv.max_len,
        )

    def _capture(self, B: int) -> None:
        inputs = torch.zeros(4, B, dtype=torch.long, device=self.device)
        inputs[2] = self.kv.scratch_slot  # NOTE: warm-up and capture run the model: keep
        inputs[3] = 1  # their K/V writes out of every live sequence's slot
        ctx = self._static_context(inputs)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), step_context(ctx):  # warm up outside the graph
            self.model(inputs[0], inputs[1], self.kv, None)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), step_context(ctx):
            logits = self.model(inputs[0], inputs[1], self.kv, None)
        self.pool = graph.pool()
        self.graphs[B] = (graph, inputs, logits)

    def run(self, token_ids: list[int], slots: list[int], starts: list[int]) -> torch.Tensor:
        """Logits [B, V] of one decode step (token i at position starts[i] of slot slots[i])."""
        B = len(token_ids)
        if B not in self.graphs:
            self._capture(B)
        graph, inputs, logits = self.graphs[B]
        values = [token_ids, starts, slots, [s + 1 for s in starts]]
        inputs.copy_(torch.tensor(values, dtype=torch.long), non_blocking=True)
        graph.replay()
        return logits
