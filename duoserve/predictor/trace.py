"""Routing traces: what every token routed at every MoE layer, stored without pickle.

A trace folder holds `meta.json` and chunks `chunk-00000.safetensors`, ... Each chunk holds
N token rows (N differs per chunk; rows are in the order the engine computed them):

    expert_ids       [N, L, K]     int16  routed experts, in router top-k order
    weights          [N, L, K]     f16    their router weights (after top-k renormalisation)
    is_prefill       [N]           uint8  1: prompt token (prefill step), 0: decode token
    seq_id           [N]           int32  request index (line of the prompts file)
    position         [N]           int32  position of the token in its sequence
    step             [N]           int32  engine step that computed the token
    lookahead_ids    [N, L, D, M]  int16  top-M experts of router l+d applied to layer l's
                                          MoE input (d = 1..D); -1 where l+d >= L
    lookahead_probs  [N, L, D, M]  f16    their softmax probabilities (over all E experts)

L counts MoE layers only (`topology.moe_layer_ids` maps them to model layers), E experts,
K top-k. `meta.json`: format, version, model, topology {num_layers, moe_layer_ids,
num_experts, top_k}, lookahead {distances D, width M}, prompts file, token counts, chunks.

`load_trace` also reads replay files (replay_file.py: the shipped, compact format) and the
training module's `routing_trace.safetensors` (expert_ids
[L, N, K] of teacher-forced held-out windows, see duoserve/training/evaluate.py): it has no
weights and no lookahead fields, its windows become sequences, and every token is marked
decode (teacher forcing routes each token exactly as decoding the same text would).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from duoserve.offload.simulate import AccessGroup

FORMAT = "duoserve-routing-trace"
VERSION = 1
ROW_FIELDS = ("expert_ids", "weights", "is_prefill", "seq_id", "position", "step")
LOOKAHEAD_FIELDS = ("lookahead_ids", "lookahead_probs")
DTYPES = {
    "expert_ids": torch.int16,
    "weights": torch.float16,
    "is_prefill": torch.uint8,
    "seq_id": torch.int32,
    "position": torch.int32,
    "step": torch.int32,
    "lookahead_ids": torch.int16,
    "lookahead_probs": torch.float16,
}


@dataclass
class RoutingTrace:
    """N token rows of routing (layout in the module docstring), CPU tensors."""

    expert_ids: torch.Tensor  # [N, L, K]
    seq_id: torch.Tensor  # [N]
    position: torch.Tensor  # [N]
    is_prefill: torch.Tensor  # [N] bool
    step: torch.Tensor  # [N]
    num_experts: int
    weights: torch.Tensor | None = None  # [N, L, K]
    lookahead_ids: torch.Tensor | None = None  # [N, L, D, M]
    lookahead_probs: torch.Tensor | None = None  # [N, L, D, M]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        N = self.expert_ids.shape[0]
        assert self.expert_ids.dim() == 3, "expert_ids must be [N, L, K]"
        for name in ("seq_id", "position", "is_prefill", "step"):
            assert getattr(self, name).shape == (N,), f"{name} must be [N={N}]"
        if self.lookahead_ids is not None:
            assert self.lookahead_ids.shape[:2] == self.expert_ids.shape[:2], "lookahead [N, L]"

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def num_layers(self) -> int:
        return self.expert_ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[2]

    @property
    def max_distance(self) -> int:
        """D: the largest lookahead distance recorded (0 without lookahead fields)."""
        return 0 if self.lookahead_ids is None else self.lookahead_ids.shape[2]

    def select(self, rows: torch.Tensor) -> RoutingTrace:
        """The trace restricted to `rows` (a bool mask [N] or an index tensor)."""
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return replace(
            self,
            expert_ids=self.expert_ids[rows],
            seq_id=self.seq_id[rows],
            position=self.position[rows],
            is_prefill=self.is_prefill[rows],
            step=self.step[rows],
            weights=pick(self.weights),
            lookahead_ids=pick(self.lookahead_ids),
            lookahead_probs=pick(self.lookahead_probs),
        )

    def tokens(self, which: str) -> RoutingTrace:
        """Only "prefill" tokens, only "decode" tokens, or "all"."""
        if which == "all":
            return self
        assert which in ("prefill", "decode"), f"tokens must be all|prefill|decode, not {which}"
        return self.select(self.is_prefill if which == "prefill" else ~self.is_prefill)

    def by_sequence(self) -> RoutingTrace:
        """Rows sorted by (seq_id, position): each sequence's tokens in order."""
        key = self.seq_id.long() * (1 << 32) + self.position.long()
        return self.select(torch.argsort(key, stable=True))

    def prev_index(self) -> torch.Tensor:
        """[N] row of the same sequence's previous position, or -1 (rows by_sequence())."""
        prev = torch.full((self.num_tokens,), -1, dtype=torch.long)
        if self.num_tokens > 1:
            same = (self.seq_id[1:] == self.seq_id[:-1]) & (
                self.position[1:] == self.position[:-1] + 1
            )
            prev[1:][same] = torch.arange(self.num_tokens - 1)[same]
        return prev


def concat_traces(traces: Sequence[RoutingTrace]) -> RoutingTrace:
    """One trace from several; sequence ids and steps are offset so they stay distinct."""
    assert traces, "no traces to concatenate"
    first = traces[0]
    for t in traces[1:]:
        assert t.expert_ids.shape[1:] == first.expert_ids.shape[1:], "topologies differ"
        assert t.num_experts == first.num_experts, "expert counts differ"
    seq_ids, steps, seq_base, step_base = [], [], 0, 0
    for t in traces:
        seq_ids.append(t.seq_id + seq_base)
        steps.append(t.step + step_base)
        seq_base += int(t.seq_id.max()) + 1 if t.num_tokens else 0
        step_base += int(t.step.max()) + 1 if t.num_tokens else 0
    opt = lambda name: (  # noqa: E731
        torch.cat([getattr(t, name) for t in traces])
        if all(getattr(t, name) is not None for t in traces)
        else None
    )
    return RoutingTrace(
        expert_ids=torch.cat([t.expert_ids for t in traces]),
        seq_id=torch.cat(seq_ids),
        position=torch.cat([t.position for t in traces]),
        is_prefill=torch.cat([t.is_prefill for t in traces]),
        step=torch.cat(steps),
        num_experts=first.num_experts,
        weights=opt("weights"),
        lookahead_ids=opt("lookahead_ids"),
        lookahead_probs=opt("lookahead_probs"),
        meta={**first.meta, "sources": [t.meta.get("source") for t in traces]},
    )


class TraceWriter:
    """Writes a trace folder chunk by chunk; `close()` writes meta.json.

    `add(rows)` takes a dict of the ROW_FIELDS (+ LOOKAHEAD_FIELDS) tensors for some tokens.
    """

    def __init__(self, out_dir: str | Path, meta: dict[str, Any], chunk_tokens: int = 65536):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if (self.out_dir / "meta.json").exists():
            raise ValueError(f"{self.out_dir} already holds a trace: choose another folder")
        self.meta = {"format": FORMAT, "version": VERSION, **meta, "chunks": []}
        self.chunk_tokens = chunk_tokens
        self._pending: list[dict[str, torch.Tensor]] = []
        self._num_pending = 0
        self.counts = {"num_tokens": 0, "num_prefill_tokens": 0, "num_decode_tokens": 0}

    def add(self, rows: dict[str, torch.Tensor]) -> None:
        n = rows["expert_ids"].shape[0]
        self._pending.append({k: v.to("cpu", DTYPES[k]) for k, v in rows.items()})
        self._num_pending += n
        num_prefill = int(rows["is_prefill"].sum())
        self.counts["num_tokens"] += n
        self.counts["num_prefill_tokens"] += num_prefill
        self.counts["num_decode_tokens"] += n - num_prefill
        if self._num_pending >= self.chunk_tokens:
            self.flush()

    def flush(self) -> None:
        """Write the pending rows as one chunk."""
        if not self._pending:
            return
        keys = self._pending[0].keys()
        tensors = {k: torch.cat([p[k] for p in self._pending]).contiguous() for k in keys}
        name = f"chunk-{len(self.meta['chunks']):05d}.safetensors"
        save_file(tensors, str(self.out_dir / name), metadata={"format": FORMAT})
        self.meta["chunks"].append({"file": name, "num_tokens": self._num_pending})
        self._pending, self._num_pending = [], 0

    def close(self) -> Path:
        """Flush and write meta.json; returns the folder."""
        self.flush()
        self.meta.update(self.counts, written=time.strftime("%Y-%m-%d %H:%M:%S"))
        (self.out_dir / "meta.json").write_text(json.dumps(self.meta, indent=1) + "\n")
        return self.out_dir


def save_trace(trace: RoutingTrace, out_dir: str | Path, chunk_tokens: int = 65536) -> Path:
    """Write `trace` as a trace folder (meta from trace.meta; topology from its shapes)."""
    meta = dict(trace.meta)
    meta.setdefault("topology", {})
    meta["topology"] = {
        **meta["topology"],
        "num_layers": trace.num_layers,
        "num_experts": trace.num_experts,
        "top_k": trace.top_k,
    }
    writer = TraceWriter(out_dir, meta, chunk_tokens)
    rows = {k: getattr(trace, k) for k in ROW_FIELDS + LOOKAHEAD_FIELDS}
    rows["is_prefill"] = trace.is_prefill.to(torch.uint8)
    if trace.weights is None:
        rows["weights"] = torch.zeros(trace.expert_ids.shape, dtype=torch.float16)
    for start in range(0, trace.num_tokens, chunk_tokens):
        writer.add({k: v[start : start + chunk_tokens] for k, v in rows.items() if v is not None})
    return writer.close()


def _read_chunk(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _load_folder(folder: Path) -> RoutingTrace:
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder}/meta.json: format is {meta.get('format')!r}, not {FORMAT}")
    chunks = [_read_chunk(folder / c["file"]) for c in meta["chunks"]]
    if not chunks:
        raise ValueError(f"{folder}: the trace has no chunks (no tokens were recorded)")
    cat = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
    return RoutingTrace(
        expert_ids=cat["expert_ids"],
        seq_id=cat["seq_id"],
        position=cat["position"],
        is_prefill=cat["is_prefill"].bool(),
        step=cat["step"],
        num_experts=int(meta["topology"]["num_experts"]),
        weights=cat.get("weights"),
        lookahead_ids=cat.get("lookahead_ids"),
        lookahead_probs=cat.get("lookahead_probs"),
        meta={**meta, "source": str(folder)},
    )


def _training_num_experts(path: Path, expert_ids: torch.Tensor) -> int:
    """E from the run folder's eval.json or model/config.json, else the largest id + 1."""
    eval_json = path.parent / "eval.json"
    if eval_json.is_file():
        return int(json.loads(eval_json.read_text())["routing"]["num_experts"])
    config = path.parent / "model" / "config.json"
    if config.is_file():
        raw = json.loads(config.read_text())
        return int(raw.get("num_local_experts") or raw["num_experts"])
    return int(expert_ids.max()) + 1


def _load_training_trace(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> RoutingTrace:
    expert_ids = tensors["expert_ids"].to(torch.int16).permute(1, 0, 2).contiguous()  # [N, L, K]
    N = expert_ids.shape[0]
    seq_len = int(meta.get("seq_len", N))
    rows = torch.arange(N, dtype=torch.int32)
    return RoutingTrace(
        expert_ids=expert_ids,
        seq_id=rows // seq_len,
        position=rows % seq_len,
        is_prefill=torch.zeros(N, dtype=torch.bool),
        step=rows,
        num_experts=_training_num_experts(path, expert_ids),
        meta={
            "format": "training-routing-trace",
            "source": str(path),
            "model": path.parent.name,
            "seq_len": seq_len,
            "note": "teacher-forced held-out windows; no weights or lookahead fields",
        },
    )


def load_trace(path: str | Path) -> RoutingTrace:
    """Read a trace folder, one chunk file, a replay file (replay_file.py) or a training
    `routing_trace.safetensors`."""
    path = Path(path)
    if path.is_dir():
        return _load_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no trace folder or file here")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") == FORMAT:
        return _load_folder(path.parent)
    if meta.get("format") == "duoserve-replay-trace":  # shipped file (replay_file.py)
        from duoserve.predictor.replay_file import replay_to_trace

        return replay_to_trace(path)
    tensors = _read_chunk(path)
    if "expert_ids" not in tensors or tensors["expert_ids"].dim() != 3:
        raise ValueError(f"{path}: expected expert_ids [L, N, K] (training routing trace)")
    return _load_training_trace(path, tensors, meta)


def load_traces(paths: Sequence[str | Path]) -> RoutingTrace:
    """load_trace for each path, concatenated (see concat_traces)."""
    traces = [load_trace(p) for p in paths]
    return traces[0] if len(traces) == 1 else concat_traces(traces)


def split_by_sequence(trace: RoutingTrace, holdout_fraction: float, seed: int = 0):
    """(train, held-out) traces with whole sequences on each side, chosen at random."""
    seqs = torch.unique(trace.seq_id)
    gen = torch.Generator().manual_seed(seed)
    order = seqs[torch.randperm(seqs.numel(), generator=gen)]
    num_held = max(1, round(holdout_fraction * seqs.numel()))
    assert num_held < seqs.numel(), "need at least two sequences to split"
    held = torch.isin(trace.seq_id, order[:num_held])
    return trace.select(~held), trace.select(held)


def access_groups(
    trace: RoutingTrace, tokens: str = "decode", by: str = "step"
) -> list[AccessGroup]:
    """The trace as offload.simulate access groups, for Belady bounds and cache replays.

    by="step": one group per (engine step, layer), the union of that step's tokens' experts
    (what a batched decode step fetches); by="token": one group per (token, layer), tokens in
    trace order. Steps are in the order they ran; groups are step-major, layer-minor.
    """
    sub = trace.tokens(tokens)
    ids = sub.expert_ids.long()  # [N, L, K]
    if by == "token":
        key = torch.arange(sub.num_tokens)
    else:
        assert by == "step", f"by must be step|token, not {by}"
        key = sub.step.long()
    order = torch.argsort(key, stable=True)
    ids, key = ids[order], key[order]
    _, counts = torch.unique_consecutive(key, return_counts=True)
    groups: list[AccessGroup] = []
    for block in torch.split(ids, counts.tolist()):  # [n, L, K] tokens of one step
        for layer in range(sub.num_layers):
            groups.append((layer, tuple(sorted(set(block[:, layer].flatten().tolist())))))
    return groups
