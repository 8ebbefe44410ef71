"""Score expert predictors on held-out traces: the paper's metrics and the prefetch view.

For each held-out token, source layer l and distance d (target layer l+d < L), with S the
K experts the token routed at l+d and R the predictor's ranking:

    exact      top-K of R == S                       (the paper's "exact top-k")
    half       |top-K of R ∩ S| >= ceil(K/2)         (the paper's "at least half right")
    recall_k   |top-K of R ∩ S| / K
    recall_b   |top-b of R ∩ S| / K                  (b = prefetch budget, experts/layer)
    precision_b |top-b of R ∩ S| / b                 (share of the prefetched set used)

all averaged over (token, l) pairs. Metrics are per token: a batched decode step prefetches
the union over its tokens, whose precision is a runtime question.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from duoserve.predictor.baselines import Scorer, make_scorer
from duoserve.predictor.model import Predictor
from duoserve.predictor.trace import RoutingTrace
from duoserve.predictor.train import TokenTensors

METRICS = ("exact", "half", "recall_k", "recall_b", "precision_b")
ORDER = ("popularity", "affinity", "prev-token", "trace-match", "gate-lookahead", "paper", "ours")


def set_metrics(scores: torch.Tensor, target_ids: torch.Tensor, budget: int) -> dict[str, float]:
    """Metric sums over rows: scores [..., E], target_ids [..., K] (distinct ids).

    Returns {"count", "exact", "half", "recall_k", "recall_b", "precision_b"}; divide each
    sum by "count" for the mean.
    """
    # E experts, K top-k, b budget
    E, K = scores.shape[-1], target_ids.shape[-1]
    b = min(budget, E)
    ranked = scores.topk(max(K, b), dim=-1).indices  # [..., max(K, b)]
    hit = (ranked[..., :, None] == target_ids[..., None, :]).any(-1)  # [..., max(K, b)]
    hits_k = hit[..., :K].sum(-1).float()
    hits_b = hit[..., :b].sum(-1).float()
    return {
        "count": float(hits_k.numel()),
        "exact": float((hits_k == K).sum()),
        "half": float((hits_k >= math.ceil(K / 2)).sum()),
        "recall_k": float(hits_k.sum() / K),
        "recall_b": float(hits_b.sum() / K),
        "precision_b": float(hits_b.sum() / b),
    }


def score_predictor(
    scorer: Scorer,
    data: TokenTensors,
    distances: Sequence[int],
    budget: int,
    chunk_values: int = 1 << 23,
) -> dict[int, dict[str, float]]:
    """Mean metrics per distance for a fitted scorer on held-out `data`.

    Tokens go in chunks of about `chunk_values` / (L * E * 10) (bounds feature memory).
    """
    scorer.prepare(data)
    _, L, _ = data.routed_ids.shape
    chunk_tokens = max(16, chunk_values // (L * int(scorer.popularity.shape[-1]) * 10))
    sums: dict[int, dict[str, float]] = {
        d: dict.fromkeys(("count", *METRICS), 0.0) for d in distances
    }
    for start in range(0, data.num_tokens, chunk_tokens):
        rows = slice(start, min(start + chunk_tokens, data.num_tokens))
        for d in distances:
            scores = scorer.scores(data, rows, d)  # [n, L-d, E]
            part = set_metrics(scores, data.routed_ids[rows][:, d:], budget)
            for key, value in part.items():
                sums[d][key] += value
    return {
        d: {m: s[m] / max(s["count"], 1.0) for m in METRICS} | {"count": s["count"]}
        for d, s in sums.items()
    }


def evaluate_predictors(
    train: RoutingTrace,
    test: RoutingTrace,
    names: Sequence[str] = ORDER,
    distances: Sequence[int] = (1, 2, 3, 4),
    budget: int | None = None,
    tokens: str = "all",
    predictors: dict[str, Predictor] | None = None,
    train_kw: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
) -> list[dict[str, Any]]:
    """Fit each named predictor on `train`, score it on `test`; one row per (name, d).

    Rows: {"predictor", "d", metrics..., "count"}, or {"predictor", "skipped": why}. Learned
    predictors ("paper", "ours") are trained here unless given in `predictors`. Scoring
    (and training, with train_kw["device"]) runs on `device`.
    """
    budget = budget or 2 * train.top_k
    distances = [d for d in distances if d < train.num_layers]
    test = test.tokens(tokens)
    if test.num_tokens == 0:
        raise ValueError(f"the held-out traces have no {tokens} tokens")
    data = TokenTensors.of(test).to(device)
    chunk_values = 1 << (23 if data.device.type == "cpu" else 26)
    rows: list[dict[str, Any]] = []
    for name in names:
        scorer = make_scorer(name, (predictors or {}).get(name), **(train_kw or {}))
        if scorer.needs_lookahead and (train.lookahead_ids is None or test.lookahead_ids is None):
            rows.append({"predictor": name, "skipped": "the traces have no lookahead fields"})
            continue
        t0 = time.perf_counter()
        scorer.fit(train)
        scorer.to(device)
        usable = [
            d for d in distances if d <= max(test.max_distance, 0) or not scorer.needs_lookahead
        ]
        if isinstance(getattr(scorer, "predictor", None), Predictor):
            usable = [d for d in usable if d in scorer.predictor.config.distances]
        for d, metrics in score_predictor(scorer, data, usable, budget, chunk_values).items():
            rows.append({"predictor": name, "d": d, "budget": budget, **metrics})
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return rows


def markdown_table(rows: list[dict[str, Any]], top_k: int) -> str:
    """Rows as a markdown table (percentages), one line per (predictor, d)."""
    budget = next((r["budget"] for r in rows if "budget" in r), 2 * top_k)
    head = (
        f"| predictor | d | exact top-{top_k} | ≥ half right | recall@{top_k} | "
        f"recall@{budget} | precision@{budget} |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['predictor']} | – | skipped: {r['skipped']} | | | | |")
            continue
        cells = " | ".join(f"{100 * r[m]:.1f}" for m in METRICS)
        lines.append(f"| {r['predictor']} | {r['d']} | {cells} |")
    return "\n".join(lines)


def plot_rows(rows: list[dict[str, Any]], top_k: int, path: str | Path, title: str = "") -> Path:
    """Exact top-K, recall@K and precision@budget against d, one line per predictor (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if "skipped" not in r]
    names = list(dict.fromkeys(r["predictor"] for r in scored))
    budget = scored[0]["budget"] if scored else 2 * top_k
    panels = (
        ("exact", f"exact top-{top_k}"),
        ("recall_k", f"recall@{top_k}"),
        ("precision_b", f"precision@{budget}"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, (metric, label) in zip(axes, panels):
        for name in names:
            mine = [r for r in scored if r["predictor"] == name]
            ax.plot([r["d"] for r in mine], [100 * r[metric] for r in mine], "o-", label=name)
        ax.set_xlabel("lookahead distance d (layers)")
        ax.set_ylabel(f"{label} (%)")
        ax.set_xticks(sorted({r["d"] for r in scored}))
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def time_predict(predictor: Predictor, batch_size: int = 1, repeats: int = 200) -> dict[str, float]:
    """Microseconds per Predictor.predict call (d=1, mid layer) on the predictor's device."""
    c = predictor.config
    device = predictor.popularity.device
    layer = max(0, c.num_layers // 2 - 1)
    routed = torch.randint(0, c.num_experts, (batch_size, layer + 1, c.top_k), device=device)
    probs = torch.softmax(torch.randn(batch_size, c.num_experts, device=device), -1)
    prev = torch.randint(0, c.num_experts, (batch_size, c.top_k), device=device)
    d = c.distances[0]
    for _ in range(10):
        predictor.predict(layer, routed, probs, d, prev)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        predictor.predict(layer, routed, probs, d, prev)
    sync()
    return {"us_per_call": 1e6 * (time.perf_counter() - t0) / repeats, "batch_size": batch_size}
