"""Decode-time expert predictors for the prefetching schedule, chosen by name (PREDICTORS).

After MoE layer l routed the step's tokens, a predictor names, per token row, the `num`
experts of layer l+d it expects (d = 1..D), as a device tensor [R, num]: no host sync (the
ids ride the layer's routing sync, see offload/prefetch.py). Predictors share `StepState`,
device buffers indexed by the step context (no host list ever built per layer):

    step_ids  [T_max, L, K]   this step's routed experts of each MoE layer (activation path)
    prev_ids  [slots, L, K]   the previous token's experts per KV slot (written as each layer
                              routes: by slot in decode, from each prompt's last token in
                              prefill; 0..K-1 before a slot's first token)

- `ours`: a trained Predictor file (predictor/model.py) run as a FusedPredictor;
- `gate-lookahead`: router l+d applied to layer l's MoE input x;
- `trace-match`: MoE-Infinity-style request matching: each KV slot's activation counts [L, E]
  so far (on the device) matched by cosine against a library of request matrices (from a
  trace file, else from the requests served so far); the best match's row l+d.

Lookahead probabilities come from the MoE block's routing hook when it has
`lookahead_probs(layer_id, d, x)` (trace replay: the recorded router of the trained model),
else from softmax(router_{l+d}(x)). `ours` takes the hook's sparse form when it has one,
`lookahead_topk(layer_id, d, x)` -> (ids [T, M], probs [T, M]): no dense [T, E] row is built.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from duoserve.config import EngineConfig, ModelConfig
from duoserve.engine.context import StepContext
from duoserve.predictor.model import FORMAT, Predictor, PredictorConfig

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "predictors"
_NOTICES: set[str] = set()


class StepState:
    """Device buffers of the step's routing and each KV slot's previous token (see above)."""

    def __init__(self, cfg: ModelConfig, max_tokens: int, num_slots: int, device) -> None:
        L, K = cfg.num_moe_layers, cfg.num_experts_per_tok
        self.step_ids = torch.zeros(max_tokens, L, K, dtype=torch.long, device=device)
        first = torch.arange(K, device=device).expand(num_slots, L, K)
        self.prev_ids = first.contiguous()  # [slots, L, K]
        self.device = device
        self.ctx: StepContext | None = None
        self.last_rows_dev: torch.Tensor | None = None  # [B] last token row of each sequence
        self.seq_slots_dev: torch.Tensor | None = None  # [B] KV slot of each sequence

    def begin(self, ctx: StepContext) -> bool:
        """Adopt a new step's context; True the first time `ctx` is seen."""
        if ctx is self.ctx:
            return False
        self.ctx = ctx
        if ctx.is_pure_decode and ctx.slot_ids_dev is not None:
            self.seq_slots_dev, self.last_rows_dev = ctx.slot_ids_dev, None
        else:
            last = [o - 1 for o in ctx.token_offsets[1:]]
            to_dev = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
            self.seq_slots_dev, self.last_rows_dev = to_dev(ctx.slot_ids), to_dev(last)
        return True

    def observe(self, li: int, topk_ids: torch.Tensor) -> None:
        """Record MoE layer `li`'s routing [T, K] of the current step."""
        T = topk_ids.shape[0]
        assert self.step_ids.shape[0] >= T, f"{T} token rows exceed the step buffer"
        self.step_ids[:T, li] = topk_ids
        last = topk_ids if self.last_rows_dev is None else topk_ids[self.last_rows_dev]
        self.prev_ids[self.seq_slots_dev, li] = last  # read only for layers > li this step

    def row_slots(self, num_rows: int) -> torch.Tensor:
        """[R] KV slot of each token row of the step."""
        ctx = self.ctx
        return self.seq_slots_dev if self.last_rows_dev is None else ctx.token_slots_dev


class OnlinePredictor:
    """Base: holds the model's MoE blocks and the shared step state."""

    name = "base"

    def __init__(self, cfg: ModelConfig, blocks: list, state: StepState, **_: object) -> None:
        self.cfg, self.blocks, self.state = cfg, blocks, state
        self.layer_ids = cfg.moe_layer_ids

    def observe(self, li: int, topk_ids: torch.Tensor) -> None:
        """Called for every MoE layer's routing, in every phase (keeps per-request state)."""

    def begin(self, ctx: StepContext) -> None:
        """Called once per forward pass, before its first MoE layer."""

    def lookahead(self, li: int, d: int, x: torch.Tensor) -> torch.Tensor:
        """[T, E] probabilities of MoE layer li+d's router on layer li's MoE input x."""
        hook = getattr(self.blocks[li].routing_hook, "lookahead_probs", None)
        if hook is not None:
            probs = hook(self.layer_ids[li], d, x)
            if probs is not None:
                return probs
        return F.softmax(self.blocks[li + d].router(x).float(), dim=-1)

    def lookahead_top(
        self, li: int, d: int, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(ids [T, M], probs [T, M]): the recorded top-M of router li+d from the routing
        hook's `lookahead_topk` (-1: none); None when the hook has none (use lookahead())."""
        hook = getattr(self.blocks[li].routing_hook, "lookahead_topk", None)
        return None if hook is None else hook(self.layer_ids[li], d, x)

    def predict(self, li: int, d: int, x: torch.Tensor, num: int) -> torch.Tensor | None:
        """[R, num] expert ids of MoE layer li+d, most likely first; None: no guess."""
        raise NotImplementedError


class GateLookahead(OnlinePredictor):
    """Router l+d on layer l's MoE input (or the replayed recording of it)."""

    name = "gate-lookahead"

    def predict(self, li, d, x, num):
        return self.lookahead(li, d, x).topk(num, dim=-1).indices


class Learned(OnlinePredictor):
    """A trained Predictor (`ours`), fused for decode (predictor/runtime.py): on CUDA one
    Triton kernel per call, fed the hook's sparse lookahead and the previous tokens' experts
    by KV slot (no gathers of its own)."""

    name = "ours"
    sparse_lookahead = True  # False: always the dense [T, E] lookahead (A/B, tests)

    def __init__(self, cfg, blocks, state, predictor: Predictor, distances, device, **kw) -> None:
        super().__init__(cfg, blocks, state)
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        self.fused = predictor.fused(device, dtype, distances=tuple(distances))
        c = predictor.config
        self.path_layers = c.path_layers
        self.uses_lookahead = "lookahead" in c.features
        self.uses_prev = "prev" in c.features

    def predict(self, li, d, x, num):
        T = x.shape[0]
        lo = max(0, li + 1 - self.path_layers)
        routed = self.state.step_ids[:T, lo : li + 1]  # [T, n, K]
        probs = top = None
        if self.uses_lookahead:
            top = self.lookahead_top(li, d, x) if self.sparse_lookahead else None
            probs = self.lookahead(li, d, x) if top is None else None  # [T, E] float32
        prev = slots = None
        if self.uses_prev and self.state.last_rows_dev is None:  # decode: previous token known
            prev, slots = self.state.prev_ids[:, li + d], self.state.seq_slots_dev  # [S, K], [B]
        return self.fused.predict(
            li, routed, probs, d, prev, num=num, lookahead_top=top, prev_rows=slots
        )


class TraceMatch(OnlinePredictor):
    """Request-level activation matching (MoE-Infinity style), see the module docstring."""

    name = "trace-match"

    def __init__(self, cfg, blocks, state, device, num_kv_slots: int, **kw) -> None:
        super().__init__(cfg, blocks, state)
        L, E = cfg.num_moe_layers, cfg.num_experts
        self.max_requests = int(kw.get("max_requests", 1000))
        self.counts = torch.zeros(num_kv_slots, L, E, device=device)  # per KV slot, so far
        self.library = torch.zeros(0, L, E, device=device)  # [C, L, E] request matrices
        self.unit = torch.zeros(0, L * E, device=device)  # rows / their norms
        self.slot_used = [False] * num_kv_slots
        self.online = True  # add finished requests to the library
        self.one = torch.ones(1, device=device)
        self.version = 0  # bumped with each new library: captured decode graphs are stale then

    def set_library(self, matrices: torch.Tensor, online: bool = False) -> None:
        """Use `matrices` [C, L, E] (activation counts of whole requests) as the library."""
        m = matrices[-self.max_requests :].to(self.counts.device, torch.float32)
        self.library = m
        self.unit = m.flatten(1) / m.flatten(1).norm(dim=1, keepdim=True).clamp_min(1e-6)
        self.online = online
        self.version += 1

    def begin(self, ctx: StepContext) -> None:
        if ctx.phase != "prefill":
            return
        for slot, start in zip(ctx.slot_ids, ctx.start_positions):
            if start == 0:  # a new request takes this slot: file the previous one
                if self.slot_used[slot] and self.online:
                    self.set_library(torch.cat([self.library, self.counts[slot][None]]), True)
                self.counts[slot].zero_()
                self.slot_used[slot] = True

    def observe(self, li, topk_ids):
        slots = self.state.row_slots(topk_ids.shape[0])
        index = (slots[:, None].expand_as(topk_ids), torch.full_like(topk_ids, li), topk_ids)
        self.counts.index_put_(index, self.one.expand(topk_ids.shape), accumulate=True)

    def predict(self, li, d, x, num):
        if self.library.shape[0] == 0:
            return None
        slots = self.state.row_slots(x.shape[0])
        current = self.counts[slots].flatten(1)  # [R, L*E]
        best = (current @ self.unit.T).argmax(dim=-1)  # [R] (cosine: |current| is common)
        return self.library[best, li + d].topk(num, dim=-1).indices


PREDICTORS: dict[str, type[OnlinePredictor]] = {
    cls.name: cls for cls in (Learned, GateLookahead, TraceMatch)
}


def topology_of(cfg: ModelConfig) -> tuple[int, int, int]:
    return (cfg.num_moe_layers, cfg.num_experts, cfg.num_experts_per_tok)


def _file_config(path: Path) -> PredictorConfig | None:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        return None
    return PredictorConfig(**json.loads(meta["config"]))


def find_predictor_file(cfg: ModelConfig, distances: tuple[int, ...]) -> Path | None:
    """The shipped predictor (assets/predictors/*.safetensors) of this model's topology."""
    for path in sorted(ASSETS.glob("*.safetensors")) if ASSETS.is_dir() else []:
        c = _file_config(path)
        matches = c and (c.num_layers, c.num_experts, c.top_k) == topology_of(cfg)
        if matches and set(distances) <= set(c.distances):
            return path
    return None


def notice(message: str) -> None:
    """Print a notice once per process."""
    if message not in _NOTICES:
        _NOTICES.add(message)
        print(f"[duoserve] {message}", file=sys.stderr)


def build_predictor(
    name: str,
    cfg: ModelConfig,
    engine: EngineConfig,
    blocks: list,
    state: StepState,
    distances: tuple[int, ...],
    device: torch.device,
    num_kv_slots: int,
) -> OnlinePredictor:
    """The named runtime predictor; `ours` resolves engine.predictor (see module docstring)."""
    if name not in PREDICTORS:
        raise ValueError(f"unknown prefetch predictor {name!r}; known: {', '.join(PREDICTORS)}")
    kw = dict(device=device, num_kv_slots=num_kv_slots, distances=distances)
    if name == "ours":
        path = engine.predictor
        if path == "auto":
            found = find_predictor_file(cfg, distances)
            if found is None:
                L, E, K = topology_of(cfg)
                notice(
                    f"no shipped predictor for {L} MoE layers x {E} experts, top-{K} "
                    f"(distances {distances}) in {ASSETS}: prefetching with gate-lookahead"
                )
                return GateLookahead(cfg, blocks, state, **kw)
            path = str(found)
        predictor = load_matching(Path(path), cfg, distances)
        return Learned(cfg, blocks, state, predictor=predictor, **kw)
    cls = PREDICTORS[name]
    out = cls(cfg, blocks, state, **kw)
    if name == "trace-match" and engine.predictor not in ("auto", ""):
        out.set_library(library_from_trace(engine.predictor, cfg.num_experts))
    return out


def load_matching(path: Path, cfg: ModelConfig, distances: tuple[int, ...]) -> Predictor:
    """Load a predictor file, refusing one trained for another topology or distances."""
    if not path.is_file():
        raise ValueError(f"predictor file {path} does not exist")
    c = _file_config(path)
    if c is None:
        raise ValueError(f"{path}: not a duoserve predictor file")
    L, E, K = topology_of(cfg)
    if (c.num_layers, c.num_experts, c.top_k) != (L, E, K):
        raise ValueError(
            f"predictor {path} was trained for {c.num_layers} MoE layers x {c.num_experts} "
            f"experts, top-{c.top_k}; this model has {L} x {E}, top-{K}"
        )
    if not set(distances) <= set(c.distances):
        raise ValueError(
            f"predictor {path} predicts distances {c.distances}; prefetching needs {distances} "
            "(lower --prefetch-distance)"
        )
    return Predictor.load(path)


def library_from_trace(
    path: str | Path, num_experts: int, exclude_starts: frozenset[int] = frozenset()
) -> torch.Tensor:
    """[C, L, E] activation counts of each sequence of a replay trace file (new format:
    `seq_start`; old: windows of its `seq_len` metadata), skipping sequences starting at a
    row in `exclude_starts` (those a benchmark replays)."""
    from duoserve.predictor.replay_file import read_replay

    data = read_replay(path)
    ids = data.expert_ids  # [L, N, K]
    N = ids.shape[1]
    if data.seq_start is not None:
        starts = data.seq_start.tolist()
    else:
        window = int(data.meta.get("seq_len", 512))
        starts = list(range(0, N, window))
    ends = [*starts[1:], N]
    out = []
    for a, b in zip(starts, ends):
        if a in exclude_starts or b <= a:
            continue
        hot = F.one_hot(ids[:, a:b].clamp_min(0), num_experts).sum(dim=(1, 2))  # [L, E]
        out.append(hot.float())
    assert out, f"{path}: no sequences left for the trace-match library"
    return torch.stack(out)
