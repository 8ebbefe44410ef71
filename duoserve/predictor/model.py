"""The learned layer-level expert predictor: one small MLP per (layer l, distance d).

After MoE layer l routes, the predictor for (l, d) scores layer l+d's experts from an input
of E-sized blocks (E experts, W path layers):

    path      W blocks: multi-hot of the experts chosen at layers l, l-1, ..., l-W+1
    affinity  mean over the experts e chosen at layer l of P(f at l+d | e at l) (a table)
    lookahead the top-M probabilities of router l+d applied to layer l's MoE input, and
              their log feature (features.log_feature); two blocks
    prev      multi-hot of the previous token's experts at layer l+d (same sequence)

    logits = W2 relu(W1 x + b1) + b2 + sum over non-path blocks of (diag_b * block)
             + rank[rank of the expert in the lookahead top M]   (0 outside the top M)

(hidden = 0: logits = W1 x + b1 + diag terms + rank). b2 starts at log popularity of layer
l+d: popularity enters as the prior a per-layer model starts from. The rank term (one bias
per lookahead rank, shared by all experts; config.lookahead_rank) starts at the counted
log-odds of being routed at each rank (features.rank_prior), so training starts from the
gate-lookahead ranking with the step at rank K that E = 128, K = 8 routers need (their
top-16 probabilities are nearly flat: a scale on log p cannot separate rank 8 from 9).
The "paper" feature set is path + affinity (+ popularity); "ours" adds lookahead and prev.
Saved as safetensors with the config and training record as JSON metadata.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from duoserve.predictor.features import (
    dense_probs,
    log_feature,
    lookahead_ranks,
    multi_hot,
    shift_layers,
)

FORMAT = "duoserve-predictor"
ALL_FEATURES = ("path", "affinity", "lookahead", "prev")
FEATURE_SETS = {"paper": ("path", "affinity"), "ours": ALL_FEATURES}
LOOKAHEAD_PRIOR = 8.0  # initial logit scale of the lookahead log feature (no rank term)


@dataclass(frozen=True)
class PredictorConfig:
    """Shape of a predictor: topology, distances it predicts, and its input features."""

    num_layers: int  # L MoE layers
    num_experts: int  # E
    top_k: int  # K
    distances: tuple[int, ...] = (1, 2, 3, 4)
    features: tuple[str, ...] = ALL_FEATURES
    path_layers: int = 4  # W
    lookahead_width: int = 4  # M gate-lookahead experts kept per (l, d)
    hidden: int = 64  # 0: a linear model
    lookahead_rank: bool = True  # a bias per lookahead rank (files without the key: False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "distances", tuple(self.distances))
        object.__setattr__(self, "features", tuple(self.features))
        assert self.distances and all(d >= 1 for d in self.distances), "distances must be >= 1"
        assert all(f in ALL_FEATURES for f in self.features), f"features are {ALL_FEATURES}"
        assert self.features, "at least one feature"
        assert 0 < self.lookahead_width <= self.num_experts and self.path_layers >= 1

    @property
    def blocks(self) -> tuple[str, ...]:
        """Names of the E-sized input blocks, in input order."""
        names: list[str] = []
        if "path" in self.features:
            names += [f"path{w}" for w in range(self.path_layers)]
        if "affinity" in self.features:
            names.append("affinity")
        if "lookahead" in self.features:
            names += ["lookahead", "lookahead_log"]
        if "prev" in self.features:
            names.append("prev")
        return tuple(names)

    @property
    def uses_rank(self) -> bool:
        """Whether the logits have the per-rank lookahead bias."""
        return self.lookahead_rank and "lookahead" in self.features

    @property
    def direct_blocks(self) -> tuple[str, ...]:
        """Blocks that also reach the logits through a per-expert scale."""
        return tuple(b for b in self.blocks if not b.startswith("path"))


class Predictor(nn.Module):
    """Scores layer l+d's experts after layer l routed (see the module docstring)."""

    def __init__(self, config: PredictorConfig) -> None:
        super().__init__()
        self.config = c = config
        L, E, H = c.num_layers, c.num_experts, c.hidden
        num_inputs = len(c.blocks) * E
        width = H or E
        self.register_buffer("popularity", torch.full((L, E), 1.0 / E))
        self.params = nn.ParameterDict()
        for d in c.distances:
            self.register_buffer(f"affinity_d{d}", torch.full((L, E, E), 1.0 / E))
            self.params[f"d{d}_w1"] = nn.Parameter(
                torch.randn(L, num_inputs, width) * num_inputs**-0.5
            )
            self.params[f"d{d}_b1"] = nn.Parameter(torch.zeros(L, width))
            if H:
                self.params[f"d{d}_w2"] = nn.Parameter(torch.randn(L, H, E) * 0.1 * H**-0.5)
                self.params[f"d{d}_b2"] = nn.Parameter(torch.zeros(L, E))
            self.params[f"d{d}_diag"] = nn.Parameter(torch.zeros(L, len(c.direct_blocks), E))
            if c.uses_rank:
                self.params[f"d{d}_rank"] = nn.Parameter(torch.zeros(L, c.lookahead_width))
        self.training_record: dict[str, Any] = {}
        self._fused: dict[tuple, Any] = {}  # decode-time tables, see fused()

    def set_tables(
        self,
        popularity: torch.Tensor,
        affinities: dict[int, torch.Tensor],
        rank_priors: dict[int, torch.Tensor] | None = None,
    ) -> None:
        """Install popularity [L, E] and affinity [L, E, E] tables; output biases start at
        log popularity of the target layer. The lookahead starts as the ranking: with
        `rank_priors` ({d: [L, M]}, features.rank_prior) and the rank term, the rank biases
        start there; otherwise (rank biases left as they are) the log feature's direct
        weight starts at LOOKAHEAD_PRIOR."""
        self._fused.clear()
        c = self.config
        with torch.no_grad():
            self.popularity.copy_(popularity)
            log_pop = popularity.clamp_min(1e-6).log()
            for d in self.config.distances:
                getattr(self, f"affinity_d{d}").copy_(affinities[d])
                bias = self.params[f"d{d}_b2" if self.config.hidden else f"d{d}_b1"]
                bias.copy_(shift_layers(log_pop[None], d)[0])
                if c.uses_rank and rank_priors is not None:
                    self.params[f"d{d}_rank"].copy_(rank_priors[d])
                elif "lookahead" in c.features:
                    diag = self.params[f"d{d}_diag"]
                    diag[:, c.direct_blocks.index("lookahead_log")] = LOOKAHEAD_PRIOR

    # ---------------------------------------------------------------- features

    def features(
        self,
        d: int,
        routed_ids: torch.Tensor,
        prev_ids: torch.Tensor | None,
        lookahead_ids: torch.Tensor | None,
        lookahead_probs: torch.Tensor | None,
    ) -> torch.Tensor:
        """Inputs [B, L, F] of every source layer at once (training and evaluation).

        routed_ids [B, L, K] the tokens' routing; prev_ids [B, L, K] the previous tokens'
        (-1: none); lookahead_ids/probs [B, L, M'] the trace's lookahead for distance d.
        With the rank term, a last E-sized block holds each expert's lookahead rank + 1
        (0: outside the top M).
        """
        # B tokens, L layers, K top-k, E experts
        c = self.config
        hot = multi_hot(routed_ids, c.num_experts)  # [B, L, E]
        blocks = []
        if "path" in c.features:
            blocks += [shift_layers(hot, -w) for w in range(c.path_layers)]
        if "affinity" in c.features:
            table = getattr(self, f"affinity_d{d}")  # [L, E, E]
            blocks.append(torch.einsum("ble,lef->blf", hot, table) / c.top_k)
        if "lookahead" in c.features:
            assert lookahead_ids is not None, "this predictor needs gate-lookahead inputs"
            M = c.lookahead_width
            dense = dense_probs(lookahead_ids[..., :M], lookahead_probs[..., :M], c.num_experts)
            blocks += [dense, torch.where(dense > 0, log_feature(dense), 0.0)]
        ranks = lookahead_ranks(lookahead_ids[..., :M], c.num_experts) if c.uses_rank else None
        if "prev" in c.features:
            prev = torch.zeros_like(hot) if prev_ids is None else multi_hot(prev_ids, c.num_experts)
            blocks.append(shift_layers(prev, d))
        return torch.cat(blocks + ([ranks] if ranks is not None else []), dim=-1)

    # ---------------------------------------------------------------- scoring

    def logits(self, d: int, x: torch.Tensor, layers: slice | int = slice(None)) -> torch.Tensor:
        """Logits [B, P, E] from inputs x [B, P, F] of source layers `layers` (P of them)."""
        c, p = self.config, self.params
        if isinstance(layers, int):
            layers = slice(layers, layers + 1)
        E, nb = c.num_experts, len(c.blocks)
        first = nb - len(c.direct_blocks)
        h = torch.einsum("bpf,pfh->bph", x[..., : nb * E], p[f"d{d}_w1"][layers])
        h = h + p[f"d{d}_b1"][layers]
        if c.hidden:
            h = torch.einsum("bph,phe->bpe", F.relu(h), p[f"d{d}_w2"][layers])
            h = h + p[f"d{d}_b2"][layers]
        direct = x[..., first * E : nb * E].unflatten(-1, (len(c.direct_blocks), E))
        h = h + (direct * p[f"d{d}_diag"][layers]).sum(-2)  # direct: [B, P, nD, E]
        if c.uses_rank:
            rank = F.pad(p[f"d{d}_rank"][layers], (1, 0))  # [P, M + 1], index 0: outside
            index = x[..., nb * E :].long()  # [B, P, E]
            h = h + rank.expand(*index.shape[:2], -1).gather(-1, index)
        return h

    def train(self, mode: bool = True) -> Predictor:
        """Also drops the decode-time tables (they copy the weights)."""
        self._fused.clear()
        return super().train(mode)

    def fused(
        self,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        distances: tuple[int, ...] | None = None,
    ) -> Any:
        """The decode-time form (runtime.FusedPredictor) on `device`, built once and kept.

        `distances` limits the tables to the distances the runtime will ask for (memory).
        """
        from duoserve.predictor.runtime import FusedPredictor

        distances = tuple(distances or self.config.distances)
        key = (str(torch.device(device)), dtype, distances)
        if key not in self._fused:
            self._fused[key] = FusedPredictor(self, distances, device, dtype)
        return self._fused[key]

    def scores(
        self,
        layer: int,
        routed_ids: torch.Tensor,
        lookahead_probs: torch.Tensor | None = None,
        d: int = 1,
        prev_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, E] of layer `layer`+d's experts (higher = more likely); no host sync.

        layer: MoE-layer index (0..L-1) that just routed; routed_ids [B, n, K] int64: the
        experts of the last n >= min(W, layer+1) MoE layers, routed_ids[:, -1] being
        `layer`'s; lookahead_probs [B, E]: softmax of router `layer`+d applied to `layer`'s
        MoE input (needed when the predictor uses lookahead); prev_ids [B, K] int64: the
        previous token's experts at layer `layer`+d (None: no previous token). Runs on the
        inputs' device, in float32 (see fused() for other dtypes).
        """
        assert d in self.config.distances, f"trained for distances {self.config.distances}"
        assert layer >= 0 and layer + d < self.config.num_layers, "target layer out of range"
        return self.fused(routed_ids.device).scores(layer, routed_ids, lookahead_probs, d, prev_ids)

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
        scores = self.scores(layer, routed_ids, lookahead_probs, d, prev_ids)
        return scores.topk(num or self.config.top_k, dim=-1).indices

    # ---------------------------------------------------------------- files

    def save(self, path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
        """Write weights (as `dtype`) and JSON metadata to one safetensors file."""
        tensors = {
            k: v.detach().to("cpu", dtype).contiguous() for k, v in self.state_dict().items()
        }
        metadata = {
            "format": FORMAT,
            "config": json.dumps(asdict(self.config)),
            "training": json.dumps(self.training_record),
        }
        save_file(tensors, str(path), metadata=metadata)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Predictor:
        """Read a predictor file (float32 weights on `device`, eval mode)."""
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: not a predictor file (format {meta.get('format')!r})")
            state = {k: f.get_tensor(k).float() for k in f.keys()}  # noqa: SIM118
        config = json.loads(meta["config"])
        config.setdefault("lookahead_rank", False)  # files from before the rank term
        predictor = cls(PredictorConfig(**config))
        predictor.load_state_dict(state)
        predictor.training_record = json.loads(meta.get("training", "{}"))
        return predictor.to(device).eval()
