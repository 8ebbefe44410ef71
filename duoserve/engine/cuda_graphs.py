"""CUDA-graph decode: capture a decode step per batch size, then replay it.

- `GraphedDecode`: one graph for the whole step, for backends that need no host sync inside
  it (full-gpu's grouped GEMM).
- `SegmentedDecode`: for offloading backends, which must stop at each MoE layer's routing
  sync to issue copies. The step is captured as L + 1 graphs (MoELM.segments), each running
  from one routing sync to the next (combine of layer l-1, attention, router, the routing
  hook and the predictor of layer l); between two replays the host syncs the routing and
  runs the expert backend eagerly, writing the expert rows into a buffer the next graph
  reads. This leaves the host a few launches per layer instead of ~100 (decode of an
  offloaded model is host-bound otherwise).

Inputs live in static buffers; attention runs over a fixed number of cache rows
(`static_kv_len`, masked beyond each sequence's length), so one capture serves every step of
that batch size. Capture runs with `StepContext.capturing` set: backends skip host-side
bookkeeping then, and `begin_step(ctx)` (when a backend has it) is called once per replayed
step instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from duoserve.engine.context import StepContext, step_context
from duoserve.engine.kv_cache import KVCache
from duoserve.layers.moe import MoEBlock, MoEPoint
from duoserve.models.moe_lm import MoELM

_WARMUP_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def warmup_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream per device that captures warm up on. cuBLAS keeps a workspace
    (32 MiB on an H100) for every stream it ever ran on, for the life of the process: a new
    stream per capture leaked one per policy switch, against the memory budget."""
    device = torch.device(device)
    if device not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[device] = torch.cuda.Stream(device)
    return _WARMUP_STREAMS[device]


def _graph_safe_hooks(model: MoELM) -> bool:
    return all(
        b.routing_hook is None or getattr(b.routing_hook, "graph_safe", False)
        for b in model.moe_blocks()
    )


def static_inputs(kv: KVCache, batch: int, device: torch.device) -> torch.Tensor:
    """[4, B] int64 rows: token ids, positions, slots, sequence lengths; for warm-up and
    capture the slots are the scratch slot (their K/V writes stay out of live sequences)."""
    inputs = torch.zeros(4, batch, dtype=torch.long, device=device)
    inputs[2] = kv.scratch_slot
    inputs[3] = 1
    return inputs


def static_context(inputs: torch.Tensor, kv: KVCache) -> StepContext:
    B = inputs.shape[1]
    return StepContext(
        phase="decode",
        slot_ids=[kv.scratch_slot] * B,
        start_positions=[0] * B,
        num_new_tokens=[1] * B,
        positions_dev=inputs[1],
        token_slots_dev=inputs[2],
        seq_lens_dev=inputs[3],
        slot_ids_dev=inputs[2],
        static_kv_len=kv.max_len,
    )


def load_inputs(inputs: torch.Tensor, token_ids, slots, starts) -> None:
    values = [token_ids, starts, slots, [s + 1 for s in starts]]
    inputs.copy_(torch.tensor(values, dtype=torch.long), non_blocking=True)


class GraphedDecode:
    """Lazily captured decode graphs, one per batch size."""

    def __init__(self, model: MoELM, kv: KVCache, device: torch.device) -> None:
        self.model, self.kv, self.device = model, kv, device
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.pool = None

    @staticmethod
    def supported(model: MoELM, device: torch.device) -> bool:
        blocks = model.moe_blocks()
        return (
            device.type == "cuda"
            and all(not b.backend.needs_host_plan for b in blocks)
            and _graph_safe_hooks(model)
        )

    def _capture(self, B: int) -> None:
        inputs = static_inputs(self.kv, B, self.device)
        ctx = static_context(inputs, self.kv)
        side = warmup_stream(self.device)
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
        load_inputs(inputs, token_ids, slots, starts)
        graph.replay()
        return logits


@dataclass
class _Segments:
    """The captured step of one batch size."""

    inputs: torch.Tensor  # [4, B] static inputs
    ctx: StepContext  # the static context the graphs were captured with
    graphs: list[torch.cuda.CUDAGraph]  # L + 1
    points: list[tuple[MoEBlock, MoEPoint]]  # the MoE layer each graph but the last ends at
    logits: torch.Tensor  # [B, V] written by the last graph
    version: tuple  # the backends' graph_version() at capture


class SegmentedDecode:
    """Lazily captured segmented decode graphs (module docstring), one set per batch size."""

    def __init__(self, model: MoELM, kv: KVCache, device: torch.device) -> None:
        self.model, self.kv, self.device = model, kv, device
        self.steps: dict[int, _Segments] = {}
        self.pool = None
        # the blocks' backends, once each (a new policy builds a new SegmentedDecode)
        self.backends = list({id(b.backend): b.backend for b in model.moe_blocks()}.values())

    @staticmethod
    def supported(model: MoELM, device: torch.device) -> bool:
        blocks = model.moe_blocks()
        return (
            device.type == "cuda"
            and bool(blocks)
            and all(b.backend is not None and b.backend.needs_host_plan for b in blocks)
            and _graph_safe_hooks(model)
        )

    def _run_segments(self, inputs: torch.Tensor, graphs: list | None):
        """Drive model.segments without expert compute (warm-up, capture); with `graphs`,
        each segment is captured into a new graph appended there."""
        gen = self.model.segments(inputs[0], inputs[1], self.kv)
        points = []
        while True:
            if graphs is None:
                block, point = next(gen)
            else:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    block, point = next(gen)
                self.pool = graph.pool()
                graphs.append(graph)
            if block is None:
                return points, point  # point: the logits
            points.append((block, point))

    def _capture(self, B: int) -> _Segments:
        inputs = static_inputs(self.kv, B, self.device)
        ctx = static_context(inputs, self.kv)
        ctx.capturing = True
        side = warmup_stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), step_context(ctx):  # warm up outside the graphs
            self._run_segments(inputs, None)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graphs: list[torch.cuda.CUDAGraph] = []
        with step_context(ctx):
            points, logits = self._run_segments(inputs, graphs)
        ctx.capturing = False
        return _Segments(inputs, ctx, graphs, points, logits, self._version())

    def _version(self) -> tuple:
        return tuple(getattr(b, "graph_version", lambda: 0)() for b in self.backends)

    def run(self, token_ids: list[int], slots: list[int], starts: list[int]) -> torch.Tensor:
        """Logits [B, V] of one decode step (token i at position starts[i] of slot slots[i]);
        the step's stats (routing syncs) in `last_stats`."""
        B = len(token_ids)
        seg = self.steps.get(B)
        if seg is None or seg.version != self._version():
            self.steps.pop(B, None)
            seg = self.steps[B] = self._capture(B)
        load_inputs(seg.inputs, token_ids, slots, starts)
        ctx = seg.ctx
        ctx.slot_ids, ctx.start_positions, ctx.stats = list(slots), list(starts), {}
        with step_context(ctx):
            for backend in self.backends:  # host-side start of a step
                begin = getattr(backend, "begin_step", None)
                if begin is not None:
                    begin(ctx)
            done = None  # the MoE layer whose device stage the graph just replayed ran
            for graph, (block, point) in zip(seg.graphs, seg.points):
                graph.replay()
                if done is not None:
                    done[0].after_experts(done[1])
                block.run_experts(point, point.plan.fresh())
                done = (block, point)
            seg.graphs[-1].replay()
            if done is not None:
                done[0].after_experts(done[1])
        self.last_stats = ctx.stats
        return seg.logits
