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
probabilities for the step's tokens, since the random model's routers say nothing.
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
        # [L, N, D, M] int64 (-1: none) and float32, or None
        self.lookahead_ids = _to(data.lookahead_ids, device)
        self.lookahead_probs_table = _to(data.lookahead_probs, device)
        self.lookahead_distances: tuple[int, ...] = data.distances
        self.base_of_slot = torch.zeros(0, dtype=torch.long, device=device)

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

    def __call__(self, layer_id: int, x: torch.Tensor, topk_ids, topk_weights):
        ids = self.expert_ids[self.layer_index[layer_id], self._rows()]  # [T, K]
        weights = torch.full_like(topk_weights, 1.0 / self.top_k)
        return ids, weights

    def lookahead_probs(self, layer_id: int, d: int, x: torch.Tensor) -> torch.Tensor | None:
        """[T, E] float32: the recorded probabilities of router (MoE layer of `layer_id`)+d on
        that layer's MoE input, for the step's tokens (the rows __call__ replays); 0 outside
        the recorded top-M and where layer+d is past the last layer. None when the trace
        holds no lookahead for distance d (see `lookahead_distances`). x [T, H] gives T and
        the device only; no host sync (graph-safe)."""
        if d not in self.lookahead_distances:
            return None
        j = self.lookahead_distances.index(d)
        layer = self.layer_index[layer_id]
        rows = self._rows()
        assert rows.shape[0] == x.shape[0], "x must hold the step's tokens"
        ids = self.lookahead_ids[layer, rows, j]  # [T, M]
        probs = self.lookahead_probs_table[layer, rows, j]
        E = self.num_experts
        out = torch.zeros(ids.shape[0], E + 1, dtype=torch.float32, device=ids.device)
        out.scatter_(1, torch.where(ids >= 0, ids, E), probs)  # none ids land in column E
        return out[:, :E].to(x.device)


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)
