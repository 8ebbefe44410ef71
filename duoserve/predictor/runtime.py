"""The predictor's decode-time form: one embedding bag and one small GEMM per call.

Every input of the Predictor is a sum of one-hot rows with a weight (a routed expert at
path slot w, a lookahead expert with its probability, ...), so its first layer and its
direct terms are rows of one table. `FusedPredictor` folds, per (layer l, distance d):

    path rows   [W*E]  first-layer rows of each path slot; slot 0 also carries the affinity
                       block (affinity = path0 @ A / K is linear in slot 0's one-hots)
    lookahead   [3E]   rows weighted by p, by 1 and by log(max(p, floor)) (the log feature
                       1 + log(max(p, floor)) / log(1 / floor) is their sum)
    prev        [E]    previous token's experts at layer l+d
    rank        [E]    identity rows into the logits, weighted by the rank bias of each
                       lookahead position (only with the rank term)
    bias        [1]    b1 and b2

and a call is: topk of the lookahead probabilities, index and weight concatenation, one
F.embedding_bag, relu, one addmm, topk: about ten kernels, no host sync, fixed shapes for
a fixed batch size (CUDA-graph capturable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from duoserve.predictor.features import LOG_FLOOR
from duoserve.predictor.model import Predictor

LOG_SCALE = 1.0 / math.log(1.0 / LOG_FLOOR)


@dataclass(frozen=True)
class _CallPlan:
    """What one call shape (layer, d, batch size, with/without prev) needs besides inputs."""

    num_slots: int  # path layers read from routed_ids
    lookahead: bool
    prev: bool
    offsets: torch.Tensor  # [J] table row of each input column
    bag_starts: torch.Tensor  # [B] start of each row's bag in the flat inputs
    ones: torch.Tensor  # [B, >= any block width] unit weights
    zeros: torch.Tensor  # [B, 1] index column of the bias row
    rank: torch.Tensor | None  # [B, M] rank-bias weights of the lookahead positions
    w2: torch.Tensor | None  # [H, E] second layer of this (layer, d)


class FusedPredictor:
    """Fused tables of a trained Predictor on one device (see module docstring).

    Tables: [pairs * R, H + E] (R = (W + 4) * E + 1 rows per (l, d) pair, (W + 5) * E + 1
    with the rank term), plus W2 [pairs, H, E]; with hidden = 0 the table is [pairs * R, E]
    and holds the logits directly.
    """

    def __init__(
        self,
        predictor: Predictor,
        distances: tuple[int, ...] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        c = self.config = predictor.config
        self.distances = tuple(distances or c.distances)
        assert all(d in c.distances for d in self.distances), f"trained for {c.distances}"
        self.rows_per_pair = (c.path_layers + 4 + c.uses_rank) * c.num_experts + 1
        self.pair_of: dict[tuple[int, int], int] = {}
        tables, w2, ranks = [], [], []
        with torch.no_grad():
            for d in self.distances:
                for layer in range(c.num_layers - d):
                    self.pair_of[(layer, d)] = len(tables)
                    tables.append(_pair_table(predictor, layer, d))
                    if c.hidden:
                        w2.append(predictor.params[f"d{d}_w2"][layer])
                    if c.uses_rank:
                        ranks.append(predictor.params[f"d{d}_rank"][layer])
        self.table = torch.cat(tables).detach().to(device, dtype).contiguous()
        self.w2 = torch.stack(w2).detach().to(device, dtype) if w2 else None
        self.ranks = torch.stack(ranks).detach().to(device, dtype) if ranks else None  # [pairs, M]
        self.device, self.dtype = torch.device(device), dtype
        self._plans: dict[tuple[int, int, int, bool], _CallPlan] = {}

    @property
    def num_bytes(self) -> int:
        """Device memory of the tables."""
        extra = sum(t.numel() * t.element_size() for t in (self.w2, self.ranks) if t is not None)
        return self.table.numel() * self.table.element_size() + extra

    def _plan(self, layer: int, d: int, batch: int, prev: bool) -> _CallPlan:
        """Constant index offsets and weights of one call shape, made once."""
        c = self.config
        E, K, M, W = c.num_experts, c.top_k, c.lookahead_width, c.path_layers
        assert (layer, d) in self.pair_of, f"no table for layer {layer}, d={d}"
        num_slots = min(W, layer + 1) if "path" in c.features else 0
        if "affinity" in c.features:
            num_slots = max(num_slots, 1)  # affinity rides on slot 0's rows
        la, prev = "lookahead" in c.features, prev and "prev" in c.features
        pair = self.pair_of[(layer, d)]
        base = pair * self.rows_per_pair
        offsets = [base + (num_slots - 1 - j) * E for j in range(num_slots) for _ in range(K)]
        rank = la and self.ranks is not None
        offsets += [base + (W + i) * E for i in range(3) for _ in range(M)] if la else []
        offsets += [base + (W + 4) * E] * M if rank else []  # in the order scores() builds
        offsets += [base + (W + 3) * E] * K if prev else []
        offsets.append(base + self.rows_per_pair - 1)  # the bias row (its index column is 0)
        J = len(offsets)
        dev, long = self.device, torch.long
        return _CallPlan(
            num_slots=num_slots,
            lookahead=la,
            prev=prev,
            offsets=torch.tensor(offsets, dtype=long, device=dev),
            bag_starts=torch.arange(0, batch * J, J, dtype=long, device=dev),
            ones=torch.ones(batch, max(num_slots * K, M, K, 1), dtype=self.dtype, device=dev),
            zeros=torch.zeros(batch, 1, dtype=long, device=dev),
            rank=self.ranks[pair].expand(batch, M).contiguous() if rank else None,
            w2=None if self.w2 is None else self.w2[pair],
        )

    def scores(
        self,
        layer: int,
        routed_ids: torch.Tensor,
        lookahead_probs: torch.Tensor | None = None,
        d: int = 1,
        prev_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, E] of layer `layer`+d's experts; arguments as Predictor.scores."""
        # B rows, K top-k, M lookahead width, E experts, H hidden, J inputs per row
        B = routed_ids.shape[0]
        key = (layer, d, B, prev_ids is not None)
        plan = self._plans.get(key) or self._plans.setdefault(key, self._plan(*key))
        n, ones = plan.num_slots, plan.ones
        assert routed_ids.shape[1] >= n, f"need the experts of the last {n} layers"
        index = [routed_ids[:, routed_ids.shape[1] - n :].reshape(B, -1)]
        weight = [ones[:, : index[0].shape[1]]]
        if plan.lookahead:
            assert lookahead_probs is not None, "this predictor needs gate-lookahead probs"
            top = lookahead_probs.topk(self.config.lookahead_width, dim=-1)  # [B, M]
            p = top.values if top.values.dtype == self.dtype else top.values.to(self.dtype)
            index += [top.indices] * 3
            weight += [p, ones[:, : p.shape[1]], p.clamp_min(LOG_FLOOR).log()]
            if plan.rank is not None:
                index.append(top.indices)
                weight.append(plan.rank)
        if plan.prev:
            index.append(prev_ids)
            weight.append(ones[:, : prev_ids.shape[1]])
        index.append(plan.zeros)
        weight.append(ones[:, :1])
        rows = torch.cat(index, dim=1) + plan.offsets  # [B, J]
        weights = torch.cat(weight, dim=1).view(-1)
        out = F.embedding_bag(
            rows.view(-1), self.table, plan.bag_starts, mode="sum", per_sample_weights=weights
        )
        if plan.w2 is None:
            return out  # [B, E]
        H = self.config.hidden
        return torch.addmm(out[:, H:], F.relu(out[:, :H]), plan.w2)

    def predict(
        self,
        layer: int,
        routed_ids: torch.Tensor,
        lookahead_probs: torch.Tensor | None = None,
        d: int = 1,
        prev_ids: torch.Tensor | None = None,
        num: int | None = None,
    ) -> torch.Tensor:
        """Expert ids [B, num] of layer `layer`+d, most likely first (num defaults to K)."""
        logits = self.scores(layer, routed_ids, lookahead_probs, d, prev_ids)
        return logits.topk(num or self.config.top_k, dim=-1).indices


def _pair_table(predictor: Predictor, layer: int, d: int) -> torch.Tensor:
    """The fused rows [R, H + E] (or [R, E] when linear) of one (layer, d) pair."""
    c, p = predictor.config, predictor.params
    E, W, H = c.num_experts, c.path_layers, c.hidden
    w1 = p[f"d{d}_w1"][layer].unflatten(0, (len(c.blocks), E))  # [blocks, E, width]
    diag = p[f"d{d}_diag"][layer]  # [direct blocks, E]
    block = {name: w1[i] for i, name in enumerate(c.blocks)}
    direct = {name: diag[i] for i, name in enumerate(c.direct_blocks)}
    width, dev = H or E, w1.device
    num_rows = (W + 4 + c.uses_rank) * E + 1
    hidden = torch.zeros(num_rows, width, device=dev)
    out = torch.zeros(num_rows, E, device=dev)  # direct terms into the logits
    for w in range(W):
        if f"path{w}" in block:
            hidden[w * E : (w + 1) * E] = block[f"path{w}"]
    if "affinity" in block:
        table = getattr(predictor, f"affinity_d{d}")[layer] / c.top_k  # [E, E]
        hidden[:E] += table @ block["affinity"]
        out[:E] += table * direct["affinity"]
    eye = torch.eye(E, device=dev)
    if "lookahead" in block:
        rows = slice(W * E, (W + 1) * E), slice((W + 1) * E, (W + 2) * E)
        hidden[rows[0]], out[rows[0]] = block["lookahead"], eye * direct["lookahead"]
        hidden[rows[1]], out[rows[1]] = block["lookahead_log"], eye * direct["lookahead_log"]
        logs = slice((W + 2) * E, (W + 3) * E)
        hidden[logs], out[logs] = hidden[rows[1]] * LOG_SCALE, out[rows[1]] * LOG_SCALE
    if "prev" in block:
        rows_prev = slice((W + 3) * E, (W + 4) * E)
        hidden[rows_prev], out[rows_prev] = block["prev"], eye * direct["prev"]
    if c.uses_rank:  # weighted by the rank bias of each lookahead position at call time
        out[(W + 4) * E : (W + 5) * E] = eye
    hidden[-1] = p[f"d{d}_b1"][layer]
    if H:
        out[-1] = p[f"d{d}_b2"][layer]
        return torch.cat([hidden, out], dim=1)
    return hidden + out
