"""Signals for expert prediction, as tensors on any device (shared by training and runtime).

After MoE layer l routes a token, these are known: the experts it chose at layers <= l (its
activation path), the experts the same sequence's previous token chose at every layer, and
the gate-lookahead signal (router l+d applied to layer l's MoE input). From training traces
come per-layer popularity and inter-layer affinity tables.
"""

from __future__ import annotations

import math

import torch

from duoserve.predictor.trace import RoutingTrace

LOG_FLOOR = 1e-4  # gate-lookahead probabilities below this count as this (log features)


def multi_hot(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """ids [..., K] (int, -1 = none) -> float membership [..., E]."""
    valid = ids >= 0
    out = torch.zeros(*ids.shape[:-1], num_experts + 1, device=ids.device)
    index = torch.where(valid, ids.long(), num_experts)  # -1 goes to a spill column
    return out.scatter_(-1, index, 1.0)[..., :num_experts]


def dense_probs(ids: torch.Tensor, probs: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Top-M lookahead ids [..., M] and probs -> [..., E] (0 outside the top M)."""
    valid = ids >= 0
    out = torch.zeros(*ids.shape[:-1], num_experts + 1, device=ids.device)
    index = torch.where(valid, ids.long(), num_experts)
    return out.scatter_(-1, index, torch.where(valid, probs.float(), 0.0))[..., :num_experts]


def log_feature(probs: torch.Tensor) -> torch.Tensor:
    """Probabilities -> [0, 1]: 1 + log(max(p, LOG_FLOOR)) / log(1 / LOG_FLOOR)."""
    return 1.0 + probs.clamp_min(LOG_FLOOR).log() / math.log(1.0 / LOG_FLOOR)


def top_m(probs: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the `width` most likely experts of probs [..., E]: (ids, probs), as traces store."""
    top = probs.topk(width, dim=-1)
    return top.indices, top.values


def popularity(trace: RoutingTrace) -> torch.Tensor:
    """[L, E] share of each layer's routed slots that went to each expert (add-one smoothed)."""
    # N tokens, L layers, K top-k, E experts: bincount of (layer, expert) pairs
    L, E = trace.num_layers, trace.num_experts
    ids = trace.expert_ids.long()  # [N, L, K]
    flat = (ids + E * torch.arange(L)[:, None])[ids >= 0]
    counts = torch.bincount(flat, minlength=L * E).view(L, E).float() + 1.0  # [L, E]
    return counts / counts.sum(-1, keepdim=True)


def affinity(
    trace: RoutingTrace, d: int, device: torch.device | str = "cpu", chunk_tokens: int = 16384
) -> torch.Tensor:
    """[L, E, E] P(expert f at layer l+d | expert e at layer l); rows l >= L-d are uniform.

    Counted over all tokens: each (e at l, f at l+d) pair of one token adds one; add-one
    smoothing keeps unseen pairs possible. Counted on `device` in chunks of tokens (bounds
    memory), returned on the CPU.
    """
    # N tokens, L layers, E experts
    L, E = trace.num_layers, trace.num_experts
    table = torch.ones(L, E, E, device=device)
    if d < L:
        for start in range(0, trace.num_tokens, chunk_tokens):
            ids = trace.expert_ids[start : start + chunk_tokens].to(device)
            hot = multi_hot(ids, E)  # [n, L, E]
            table[: L - d] += torch.einsum("nle,nlf->lef", hot[:, : L - d], hot[:, d:])
    return (table / table.sum(-1, keepdim=True)).cpu()


def shift_layers(x: torch.Tensor, shift: int) -> torch.Tensor:
    """x [B, L, ...] -> y with y[:, l] = x[:, l + shift], zeros where l + shift is outside."""
    y = torch.zeros_like(x)
    L = x.shape[1]
    if shift >= 0 and shift < L:
        y[:, : L - shift] = x[:, shift:]
    elif shift < 0 and -shift < L:
        y[:, -shift:] = x[:, : L + shift]
    return y


def lookahead_ranks(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Lookahead ids [..., M] (most likely first, -1 = none) -> [..., E] float: j + 1 for the
    expert at rank j, 0 outside the top M (the index of the rank-bias term)."""
    valid = ids >= 0
    out = torch.zeros(*ids.shape[:-1], num_experts + 1, device=ids.device)
    index = torch.where(valid, ids.long(), num_experts)
    rank = torch.arange(1, ids.shape[-1] + 1, device=ids.device, dtype=out.dtype)
    return out.scatter_(-1, index, rank.expand(ids.shape))[..., :num_experts]


def rank_prior(trace: RoutingTrace, d: int, width: int) -> torch.Tensor:
    """[L, M] log(P(routed at l+d | gate-lookahead rank j) / P(routed | outside the top M)).

    The lookahead ranking is nearly the routing near its top and uninformative past K, so
    a per-rank bias is what the logits need first; with many flat router probabilities
    (E = 128) a scale on log p cannot express the step at rank K. Counted on `trace`
    (half-count smoothed); rows l >= L-d are 0.
    """
    # N tokens, L layers, K top-k, M width, E experts
    L, E, K = trace.num_layers, trace.num_experts, trace.top_k
    assert trace.lookahead_ids is not None and d <= trace.max_distance, "needs lookahead d"
    out = torch.zeros(L, width)
    if d >= L:
        return out
    ids = trace.lookahead_ids[:, : L - d, d - 1, :width].long()  # [N, L-d, M]
    routed = trace.expert_ids[:, d:].long()  # [N, L-d, K]
    hit = (ids[..., :, None] == routed[..., None, :]).any(-1) & (ids >= 0)  # [N, L-d, M]
    n = (ids >= 0).sum(0).float()  # [L-d, M]
    p_rank = (hit.sum(0).float() + 0.5) / (n + 1.0)
    outside = (K * trace.num_tokens - hit.sum((0, 2)).float()).clamp_min(0.5)  # [L-d]
    p_out = outside / (trace.num_tokens * (E - width)) if width < E else outside.new_ones(1)
    out[: L - d] = (p_rank / p_out.clamp_max(1.0)[:, None]).log()
    return out
