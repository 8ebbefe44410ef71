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

In torch a call is: topk of the lookahead probabilities, index and weight concatenation,
one F.embedding_bag, relu, one addmm, topk: about fifteen kernels. On CUDA (BACKEND "auto",
triton importable) `predict` is one Triton kernel instead (predictor/_triton_predict.py),
plus the topk of dense lookahead probabilities when those are given. Both: no host sync,
fixed shapes for a fixed batch size (CUDA-graph capturable).

Lookahead inputs come dense (probabilities [B, E]: the top M are taken, zeros included) or
sparse (`lookahead_top` = ids [B, M'] and probs [B, M'], most likely first, the first M
used; an id < 0 is absent and contributes nothing, as in training's features). The two
agree whenever the dense row has M positive entries in the sparse order; where fewer are
positive, the dense path still takes M (zero-probability experts picked by torch.topk's
tie order) and adds their rank biases, which the sparse path (and training) do not.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from duoserve.predictor.features import LOG_FLOOR
from duoserve.predictor.model import Predictor

LOG_SCALE = 1.0 / math.log(1.0 / LOG_FLOOR)
# "auto": predict() runs the Triton kernel for CUDA tensors when triton imports, torch
# otherwise; "torch": always torch (A/B); "triton": always the kernel (CPU tensors need
# TRITON_INTERPRET=1, tests)
BACKEND = "auto"


@dataclass(frozen=True)
class _CallPlan:
    """What one call shape (layer, d, batch size, with/without prev, lookahead width) needs
    besides its inputs."""

    num_slots: int  # path layers read from routed_ids
    lookahead: bool
    width: int  # lookahead columns used (M, or fewer when a sparse input has fewer)
    prev: bool
    base_row: int  # first table row of the (layer, d) pair
    offsets: torch.Tensor  # [J] table row of each input column
    bag_starts: torch.Tensor  # [B] start of each row's bag in the flat inputs
    ones: torch.Tensor  # [B, >= any block width] unit weights
    zeros: torch.Tensor  # [B, 1] index column of the bias row
    rank: torch.Tensor | None  # [B, width] rank-bias weights of the lookahead positions
    rank_row: torch.Tensor | None  # [M] the pair's rank biases (the kernel's form)
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
        self._plans: dict[tuple[int, int, int, bool, int], _CallPlan] = {}

    @property
    def num_bytes(self) -> int:
        """Device memory of the tables."""
        extra = sum(t.numel() * t.element_size() for t in (self.w2, self.ranks) if t is not None)
        return self.table.numel() * self.table.element_size() + extra

    def _plan(self, layer: int, d: int, batch: int, prev: bool, width: int) -> _CallPlan:
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
        offsets += [base + (W + i) * E for i in range(3) for _ in range(width)] if la else []
        offsets += [base + (W + 4) * E] * width if rank else []  # in the order scores() builds
        offsets += [base + (W + 3) * E] * K if prev else []
        offsets.append(base + self.rows_per_pair - 1)  # the bias row (its index column is 0)
        J = len(offsets)
        dev, long = self.device, torch.long
        return _CallPlan(
            num_slots=num_slots,
            lookahead=la,
            width=width,
            prev=prev,
            base_row=base,
            offsets=torch.tensor(offsets, dtype=long, device=dev),
            bag_starts=torch.arange(0, batch * J, J, dtype=long, device=dev),
            ones=torch.ones(batch, max(num_slots * K, M, K, 1), dtype=self.dtype, device=dev),
            zeros=torch.zeros(batch, 1, dtype=long, device=dev),
            rank=self.ranks[pair, :width].expand(batch, width).contiguous() if rank else None,
            rank_row=self.ranks[pair] if rank else None,
            w2=None if self.w2 is None else self.w2[pair],
        )

    def _plan_of(
        self, layer: int, d: int, batch: int, prev_ids: torch.Tensor | None, lookahead_top
    ) -> _CallPlan:
        """The cached plan of a call (its width: M, or a sparse input's columns if fewer)."""
        M = self.config.lookahead_width
        width = M if lookahead_top is None else min(lookahead_top[0].shape[1], M)
        assert width > 0, "a sparse lookahead needs at least one column"
        key = (layer, d, batch, prev_ids is not None, width)
        return self._plans.get(key) or self._plans.setdefault(key, self._plan(*key))

    def scores(
        self,
        layer: int,
        routed_ids: torch.Tensor,
        lookahead_probs: torch.Tensor | None = None,
        d: int = 1,
        prev_ids: torch.Tensor | None = None,
        *,
        lookahead_top: tuple[torch.Tensor, torch.Tensor] | None = None,
        prev_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, E] of layer `layer`+d's experts in torch; arguments as Predictor.scores,
        plus the sparse forms: `lookahead_top` (ids [B, M'], probs [B, M'], module docstring)
        instead of lookahead_probs, and `prev_rows` [B]: prev_ids is then a table [S, K] and
        row b's previous experts are prev_ids[prev_rows[b]]."""
        # B rows, K top-k, M lookahead width, E experts, H hidden, J inputs per row
        B = routed_ids.shape[0]
        if prev_rows is not None and prev_ids is not None:
            prev_ids = prev_ids[prev_rows]  # [B, K]
        plan = self._plan_of(layer, d, B, prev_ids, lookahead_top)
        n, ones = plan.num_slots, plan.ones
        assert routed_ids.shape[1] >= n, f"need the experts of the last {n} layers"
        index = [routed_ids[:, routed_ids.shape[1] - n :].reshape(B, n * routed_ids.shape[2])]
        weight = [ones[:, : index[0].shape[1]]]
        if plan.lookahead:
            la_index, la_weight = self._lookahead_columns(plan, lookahead_probs, lookahead_top)
            index += la_index
            weight += la_weight
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

    def _lookahead_columns(self, plan: _CallPlan, probs, top) -> tuple[list, list]:
        """Index and weight columns of the lookahead rows (p, 1, log p, rank), each [B, m]."""
        if top is None:  # dense: the top M, zero probabilities included
            assert probs is not None, "this predictor needs gate-lookahead probs"
            dense = probs.topk(plan.width, dim=-1)  # [B, M]
            ids, p = dense.indices, dense.values.to(self.dtype)
            one = plan.ones[:, : plan.width]
        else:  # sparse: negative ids contribute nothing
            ids, p = top[0][:, : plan.width], top[1][:, : plan.width]
            valid = ids >= 0
            one = valid.to(self.dtype)
            ids, p = torch.where(valid, ids, 0).long(), p.to(self.dtype) * one
        log_p = p.clamp_min(LOG_FLOOR).log()
        index, weight = [ids] * 3, [p, one, log_p if top is None else log_p * one]
        if plan.rank is not None:
            index.append(ids)
            weight.append(plan.rank if top is None else plan.rank * one)
        return index, weight

    def predict(
        self,
        layer: int,
        routed_ids: torch.Tensor,
        lookahead_probs: torch.Tensor | None = None,
        d: int = 1,
        prev_ids: torch.Tensor | None = None,
        num: int | None = None,
        *,
        lookahead_top: tuple[torch.Tensor, torch.Tensor] | None = None,
        prev_rows: torch.Tensor | None = None,
        logits_out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Expert ids [B, num] of layer `layer`+d, most likely first (num defaults to K);
        arguments as scores(). `logits_out` [B, E] float32, when given, receives the logits.
        One Triton kernel on CUDA (BACKEND), else scores() and topk."""
        num = num or self.config.top_k
        kernels = _kernels_for(routed_ids.device)
        if kernels is not None:
            return self._predict_triton(
                kernels, layer, routed_ids, lookahead_probs, d, prev_ids, num,
                lookahead_top, prev_rows, logits_out,
            )  # fmt: skip
        logits = self.scores(
            layer, routed_ids, lookahead_probs, d, prev_ids,
            lookahead_top=lookahead_top, prev_rows=prev_rows,
        )  # fmt: skip
        if logits_out is not None:
            logits_out.copy_(logits)
        return logits.topk(num, dim=-1).indices

    def _predict_triton(
        self, kernels, layer, routed_ids, probs, d, prev_ids, num, top, prev_rows, logits_out
    ) -> torch.Tensor:
        """predict() as one launch of _triton_predict.fused_predict (plus the topk of dense
        lookahead probabilities)."""
        c = self.config
        B = routed_ids.shape[0]
        plan = self._plan_of(layer, d, B, prev_ids, top)
        n = plan.num_slots
        assert routed_ids.shape[1] >= n, f"need the experts of the last {n} layers"
        lookahead = None
        if plan.lookahead and top is None:
            assert probs is not None, "this predictor needs gate-lookahead probs"
            dense = probs.topk(plan.width, dim=-1)  # [B, M]
            lookahead = (dense.indices, dense.values)
        elif plan.lookahead:
            lookahead = (top[0][:, : plan.width], top[1][:, : plan.width])
        return kernels.fused_predict(
            self.table,
            plan.base_row,
            plan.base_row + self.rows_per_pair - 1,
            (c.num_experts, c.hidden, c.path_layers),
            routed_ids[:, routed_ids.shape[1] - n :] if n else None,
            lookahead,
            plan.rank_row,
            prev_ids if plan.prev else None,
            prev_rows if plan.prev else None,
            plan.w2,
            num,
            B,
            LOG_FLOOR,
            logits_out,
        )


@functools.cache
def _kernel_module() -> ModuleType | None:
    try:
        from duoserve.predictor import _triton_predict
    except ImportError:
        return None
    return _triton_predict


def _kernels_for(device: torch.device) -> ModuleType | None:
    """The kernel module when predict() should use it on `device` (see BACKEND)."""
    assert BACKEND in ("auto", "torch", "triton"), f"unknown predictor backend {BACKEND!r}"
    if BACKEND == "torch" or (BACKEND == "auto" and device.type != "cuda"):
        return None
    kernels = _kernel_module()
    assert kernels is not None or BACKEND == "auto", "BACKEND = 'triton' needs triton"
    return kernels


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
