"""Expert predictors to compare, behind one interface, chosen by name (SCORERS).

Each scorer is fitted on training traces, then scores layer l+d's experts for held-out
tokens after layer l routed: `scores(data, rows, d)` returns [n, L-d, E] for token rows
`rows` and every source layer l < L-d (higher = more likely). Ties are broken by
popularity (a tiny added term), so a ranking is always defined. `to(device)` after fit()
moves a scorer's tables; it then scores TokenTensors on that device.

- popularity:     the layer's most used experts in training (same for every token)
- affinity:       sum over layer l's experts e of P(f at l+d | e at l), counted in training
- prev-token:     the same sequence's previous token's experts at layer l+d
- gate-lookahead: router l+d applied to layer l's MoE input (the hidden-state signal)
- trace-match:    request-level matching as MoE-Infinity describes it: the request's expert
                  activation matrix so far (counts [L, E] over its earlier tokens plus this
                  token's layers <= l) is matched by cosine similarity against the stored
                  matrices of training requests; the best match's row l+d is the prediction
- paper / ours:   the learned Predictor (model.py) with the paper's features / all features
"""

from __future__ import annotations

from typing import Any

import torch

from duoserve.predictor.features import affinity, dense_probs, multi_hot, popularity
from duoserve.predictor.model import FEATURE_SETS, Predictor, PredictorConfig
from duoserve.predictor.trace import RoutingTrace
from duoserve.predictor.train import TokenTensors, train_predictor

TIE_BREAK = 1e-4  # weight of popularity added to break ties


class Scorer:
    """Base: fit() learns popularity; subclasses add their signal in scores()."""

    name = "base"
    needs_lookahead = False

    device = torch.device("cpu")

    def fit(self, train: RoutingTrace) -> None:
        self.popularity = popularity(train)  # [L, E]
        self.top_k = train.top_k

    def to(self, device: torch.device | str) -> Scorer:
        """Move every tensor attribute (and a Predictor) to `device`; returns self."""
        self.device = torch.device(device)
        for key, value in vars(self).items():
            if isinstance(value, (torch.Tensor, Predictor)):
                setattr(self, key, value.to(self.device))
            elif isinstance(value, dict):
                moved = {
                    k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                    for k, v in value.items()
                }
                setattr(self, key, moved)
        return self

    def prepare(self, data: TokenTensors) -> None:
        """Precompute whatever depends on whole held-out sequences (default: nothing)."""

    def prior(self, n: int, d: int) -> torch.Tensor:
        """Popularity of the target layers, [n, L-d, E]."""
        return self.popularity[d:].expand(n, -1, -1)

    def scores(self, data: TokenTensors, rows: slice, d: int) -> torch.Tensor:
        raise NotImplementedError


class PopularityScorer(Scorer):
    """Per-layer popularity only."""

    name = "popularity"

    def scores(self, data: TokenTensors, rows: slice, d: int) -> torch.Tensor:
        return self.prior(data.routed_ids[rows].shape[0], d).clone()


class AffinityScorer(Scorer):
    """Co-occurrence of layer l's experts with layer l+d's (fitted per d)."""

    name = "affinity"

    def fit(self, train: RoutingTrace) -> None:
        super().fit(train)
        self.train = train
        self.tables: dict[int, torch.Tensor] = {}

    def scores(self, data: TokenTensors, rows: slice, d: int) -> torch.Tensor:
        if d not in self.tables:
            self.tables[d] = affinity(self.train, d, self.device).to(self.device)
        table = self.tables[d][:-d]  # [L-d, E, E]
        hot = multi_hot(data.routed_ids[rows][:, :-d], table.shape[-1])  # [n, L-d, E]
        out = torch.einsum("nle,lef->nlf", hot, table)
        return out + TIE_BREAK * self.prior(hot.shape[0], d)


class PrevTokenScorer(Scorer):
    """The previous token's experts at the target layer (popularity for a first token)."""

    name = "prev-token"

    def scores(self, data: TokenTensors, rows: slice, d: int) -> torch.Tensor:
        prev = data.prev_ids[rows][:, d:]  # [n, L-d, K]
        hot = multi_hot(prev, self.popularity.shape[-1])
        return hot + TIE_BREAK * self.prior(hot.shape[0], d)


class GateLookaheadScorer(Scorer):
    """Router l+d on layer l's MoE input: its top-M probabilities, as recorded."""

    name = "gate-lookahead"
    needs_lookahead = True

    def scores(self, data: TokenTensors, rows: slice, d: int) -> torch.Tensor:
        assert data.lookahead_ids is not None, "gate-lookahead needs lookahead fields"
        ids = data.lookahead_ids[rows][:, :-d, d - 1]  # [n, L-d, M]
        probs = data.lookahead_probs[rows][:, :-d, d - 1]
        dense = dense_probs(ids, probs, self.popularity.shape[-1])
        return dense + TIE_BREAK * self.prior(dense.shape[0], d)


class TraceMatchScorer(Scorer):
    """Request-level activation-matrix matching (MoE-Infinity style), see module docstring."""

    name = "trace-match"

    def __init__(self, max_requests: int = 2000) -> None:
        self.max_requests = max_requests

    def fit(self, train: RoutingTrace) -> None:
        super().fit(train)
        hot = multi_hot(train.expert_ids, train.num_experts)  # [N, L, E]
        seqs, seq_index = torch.unique(train.seq_id, return_inverse=True)
        matrices = torch.zeros(seqs.numel(), *hot.shape[1:])
        matrices.index_add_(0, seq_index, hot)  # [C, L, E] per-request activation counts
        if seqs.numel() > self.max_requests:
            keep = torch.randperm(seqs.numel(), generator=torch.Generator().manual_seed(0))
            matrices = matrices[keep[: self.max_requests]]
        self.matrices = matrices
        self.norms = matrices.flatten(1).norm(dim=1).clamp_min(1e-6)  # [C]

    def prepare(self, data: TokenTensors) -> None:
        """best[t, l]: the stored request most similar to token t's request after layer l."""
        N, L = data.routed_ids.shape[:2]
        self.best = torch.zeros(N, L, dtype=torch.long, device=data.device)
        _, counts = torch.unique_consecutive(data.seq_id, return_counts=True)
        start = 0
        for n in counts.tolist():
            self.best[start : start + n] = self._match_sequence(data.routed_ids[start : start + n])
            start += n

    def _match_sequence(self, ids: torch.Tensor) -> torch.Tensor:
        # n tokens of one sequence, L layers, E experts, C stored requests
        L, K = ids.shape[1:]
        M = self.matrices
        hot = multi_hot(ids, M.shape[-1])  # [n, L, E]
        before = torch.cumsum(hot, 0) - hot  # [n, L, E] counts of earlier tokens
        dot = (before.flatten(1) @ M.flatten(1).T)[:, None]  # [n, 1, C]
        dot = dot + torch.cumsum(torch.einsum("nle,cle->nlc", hot, M), 1)  # [n, L, C]
        cross = torch.cumsum((before * hot).sum(-1), 1)  # [n, L]
        own = (
            torch.arange(1, L + 1, device=ids.device) * K
        )  # this token's layers <= l, one count each
        norm2 = before.pow(2).sum((1, 2))[:, None] + 2 * cross + own  # [n, L]
        sim = dot / (norm2.sqrt()[..., None] * self.norms)
        return sim.argmax(-1)  # [n, L]

    def scores(self, data: TokenTensors, rows: slice, d: int) -> torch.Tensor:
        best = self.best[rows][:, :-d]  # [n, L-d]
        target_layer = torch.arange(d, best.shape[1] + d, device=best.device)
        matched = self.matrices[best, target_layer]  # [n, L-d, E]
        matched = matched / matched.sum(-1, keepdim=True).clamp_min(1.0)
        return matched + TIE_BREAK * self.prior(best.shape[0], d)


class LearnedScorer(Scorer):
    """A trained Predictor (trained in fit(), or given ready)."""

    def __init__(self, name: str, predictor: Predictor | None = None, **train_kw: Any) -> None:
        self.name = name
        self.needs_lookahead = "lookahead" in FEATURE_SETS.get(name, ("lookahead",))
        self.predictor, self.train_kw = predictor, train_kw

    def fit(self, train: RoutingTrace) -> None:
        super().fit(train)
        if self.predictor is not None:
            self.needs_lookahead = "lookahead" in self.predictor.config.features
            return
        kw = dict(self.train_kw)
        max_d = min(kw.pop("max_distance", 4), train.num_layers - 1)
        width = min(kw.pop("lookahead_width", 4), train.num_experts)
        if self.needs_lookahead and train.lookahead_ids is not None:  # what the traces hold
            max_d, width = min(max_d, train.max_distance), min(width, train.lookahead_ids.shape[3])
        distances = tuple(range(1, max_d + 1))
        config = PredictorConfig(
            train.num_layers,
            train.num_experts,
            train.top_k,
            distances=distances,
            features=FEATURE_SETS[self.name],
            lookahead_width=width,
            **{k: kw.pop(k) for k in ("path_layers", "hidden") if k in kw},
        )
        self.predictor = train_predictor(train, config, **kw)

    def scores(self, data: TokenTensors, rows: slice, d: int) -> torch.Tensor:
        p = self.predictor
        assert p is not None and d in p.config.distances, f"{self.name} not trained for d={d}"
        P = p.config.num_layers - d
        with torch.no_grad():
            return p.logits(d, data.inputs(p, d, rows)[:, :P], slice(0, P))


SCORERS = {
    "popularity": PopularityScorer,
    "affinity": AffinityScorer,
    "prev-token": PrevTokenScorer,
    "gate-lookahead": GateLookaheadScorer,
    "trace-match": TraceMatchScorer,
}
LEARNED = ("paper", "ours")


def make_scorer(name: str, predictor: Predictor | None = None, **train_kw: Any) -> Scorer:
    """A scorer by name (SCORERS or LEARNED); learned ones take a Predictor or train kwargs."""
    if name in LEARNED:
        return LearnedScorer(name, predictor, **train_kw)
    if name not in SCORERS:
        raise ValueError(f"unknown predictor {name!r}; known: {[*SCORERS, *LEARNED]}")
    return SCORERS[name]()
