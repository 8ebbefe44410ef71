"""Replay traces: one compact safetensors file of routing plus gate lookahead, for shipping.

`duoserve/assets/traces/<topology>.heldout.safetensors` files, read by
`duoserve.bench.replay.TraceReplay` (forced routing for full-size random-weight models) and by
`trace.load_trace` (predictor evaluation). Rows are whole sequences of a tracer trace folder,
concatenated in (sequence, position) order (L MoE layers, N tokens, K top-k, S sequences,
D lookahead distances, M lookahead width):

    expert_ids       [L, N, K]     uint8 (int16 if E > 255)  routed experts, router order
    seq_start        [S]           int32   first row of each sequence (ascending, [0] = 0)
    is_prefill       [N]           uint8   1: prompt token, 0: decode token
    lookahead_ids    [L, N, D, M]  uint8 (int16 if E > 255)  top-M experts of router l+d on
                                           layer l's MoE input; NONE (255 / -1) where l+d >= L
    lookahead_probs  [L, N, D, M]  uint8   their softmax probabilities, log-quantized:
                                           q = round(255 * (1 + ln(max(p, 1e-4)) / ln(1e4))),
                                           p = 1e-4 ** (1 - q / 255) (relative error <= 1.8 %);
                                           0 where the id is NONE

Metadata (strings): format `duoserve-replay-trace`, version, num_experts, top_k,
lookahead_distances (e.g. "1" or "1,2"; index j of dim D is distance distances[j]),
lookahead_width, probs_encoding, model, source, command. The lookahead fields are optional;
the older format (expert_ids [L, N, K] only, teacher-forced windows) still reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from duoserve.predictor.trace import RoutingTrace

FORMAT = "duoserve-replay-trace"
VERSION = 1
PROB_FLOOR = 1e-4
PROBS_ENCODING = "log-uint8: p = 1e-4 ** (1 - q / 255) where the id is valid, else 0"


def quantize_probs(probs: torch.Tensor) -> torch.Tensor:
    """Probabilities -> uint8 codes on a log scale from 1e-4 (code 0) to 1 (code 255)."""
    scaled = 1.0 + probs.float().clamp(PROB_FLOOR, 1.0).log() / math.log(1.0 / PROB_FLOOR)
    return (255.0 * scaled).round().to(torch.uint8)


def dequantize_probs(codes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """uint8 codes -> float32 probabilities (0 where `valid` is False)."""
    probs = PROB_FLOOR ** (1.0 - codes.float() / 255.0)
    return torch.where(valid, probs, 0.0)


def _id_dtype(num_experts: int) -> torch.dtype:
    return torch.uint8 if num_experts <= 255 else torch.int16


def _none_id(dtype: torch.dtype) -> int:
    return 255 if dtype == torch.uint8 else -1


def bytes_per_token(trace: RoutingTrace, num_distances: int, width: int) -> int:
    """File bytes one token row costs (routing, lookahead and the prefill flag)."""
    b = torch.empty(0, dtype=_id_dtype(trace.num_experts)).element_size()
    lookahead = num_distances * width * (b + 1)
    return trace.num_layers * (trace.top_k * b + lookahead) + 1


def pick_sequences(lengths: torch.Tensor, token_budget: int) -> torch.Tensor:
    """Indices of sequences spread evenly over all of them, as many as fit the budget."""
    S = lengths.numel()
    for n in range(S, 0, -1):
        pick = torch.unique(torch.linspace(0, S - 1, n).round().long())
        if int(lengths[pick].sum()) <= token_budget:
            return pick
    raise ValueError(f"not even one sequence fits {token_budget} tokens")


def write_replay(
    trace: RoutingTrace,
    path: str | Path,
    max_bytes: int = 12 << 20,
    distances: tuple[int, ...] = (1,),
    width: int | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the sequences of `trace` that fit `max_bytes` as a replay file; returns a
    summary (tokens, sequences, bytes). distances: empty for no lookahead fields; width M
    defaults to all the trace holds."""
    trace = trace.by_sequence()
    seqs, lengths = torch.unique_consecutive(trace.seq_id, return_counts=True)
    starts = torch.cumsum(lengths, 0) - lengths
    offset = torch.arange(trace.num_tokens) - starts.repeat_interleave(lengths)
    first = trace.position.long()[starts].repeat_interleave(lengths)
    assert bool((trace.position == first + offset).all()), "sequences must have no gaps"
    if distances:
        assert trace.lookahead_ids is not None, "the trace has no lookahead fields"
        assert max(distances) <= trace.max_distance, f"trace holds d <= {trace.max_distance}"
    width = width or (trace.lookahead_ids.shape[3] if distances else 0)
    per_token = bytes_per_token(trace, len(distances), width)
    pick = pick_sequences(lengths, (max_bytes - 8192) // (per_token + 1))  # header: < 8 KiB
    rows = torch.cat([torch.arange(starts[i], starts[i] + lengths[i]) for i in pick.tolist()])
    sub = trace.select(rows)
    id_dtype = _id_dtype(trace.num_experts)
    tensors = {
        "expert_ids": sub.expert_ids.permute(1, 0, 2).to(id_dtype).contiguous(),
        "seq_start": (torch.cumsum(lengths[pick], 0) - lengths[pick]).to(torch.int32),
        "is_prefill": sub.is_prefill.to(torch.uint8),
    }
    if distances:
        index = torch.tensor([d - 1 for d in distances])
        ids = sub.lookahead_ids[:, :, index, :width].long()  # [N, L, D, M]
        valid = ids >= 0
        codes = torch.where(valid, quantize_probs(sub.lookahead_probs[:, :, index, :width]), 0)
        ids = torch.where(valid, ids, _none_id(id_dtype))
        tensors["lookahead_ids"] = ids.permute(1, 0, 2, 3).to(id_dtype).contiguous()
        tensors["lookahead_probs"] = codes.to(torch.uint8).permute(1, 0, 2, 3).contiguous()
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "num_experts": str(trace.num_experts),
        "top_k": str(trace.top_k),
        "lookahead_distances": ",".join(map(str, distances)),
        "lookahead_width": str(width),
        "probs_encoding": PROBS_ENCODING,
        "model": str(trace.meta.get("model", "")),
        "source": str(trace.meta.get("source", "")),
        "layout": "rows = whole sequences concatenated; see duoserve/predictor/replay_file.py",
        **{k: str(v) for k, v in (meta or {}).items()},
    }
    save_file(tensors, str(path), metadata=metadata)
    size = Path(path).stat().st_size
    assert size <= max_bytes, f"{path}: {size} bytes > {max_bytes}"
    return {
        "tokens": sub.num_tokens,
        "sequences": int(pick.numel()),
        "of_sequences": int(seqs.numel()),
        "of_tokens": trace.num_tokens,
        "bytes": size,
        "distances": list(distances),
        "width": width,
    }


@dataclass
class ReplayData:
    """A replay file's tensors (CPU; ids int64 with -1 = none, probs float32)."""

    expert_ids: torch.Tensor  # [L, N, K]
    num_experts: int | None  # None in the old format (no metadata)
    seq_start: torch.Tensor | None = None  # [S]
    is_prefill: torch.Tensor | None = None  # [N] bool
    lookahead_ids: torch.Tensor | None = None  # [L, N, D, M]
    lookahead_probs: torch.Tensor | None = None  # [L, N, D, M]
    distances: tuple[int, ...] = ()
    meta: dict[str, str] = field(default_factory=dict)


def read_replay(path: str | Path) -> ReplayData:
    """Read a replay file, new format or old (expert_ids [L, N, K] only)."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    ids = tensors.get("expert_ids")
    if ids is None or ids.dim() != 3:
        raise ValueError(f"{path}: expected expert_ids [layers, tokens, k]")
    data = ReplayData(ids.long(), None, meta=meta)
    if meta.get("format") != FORMAT:
        return data
    if int(meta.get("version", "0")) > VERSION:
        raise ValueError(f"{path}: replay format version {meta['version']} is newer than {VERSION}")
    data.num_experts = int(meta["num_experts"])
    data.seq_start = tensors["seq_start"].long()
    data.is_prefill = tensors["is_prefill"].bool()
    if "lookahead_ids" in tensors:
        raw = tensors["lookahead_ids"]
        la = raw.long()
        valid = la != _none_id(raw.dtype)
        data.lookahead_ids = torch.where(valid, la, -1)
        data.lookahead_probs = dequantize_probs(tensors["lookahead_probs"], valid)
        data.distances = tuple(int(d) for d in meta["lookahead_distances"].split(","))
    return data


def replay_to_trace(path: str | Path) -> RoutingTrace:
    """A replay file as a RoutingTrace (no router weights; step = row; lookahead distances
    d = 1..D only when the file holds exactly those)."""
    data = read_replay(path)
    assert data.seq_start is not None, f"{path}: not a {FORMAT} file"
    N = data.expert_ids.shape[1]
    lengths = torch.diff(data.seq_start, append=torch.tensor([N]))
    rows = torch.arange(N)
    seq_id = torch.arange(data.seq_start.numel()).repeat_interleave(lengths)
    la_ids = la_probs = None
    if data.lookahead_ids is not None and data.distances == tuple(
        range(1, len(data.distances) + 1)
    ):
        la_ids = data.lookahead_ids.permute(1, 0, 2, 3).to(torch.int16)  # [N, L, D, M]
        la_probs = data.lookahead_probs.permute(1, 0, 2, 3).to(torch.float16)
    return RoutingTrace(
        expert_ids=data.expert_ids.permute(1, 0, 2).to(torch.int16).contiguous(),
        seq_id=seq_id.to(torch.int32),
        position=(rows - data.seq_start[seq_id]).to(torch.int32),
        is_prefill=data.is_prefill,
        step=rows.to(torch.int32),
        num_experts=int(data.num_experts or 0),
        lookahead_ids=la_ids,
        lookahead_probs=la_probs,
        meta={
            "format": FORMAT,
            "source": str(path),
            "model": data.meta.get("model", ""),
            "replay_meta": json.dumps(data.meta),
        },
    )
