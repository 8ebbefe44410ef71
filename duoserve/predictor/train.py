"""Train a Predictor on routing traces, on the CPU in minutes (or on a GPU).

Every token of the training traces is a sample for every (l, d) with l + d < L (prompt
tokens too: a token's routing depends only on its prefix, so prefill and decode route a
text alike). Loss: cross-entropy of the softmax over layer l+d's experts against the
routed set (each routed expert 1/K), summed over distances and averaged over (token, l).
AdamW at a constant rate (a decay measured worse: the model is still underfit when
training ends); a tenth of the sequences is held back for validation and the best
epoch is kept. `device` moves the token tensors and the Predictor there; the initial
weights and the batch order come from CPU generators, so a device changes only rounding.
`max_minutes` stops after the epoch that crosses the limit (the best epoch is still kept).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from duoserve.predictor.features import affinity, multi_hot, popularity, rank_prior, shift_layers
from duoserve.predictor.model import Predictor, PredictorConfig
from duoserve.predictor.trace import RoutingTrace, split_by_sequence


@dataclass
class TokenTensors:
    """Per-token inputs and targets of a trace, rows in (sequence, position) order."""

    routed_ids: torch.Tensor  # [N, L, K] int64
    prev_ids: torch.Tensor  # [N, L, K] int64, -1 where the token has no previous token
    lookahead_ids: torch.Tensor | None  # [N, L, D, M] int64
    lookahead_probs: torch.Tensor | None  # [N, L, D, M] float32
    seq_id: torch.Tensor  # [N]

    @classmethod
    def of(cls, trace: RoutingTrace) -> TokenTensors:
        trace = trace.by_sequence()
        routed = trace.expert_ids.long()
        prev_row = trace.prev_index()
        prev = torch.where(prev_row[:, None, None] >= 0, routed[prev_row.clamp_min(0)], -1)
        la_ids = None if trace.lookahead_ids is None else trace.lookahead_ids.long()
        la_probs = None if trace.lookahead_probs is None else trace.lookahead_probs.float()
        return cls(routed, prev, la_ids, la_probs, trace.seq_id.long())

    @property
    def num_tokens(self) -> int:
        return self.routed_ids.shape[0]

    @property
    def device(self) -> torch.device:
        return self.routed_ids.device

    def to(self, device: torch.device | str) -> TokenTensors:
        """The same tensors on `device`."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TokenTensors(
            self.routed_ids.to(device),
            self.prev_ids.to(device),
            move(self.lookahead_ids),
            move(self.lookahead_probs),
            self.seq_id.to(device),
        )

    def inputs(self, predictor: Predictor, d: int, rows: torch.Tensor | slice) -> torch.Tensor:
        """Predictor inputs [B, L, F] for distance d of token rows `rows`."""
        la_ids = la_probs = None
        if self.lookahead_ids is not None and d <= self.lookahead_ids.shape[2]:
            la_ids = self.lookahead_ids[rows, :, d - 1]
            la_probs = self.lookahead_probs[rows, :, d - 1]
        return predictor.features(d, self.routed_ids[rows], self.prev_ids[rows], la_ids, la_probs)

    def targets(self, num_experts: int, d: int, rows: torch.Tensor | slice) -> torch.Tensor:
        """[B, L, E]: row l holds layer l+d's routed set (zeros for l >= L-d)."""
        return shift_layers(multi_hot(self.routed_ids[rows], num_experts), d)


def batch_loss(
    predictor: Predictor, data: TokenTensors, rows: torch.Tensor | slice
) -> torch.Tensor:
    """Mean soft-target cross-entropy over valid (token, l), summed over distances."""
    c = predictor.config
    total = torch.zeros((), device=data.device)
    for d in c.distances:
        P = c.num_layers - d  # source layers with a target
        logits = predictor.logits(d, data.inputs(predictor, d, rows)[:, :P], slice(0, P))
        target = data.targets(c.num_experts, d, rows)[:, :P] / c.top_k  # [B, P, E]
        total = total - (target * torch.log_softmax(logits, -1)).sum(-1).mean()
    return total


def check_trainable(trace: RoutingTrace, config: PredictorConfig) -> None:
    """Refuse a config that the trace cannot feed, with a message saying why."""
    assert trace.num_layers == config.num_layers and trace.num_experts == config.num_experts
    assert max(config.distances) < trace.num_layers, "distance must be < the number of layers"
    if "lookahead" in config.features:
        if trace.lookahead_ids is None:
            raise ValueError("feature 'lookahead' needs traces with lookahead fields")
        if max(config.distances) > trace.max_distance:
            raise ValueError(f"traces hold lookahead up to d={trace.max_distance}")
        if config.lookahead_width > trace.lookahead_ids.shape[3]:
            raise ValueError(f"traces hold {trace.lookahead_ids.shape[3]} lookahead experts")


def train_predictor(
    trace: RoutingTrace,
    config: PredictorConfig,
    epochs: int = 10,
    batch_size: int = 256,
    lr: float = 1e-2,
    seed: int = 0,
    log: Callable[[str], None] = print,
    device: torch.device | str = "cpu",
    max_minutes: float | None = None,
) -> Predictor:
    """Fit a Predictor to `trace` on `device` (returned there, eval mode); its
    training_record says what was done. Stops after `epochs`, or after the first epoch
    that ends past `max_minutes`; the weights of the best validation epoch are kept."""
    check_trainable(trace, config)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    fit, valid = split_by_sequence(trace, 0.1, seed) if _num_seqs(trace) >= 10 else (trace, trace)
    predictor = Predictor(config)  # initialised on the CPU: the same weights on any device
    ranks = None
    if config.uses_rank:
        ranks = {d: rank_prior(fit, d, config.lookahead_width) for d in config.distances}
    affinities = {d: affinity(fit, d, device) for d in config.distances}
    predictor.set_tables(popularity(fit), affinities, ranks)
    predictor.to(device)
    fit_data, valid_data = TokenTensors.of(fit).to(device), TokenTensors.of(valid).to(device)
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    best: tuple[float, int, dict | None] = (float("inf"), 0, None)
    epochs_run = 0
    for epoch in range(1, epochs + 1):
        predictor.train()
        order = torch.randperm(fit_data.num_tokens, generator=gen).to(device)
        for start in range(0, fit_data.num_tokens, batch_size):
            loss = batch_loss(predictor, fit_data, order[start : start + batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        valid_loss = validation_loss(predictor, valid_data, batch_size)
        epochs_run, elapsed = epoch, time.perf_counter() - t0
        log(f"epoch {epoch}: validation loss {valid_loss:.4f} ({elapsed:.0f} s)")
        if valid_loss < best[0]:
            state = {k: v.detach().clone() for k, v in predictor.state_dict().items()}
            best = (valid_loss, epoch, state)
        if max_minutes is not None and elapsed >= 60 * max_minutes and epoch < epochs:
            log(f"stopping after epoch {epoch}: past the {max_minutes} min limit")
            break
    assert best[2] is not None, "no epoch ran (epochs must be >= 1)"
    predictor.load_state_dict(best[2])
    predictor.training_record = {
        "train_tokens": fit.num_tokens,
        "valid_tokens": valid.num_tokens,
        "epochs": epochs,
        "epochs_run": epochs_run,
        "best_epoch": best[1],
        "valid_loss": best[0],
        "seconds": round(time.perf_counter() - t0, 1),
        "device": str(device),
        "max_minutes": max_minutes,
        "sources": trace.meta.get("sources", [trace.meta.get("source")]),
    }
    return predictor.eval()


def _num_seqs(trace: RoutingTrace) -> int:
    return int(torch.unique(trace.seq_id).numel())


@torch.no_grad()
def validation_loss(predictor: Predictor, data: TokenTensors, batch_size: int) -> float:
    """batch_loss averaged over all tokens of `data`."""
    predictor.eval()
    total, count = torch.zeros((), device=data.device), 0  # summed on the device: one sync
    for start in range(0, data.num_tokens, batch_size):
        rows = slice(start, min(start + batch_size, data.num_tokens))
        n = rows.stop - rows.start
        total += batch_loss(predictor, data, rows) * n
        count += n
    return float(total) / max(count, 1)
