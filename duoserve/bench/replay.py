"""Trace replay: force a model's routing from a recorded trace of a trained model.

A full-size synthetic model has random weights, so its own routing is unrealistic. For
benchmarks, each MoE layer's top-k is replaced by the experts that the trained model of the
same topology (layers x experts x top-k) chose for a real held-out token: the token at
position p of the sequence in KV slot s uses trace row (base[s] + p) mod N. Routing weights
become 1/K (the trace stores ids only). Every result produced this way must say so:
`describe()`.

Two file formats (duoserve/predictor/replay_file.py): the old one (expert_ids [L, N, K] of
teacher-forced windows: base[s] = s * window) and the replay format (whole sequences with
their starts and the recorded gate-lookahead signal: base[s] = the start of sequence
floor(s * S / slots), slots spread evenly over the S sequences). With the replay format,
`lookahead_probs(layer_id, d, x)` gives the runtime the trained model's gate-lookahead
probabilities for the step's tokens, since the random model's routers say nothing, and
`lookahead_topk(layer_id, d, x)` the recorded top-M itself (ids, probs): one gather, no
dense [T, E] row (the learned predictor's sparse input).
"""

from __future__ import annotations

from pathlib import Path

import torch

from duoserve.engine.context import get_step_context
from duoserve.predictor.replay_file import read_replay


class TraceReplay:
    """Routing hook that replays `expert_ids [L, N, K]` (and lookahead) from a trace file."""

    graph_safe = True  # device-side indexing only: may be captured in a decode graph

    def __init__(self, path: str | Path, device: torch.device, window: int = 512) -> None:
        data = read_replay(path)
        self.path = Path(path)
        self.num_layers, self.num_tokens, self.top_k = data.expert_ids.shape
        self.expert_ids = data.expert_ids.to(device)  # [L, N, K] int64
        self.num_experts = data.num_experts or int(data.expert_ids.max()) + 1
        self.window = window
        self.seq_start = None if data.seq_start is None else data.seq_start.to(device)
        # [L, N, D, 2M] int32: the recorded top-M ids (-1: none), then their float32
        # probabilities bit for bit, so one gather fetches both; or None
        self.lookahead_packed = None
        if data.lookahead_ids is not None:
            probs_bits = data.lookahead_probs.float().view(torch.int32)
            packed = torch.cat([data.lookahead_ids.to(torch.int32), probs_bits], dim=-1)
            self.lookahead_packed = packed.to(device)
        self.lookahead_distances: tuple[int, ...] = data.distances
        self.base_of_slot = torch.zeros(0, dtype=torch.long, device=device)
        self._routed_rows: tuple | None = None  # (ctx, layer_id, rows) of the last __call__

    def describe(self) -> str:
        ahead = (
            f", gate lookahead d={','.join(map(str, self.lookahead_distances))} recorded"
            if self.lookahead_distances
            else ""
        )
        return (
            f"routing replayed from {self.path.name} ({self.num_layers} layers x top-"
            f"{self.top_k}, {self.num_tokens} tokens), weights 1/K{ahead}"
        )

    def slot_bases(self, num_slots: int) -> list[int]:
        """Trace row where each KV slot's position 0 maps (see the module docstring)."""
        if self.seq_start is None:
            return [(s * self.window) % self.num_tokens for s in range(num_slots)]
        S = self.seq_start.numel()
        return [int(self.seq_start[(s * S) // num_slots]) for s in range(num_slots)]

    def attach(self, engine) -> None:
        """Install on every MoE block of `engine`, checking the topology matches."""
        cfg = engine.model_config
        if (cfg.num_moe_layers, cfg.num_experts_per_tok) != (self.num_layers, self.top_k):
            raise ValueError(
                f"{self.path}: trace topology {self.num_layers} layers x top-{self.top_k} "
                f"does not match the model's {cfg.num_moe_layers} x top-{cfg.num_experts_per_tok}"
            )
        if self.num_experts > cfg.num_experts or (
            self.seq_start is not None and self.num_experts != cfg.num_experts
        ):
            raise ValueError(
                f"{self.path}: trace of {self.num_experts} experts, model has {cfg.num_experts}"
            )
        self.num_experts = cfg.num_experts  # lookahead_probs rows are [E] of the model
        bases = self.slot_bases(engine.kv.num_slots + 1)
        self.base_of_slot = torch.tensor(bases, dtype=torch.long, device=self.expert_ids.device)
        self.layer_index = {layer_id: i for i, layer_id in enumerate(cfg.moe_layer_ids)}
        for block in engine.model.moe_blocks():
            block.routing_hook = self
        engine.runner.enable_cuda_graphs(not engine.config.enforce_eager)  # recapture with it

    def _rows(self) -> torch.Tensor:
        """[T] trace rows of the current step's tokens (device tensor, no sync)."""
        ctx = get_step_context()
        return (self.base_of_slot[ctx.token_slots_dev] + ctx.positions_dev) % self.num_tokens

    def _rows_at(self, layer_id: int) -> torch.Tensor:
        """_rows(), reusing those __call__ computed at this layer of this pass."""
        # NOTE: only __call__ stores them, and each pass (CUDA-graph warm-up and capture
        # included) routes a layer before predicting from it, in the same graph segment: a
        # lookahead never reads rows from another pass or another capture.
        memo = self._routed_rows
        if memo is not None and memo[0] is get_step_context() and memo[1] == layer_id:
            return memo[2]
        return self._rows()

    def __call__(self, layer_id: int, x: torch.Tensor, topk_ids, topk_weights):
        rows = self._rows()
        self._routed_rows = (get_step_context(), layer_id, rows)
        ids = self.expert_ids[self.layer_index[layer_id], rows]  # [T, K]
        weights = torch.full_like(topk_weights, 1.0 / self.top_k)
        return ids, weights

    def _recorded(self, layer_id: int, d: int, x: torch.Tensor) -> torch.Tensor | None:
        """[T, 2M] int32 packed lookahead rows of the step's tokens, or None (no distance d)."""
        if d not in self.lookahead_distances:
            return None
        j = self.lookahead_distances.index(d)
        rows = self._rows_at(layer_id)
        assert rows.shape[0] == x.shape[0], "x must hold the step's tokens"
        return self.lookahead_packed[self.layer_index[layer_id], rows, j]  # [T, 2M]

    def lookahead_topk(
        self, layer_id: int, d: int, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The recorded top-M of router (MoE layer of `layer_id`)+d on that layer's MoE input,
        for the step's tokens: ids [T, M] int32 (most likely first, -1: none, e.g. past the
        last layer) and probs [T, M] float32 (0 where none), views of one gather. None when
        the trace holds no lookahead for distance d. x [T, H] gives T only; graph-safe."""
        packed = self._recorded(layer_id, d, x)
        if packed is None:
            return None
        M = packed.shape[1] // 2
        return packed[:, :M], packed[:, M:].view(torch.float32)

    def lookahead_probs(self, layer_id: int, d: int, x: torch.Tensor) -> torch.Tensor | None:
        """[T, E] float32: the recorded probabilities of router (MoE layer of `layer_id`)+d on
        that layer's MoE input, for the step's tokens (the rows __call__ replays); 0 outside
        the recorded top-M and where layer+d is past the last layer. None when the trace
        holds no lookahead for distance d (see `lookahead_distances`). x [T, H] gives T and
        the device only; no host sync (graph-safe)."""
        top = self.lookahead_topk(layer_id, d, x)
        if top is None:
            return None
        ids, probs = top  # [T, M]
        E = self.num_experts
        out = torch.zeros(ids.shape[0], E + 1, dtype=torch.float32, device=ids.device)
        out.scatter_(1, torch.where(ids >= 0, ids, E).long(), probs)  # none ids: column E
        return out[:, :E].to(x.device)
