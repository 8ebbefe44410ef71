"""Eviction policies replayed on a shipped decode trace, with top-k prefetch (CPU, seconds).

    python -m duoserve.bench.eviction \
        --trace duoserve/assets/traces/qwen3-30b-a3b-topology.heldout.safetensors --slots 931 \
        [--batch 4] [--budgets 4 6 8]

The real ExpertCache and policy objects (one-element slots, so nothing is copied) serve the
trace's decode steps in order, the way offload/prefetch.py drives them: per MoE layer l, the
step's routed group (the union over its sequences) is acquired (misses counted); then the
recorded gate-lookahead top-`budget` experts of layer l+1 of each sequence are protected,
rank-major, and the non-resident ones prefetched; a layer's protection ends when it is
acquired. With `--batch B`, B streams of sequences decode in lockstep (`batch_steps`).
Printed per policy and budget: experts copied per step (misses + prefetches: the bytes the
link must carry), demand misses and useless prefetches per step, and the host time per
victim pick. Next to them, Belady-optimal demand misses per step (no prefetch) at the same
size: the bound the decode benchmarks print.
"""

from __future__ import annotations

import argparse
import time

import torch

from duoserve.bench.common import print_table
from duoserve.offload.expert_cache import ExpertCache
from duoserve.offload.simulate import belady_misses
from duoserve.predictor.trace import load_trace

POLICIES = ("lru", "lfu-decay", "next-use")


def batch_steps(trace, batch: int) -> list[list[int]]:
    """Decode steps of `batch` sequences in lockstep: [step][b] trace rows. Stream b serves
    sequences b, b + batch, ... one after the other (a finished request's slot takes the
    next), and the steps end when the shortest stream does. Batch 1: every decode row."""
    rows = (~trace.is_prefill).nonzero().flatten().tolist()
    if batch == 1:
        return [[r] for r in rows]
    by_seq: dict[int, list[int]] = {}
    for r in rows:
        by_seq.setdefault(int(trace.seq_id[r]), []).append(r)
    seqs = list(by_seq.values())
    streams = [[r for seq in seqs[b::batch] for r in seq] for b in range(batch)]
    return [list(step) for step in zip(*streams)]


def replay(
    trace, slots: int, policy: str, budget: int, num_layers: int, batch: int = 1
) -> dict[str, float]:
    """Serve the trace's decode steps through a fresh cache (module docstring); per step."""
    ids = trace.expert_ids.long()  # [N, L, K]
    lookahead = trace.lookahead_ids[:, :, 0].long() if trace.lookahead_ids is not None else None
    steps = batch_steps(trace, batch)
    L = ids.shape[1]
    cache = ExpertCache(slots, 1, torch.uint8, torch.device("cpu"), policy, num_layers=num_layers)
    protected_by_layer: dict[int, set] = {}
    picks, pick_s = 0, 0.0
    pick = cache._pick_victim

    def timed_pick():
        nonlocal picks, pick_s
        t0 = time.perf_counter()
        out = pick()
        pick_s += time.perf_counter() - t0
        picks += 1
        return out

    cache._pick_victim = timed_pick
    for step in steps:
        for layer in range(L):
            for key in protected_by_layer.pop(layer, ()):
                cache.protected.discard(key)
            cache.release(cache.acquire_group(layer, ids[step, layer].flatten().tolist()))
            if lookahead is None or layer + 1 >= L:
                continue
            ahead = lookahead[step, layer, :budget].T.flatten().tolist()  # rank-major, as live
            for e in dict.fromkeys(ahead):
                key = (layer + 1, e)
                if e < 0 or key in cache.protected:
                    continue
                cache.protected.add(key)
                protected_by_layer.setdefault(layer + 1, set()).add(key)
                s = cache.prefetch(key)
                if s is not None:
                    cache.release([s])
        cache.protected.clear()  # a step ends: protections of the last layer's targets too
        protected_by_layer.clear()
    n, st = len(steps), cache.stats
    return dict(
        copied=(st.misses + st.prefetches) / n,
        misses=st.misses / n,
        useless=(st.prefetch_unused + len(cache.unused_prefetched)) / n,
        pick_us=1e6 * pick_s / max(picks, 1),
    )


def reuse_stats(trace, slots: int) -> dict[str, float]:
    """What any online policy can know: how often an expert a token used at a layer is used
    again by the same sequence's next token there, the base rate (K / E), and the share of
    uses the `slots / L` most used experts of each layer would catch if pinned (an oracle:
    counted over the whole trace). A sequence's rows must be consecutive, in position order,
    as replay files store them."""
    ids = trace.expert_ids[~trace.is_prefill].long()  # [N, L, K]
    seq = trace.seq_id[~trace.is_prefill]
    N, L, K = ids.shape
    E = int(trace.num_experts or int(ids.max()) + 1)
    used = torch.zeros(N, L, E, dtype=torch.bool)
    used.scatter_(2, ids, True)
    same = seq[1:] == seq[:-1]
    a, b = used[:-1][same], used[1:][same]
    counts = used.sum(0).sort(dim=1, descending=True).values  # [L, E]
    per_layer = max(slots // L, 1)
    return dict(
        reuse_next=float((a & b).sum() / a.sum()),
        base_rate=K / E,
        static_top=float(counts[:, :per_layer].sum() / counts.sum()),
        per_layer=per_layer,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trace", required=True, help="a replay trace file or trace folder")
    p.add_argument("--slots", type=int, nargs="+", required=True, help="cache sizes (experts)")
    p.add_argument(
        "--budgets",
        nargs="+",
        type=int,
        default=[0],
        help="prefetched experts per token and layer (0: top-k)",
    )
    p.add_argument("--batch", type=int, default=1, help="sequences decoded in lockstep")
    p.add_argument("--policies", nargs="+", default=list(POLICIES))
    p.add_argument("--tokens", type=int, default=0, help="replay only the first N decode tokens")
    args = p.parse_args(argv)
    trace = load_trace(args.trace)
    if args.tokens:
        keep = (~trace.is_prefill).nonzero().flatten()[: args.tokens]
        trace.is_prefill[keep[-1] + 1 :] = True  # later rows are skipped as if prefill
    L, K = trace.expert_ids.shape[1:]
    steps = batch_steps(trace, args.batch)
    ids = trace.expert_ids.long()
    groups = [
        (layer, tuple(sorted(set(ids[step, layer].flatten().tolist()))))
        for step in steps
        for layer in range(L)
    ]
    rows = []
    for slots in args.slots:
        belady = belady_misses(groups, slots).num_misses / max(len(steps), 1)
        for budget in args.budgets:
            for policy in args.policies:
                r = replay(trace, slots, policy, budget or K, L, args.batch)
                rows.append(
                    dict(slots=slots, budget=budget or K, policy=policy, belady=belady, **r)
                )
    print(f"{len(steps)} decode steps of {args.batch} sequences, {L} MoE layers x top-{K}")
    for slots in args.slots:
        r = reuse_stats(trace, slots)
        print(
            f"  reuse at the next token {r['reuse_next']:.3f} (base rate K/E {r['base_rate']:.3f});"
            f" the {r['per_layer']} most used experts per layer ({slots} slots) catch"
            f" {r['static_top']:.3f} of the uses (oracle)"
        )
    print_table(
        rows,
        [
            ("slots", "slots", "d"),
            ("budget", "budget", "d"),
            ("policy", "policy", "s"),
            ("copied", "copied/step", ".1f"),
            ("misses", "misses/step", ".1f"),
            ("useless", "useless/step", ".1f"),
            ("belady", "belady/step", ".1f"),
            ("pick_us", "pick us", ".1f"),
        ],
    )


if __name__ == "__main__":
    main()
