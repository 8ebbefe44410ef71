"""How much a shipped trace's next-layer routing can be predicted: predictor variants on a
sequence split of one trace (CPU, 3-6 minutes; docs/predictor.md, "Against the targets").

    python scripts/predictor_variants.py \
        --trace duoserve/assets/traces/mixtral-8x7b-topology.heldout.safetensors

The trace's sequences are split in two halves (`split_by_sequence`, one split per seed);
`ours` variants (hidden width, path window, epochs, with and without the lookahead rank term)
train on one half and are scored on the other at d = 1, next to gate lookahead alone and,
for the Mixtral topology, the shipped predictor (trained on other prompts). Then a plain
ensemble: router l+1 on layer l's input plus alpha x router l+1 on layer l-1's input (the
trace's d = 2 lookahead), scored as recall@K. Prints exact top-K and recall@K in percent.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from duoserve.predictor.evaluate import evaluate_predictors
from duoserve.predictor.model import Predictor, PredictorConfig
from duoserve.predictor.trace import RoutingTrace, load_trace, split_by_sequence
from duoserve.predictor.train import train_predictor

SHIPPED = Path("duoserve/assets/predictors")
VARIANTS = {  # name: (PredictorConfig overrides, epochs)
    "ours": ({}, 8),
    "ours, no rank term": ({"lookahead_rank": False}, 8),
    "ours, hidden 128": ({"hidden": 128}, 8),
    "ours, hidden 256": ({"hidden": 256}, 12),
    "ours, path W = 1": ({"path_layers": 1}, 8),
    "ours, 20 epochs": ({}, 20),
}


def score(train: RoutingTrace, test: RoutingTrace, name: str, predictor=None) -> dict:
    """d = 1 metrics of one scorer (`name` from baselines, or "ours" with `predictor`)."""
    given = {"ours": predictor} if predictor is not None else None
    return evaluate_predictors(train, test, names=[name], distances=(1,), predictors=given)[0]


def ensemble_recall(trace: RoutingTrace, alpha: float) -> float:
    """recall@K of log p(l -> l+1) + alpha log p(l-1 -> l+1) over layers 1..L-2 (floor 1e-3
    for experts outside the recorded top-M)."""
    ids, la = trace.expert_ids.long(), trace.lookahead_ids.long()
    lp = trace.lookahead_probs.float()
    N, L, K = ids.shape

    def dense(layer: int, d: int) -> torch.Tensor:  # [N, E] recorded probabilities
        out = torch.full((N, trace.num_experts), 1e-3)
        return out.scatter_(1, la[:, layer, d - 1], lp[:, layer, d - 1])

    hits = 0.0
    for layer in range(1, L - 1):
        s = dense(layer, 1).log() + alpha * dense(layer - 1, 2).log()
        top = s.topk(K, -1).indices
        hits += float((top[:, :, None] == ids[:, layer + 1, None, :]).any(-1).sum())
    return 100 * hits / (N * K * (L - 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", required=True, help="a replay trace file or trace folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    torch.set_num_threads(2)
    trace = load_trace(args.trace)
    assert trace.lookahead_ids is not None, "the trace has no gate-lookahead fields"
    M = trace.lookahead_ids.shape[3]
    base = dict(num_layers=trace.num_layers, num_experts=trace.num_experts, top_k=trace.top_k)
    shipped = [
        p for p in (Predictor.load(f) for f in sorted(SHIPPED.glob("*.safetensors")))
        if (p.config.num_layers, p.config.num_experts) == (trace.num_layers, trace.num_experts)
    ]  # fmt: skip
    print(f"{args.trace}: {trace.num_tokens} tokens, L={trace.num_layers}, E={trace.num_experts}")
    print(f"{'seed':>4}  {'predictor':22s} {'exact':>6} {'recall':>7}")
    for seed in args.seeds:
        train, test = split_by_sequence(trace, 0.5, seed)
        rows = [("gate-lookahead", score(train, test, "gate-lookahead"))]
        rows += [("shipped ours", score(train, test, "ours", p)) for p in shipped]
        for name, (overrides, epochs) in VARIANTS.items():
            config = PredictorConfig(**base, distances=(1,), lookahead_width=M, **overrides)
            p = train_predictor(train, config, epochs=epochs, seed=seed, log=lambda s: None)
            rows.append((name, score(train, test, "ours", p)))
        for name, r in rows:
            print(f"{seed:>4}  {name:22s} {100 * r['exact']:6.1f} {100 * r['recall_k']:7.2f}")
    if trace.max_distance >= 2:
        for alpha in (0.0, 0.25, 0.5, 1.0):
            print(f"ensemble alpha {alpha}: recall@K {ensemble_recall(trace, alpha):.2f}")


if __name__ == "__main__":
    main()
