"""A compact MoE decoder with the math of transformers' Mixtral and Qwen3-MoE models.

Both families: pre-norm decoder layers (RMSNorm computed in fp32), default RoPE with the
half-rotation layout, grouped-query attention, a softmax router over all experts, top-k,
SiLU-gated experts, untied lm_head. Differences: Qwen3-MoE adds an RMSNorm over each head's
query and key before RoPE and renormalizes the top-k weights only when ``norm_topk_prob``;
Mixtral always renormalizes. The exporter in ``checkpoint`` writes the on-disk names.

Experts are stored stacked (``w_gate [E, F, H]``) and computed token-sorted: one grouped
GEMM per projection (``torch._grouped_mm``, groups padded to 16 rows) when it is available
and passes a self-check, else a loop over experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

FAMILIES = ("mixtral", "qwen3_moe")
GROUP_ALIGN_ROWS = 16  # grouped GEMM groups start on 16-row boundaries


@dataclass(frozen=True)
class MoeConfig:
    """Architecture of one model; the same fields become the HF config.json."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    norm_topk_prob: bool = True
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048

    def __post_init__(self) -> None:
        assert self.family in FAMILIES, f"family {self.family!r} not in {FAMILIES}"
        assert self.num_heads % self.num_kv_heads == 0, "heads must be a multiple of kv heads"
        assert 0 < self.top_k <= self.num_experts, "need 0 < top_k <= num_experts"
        assert self.head_dim % 2 == 0, "RoPE needs an even head_dim"
        if self.family == "mixtral":
            assert self.norm_topk_prob, "Mixtral always renormalizes the top-k weights"

    @property
    def has_qk_norm(self) -> bool:
        """Qwen3 normalizes each head's query and key."""
        return self.family == "qwen3_moe"

    @property
    def num_params(self) -> int:
        """Total parameter count (all experts)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        experts = self.num_experts * 3 * h * self.expert_intermediate_size
        norms = 2 * h + (2 * d if self.has_qk_norm else 0)
        per_layer = attn + experts + self.num_experts * h + norms
        return 2 * self.vocab_size * h + h + self.num_layers * per_layer

    @property
    def num_active_params(self) -> int:
        """Parameters used per token (top_k of the experts)."""
        inactive = (self.num_experts - self.top_k) * 3 * self.hidden_size
        return self.num_params - self.num_layers * inactive * self.expert_intermediate_size


class RMSNorm(nn.Module):
    """RMSNorm as HF computes it: normalize in fp32, cast back, then scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(num_positions: int, cfg: MoeConfig, device: torch.device) -> tuple:
    """fp32 ``cos, sin`` of shape ``[S, D]`` for the default RoPE type."""
    d = cfg.head_dim
    # inv_freq on the CPU as HF computes it; the rest on the device (no pageable copy of
    # [S, D], which would wait for the device's queue).
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    positions = torch.arange(num_positions, dtype=torch.float32, device=device)
    freqs = positions[:, None] * inv_freq.to(device)[None, :]  # [S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # In x's dtype, as HF does (cos/sin are cast to the activation dtype).
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    """Causal GQA self-attention (kv head ``h // n_rep`` serves query head ``h``)."""

    def __init__(self, cfg: MoeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        if cfg.has_qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # B batch, S sequence, N query heads, G kv heads, D head dim
        cfg = self.cfg
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).view(b, s, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).view(b, s, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        if cfg.has_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # .to(v.dtype): under autocast the q/k norms return fp32 (fp32 weight * x).
        q = _apply_rope(q.transpose(1, 2).to(v.dtype), cos, sin)  # [B, N, S, D]
        k = _apply_rope(k.transpose(1, 2).to(v.dtype), cos, sin)  # [B, G, S, D]
        n_rep = cfg.num_heads // cfg.num_kv_heads
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, N, S, D]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


def _experts_grouped(x_sorted, row_w, w_gate, w_up, w_down, sorted_ids, counts):
    """Grouped-GEMM experts on token-sorted rows; groups padded to GROUP_ALIGN_ROWS."""
    # A assignments (T*K), E experts, M padded rows (static bound, no host sync), F, H
    num_assign, num_experts = x_sorted.shape[0], counts.shape[0]
    align = GROUP_ALIGN_ROWS
    num_rows = (num_assign + align - 1) // align * align + num_experts * align
    padded = (counts + align - 1) // align * align  # [E]
    padded_end = padded.cumsum(0)
    group_start = counts.cumsum(0) - counts
    rank = torch.arange(num_assign, device=x_sorted.device) - group_start[sorted_ids]
    dest = (padded_end - padded)[sorted_ids] + rank  # [A] row of each assignment
    offsets = padded_end.clone()
    offsets[-1] = num_rows  # the last group absorbs the spare zero rows
    offsets = offsets.to(torch.int32)
    x_pad = x_sorted.new_zeros(num_rows, x_sorted.shape[1]).index_copy(0, dest, x_sorted)
    w_pad = row_w.new_zeros(num_rows).index_copy(0, dest, row_w)  # [M]
    gate = torch._grouped_mm(x_pad, w_gate.transpose(-2, -1), offs=offsets)  # [M, F]
    up = torch._grouped_mm(x_pad, w_up.transpose(-2, -1), offs=offsets)
    # The routing weight scales h before the (linear) down projection: same sum, and
    # no [A, H] fp32 product is kept for backward.
    hidden = F.silu(gate) * up * w_pad[:, None]
    y_pad = torch._grouped_mm(hidden, w_down.transpose(-2, -1), offs=offsets)  # [M, H]
    return y_pad[dest]  # [A, H]


def _experts_loop(x_sorted, row_w, w_gate, w_up, w_down, counts):
    """Reference experts: one slice per expert (host sync on the counts)."""
    outs, start = [], 0
    for expert, num in enumerate(counts.tolist()):
        if num == 0:
            continue
        xe, we = x_sorted[start : start + num], row_w[start : start + num, None]
        he = F.silu(F.linear(xe, w_gate[expert])) * F.linear(xe, w_up[expert]) * we
        outs.append(F.linear(he, w_down[expert]))
        start += num
    return torch.cat(outs)


@dataclass
class Routing:
    """One MoE layer's routing: full softmax ``probs [T, E]`` (fp32) and ``top_ids [T, K]``."""

    probs: torch.Tensor
    top_ids: torch.Tensor
    counts: torch.Tensor = field(repr=False)  # [E] assignments per expert

    def aux_loss(self) -> torch.Tensor:
        """Switch-style balance loss E * sum_e(frac_e * mean_prob_e); 1.0 when uniform."""
        frac = self.counts.float() / self.top_ids.numel()
        return self.probs.shape[-1] * (frac * self.probs.mean(0)).sum()


class SparseMoe(nn.Module):
    """Softmax router, top-k, SiLU-gated experts stored as stacked tensors."""

    def __init__(self, cfg: MoeConfig) -> None:
        super().__init__()
        e, f, h = cfg.num_experts, cfg.expert_intermediate_size, cfg.hidden_size
        self.cfg = cfg
        self.router = nn.Parameter(torch.empty(e, h))
        self.w_gate = nn.Parameter(torch.empty(e, f, h))
        self.w_up = nn.Parameter(torch.empty(e, f, h))
        self.w_down = nn.Parameter(torch.empty(e, h, f))
        self.backend = "loop"  # set by MoeForCausalLM.set_expert_backend

    def route(self, x: torch.Tensor) -> tuple[Routing, torch.Tensor]:
        """Routing of ``x [T, H]`` plus the (renormalized) top-k weights ``[T, K]``."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.float())  # [T, E]
        probs = logits.softmax(dim=-1)
        top_w, top_ids = probs.topk(self.cfg.top_k, dim=-1)  # [T, K]
        if self.cfg.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        # scatter_add, not bincount: bincount reads the max on the host (a sync per layer).
        flat_ids = top_ids.reshape(-1)
        counts = torch.zeros(self.cfg.num_experts, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
        return Routing(probs, top_ids, counts), top_w

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        # T tokens, H hidden, K top-k, A = T*K assignments
        routing, top_w = self.route(x)
        k = self.cfg.top_k
        flat_ids = routing.top_ids.reshape(-1)  # [A]
        order = flat_ids.argsort(stable=True)
        token_of = order // k  # [A] source token of each sorted assignment
        amp = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if amp else x.dtype
        weights = [w.to(dtype) for w in (self.w_gate, self.w_up, self.w_down)]
        x_sorted = x.to(dtype)[token_of]  # [A, H]
        row_w = top_w.reshape(-1)[order].to(dtype)  # [A] routing weight of each row
        if self.backend == "grouped":
            y = _experts_grouped(x_sorted, row_w, *weights, flat_ids[order], routing.counts)
        else:
            y = _experts_loop(x_sorted, row_w, *weights, routing.counts)
        # Sum over the k experts of each token in fp32.
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        return out.index_add_(0, token_of, y.float()).to(x.dtype), routing


class DecoderLayer(nn.Module):
    """Pre-norm attention and MoE blocks with residuals."""

    def __init__(self, cfg: MoeConfig) -> None:
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.moe = SparseMoe(cfg)

    def forward(self, x, cos, sin, dropout_p: float = 0.0) -> tuple[torch.Tensor, Routing]:
        def drop(t: torch.Tensor) -> torch.Tensor:
            return F.dropout(t, dropout_p, True) if self.training and dropout_p > 0 else t

        h = x + drop(self.attn(self.input_norm(x), cos, sin))
        moe_out, routing = self.moe(self.post_attn_norm(h).reshape(-1, h.shape[-1]))
        return h + drop(moe_out.view(h.shape)), routing


@dataclass
class ModelOutput:
    """Logits ``[B, S, V]``, mean balance loss, per-layer routing and residual streams."""

    logits: torch.Tensor
    aux_loss: torch.Tensor
    routings: list[Routing]
    layer_outputs: list[torch.Tensor]


class MoeForCausalLM(nn.Module):
    """The decoder with embedding, final norm and untied lm_head."""

    def __init__(self, cfg: MoeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.residual_dropout = 0.0  # training-only regularizer, not part of the HF math
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int = 0) -> None:
        """Normal(0, std) weights; residual-output projections scaled by 1/sqrt(2L)."""
        gen = torch.Generator().manual_seed(seed)
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        for name, param in self.named_parameters():
            if param.dim() == 1:
                param.fill_(1.0)
                continue
            scale = out_std if name.endswith(("o_proj.weight", "w_down")) else std
            param.copy_(torch.randn(param.shape, generator=gen) * scale)

    def set_expert_backend(self, backend: str) -> None:
        """``grouped`` (torch._grouped_mm) or ``loop``."""
        assert backend in ("grouped", "loop"), backend
        for layer in self.layers:
            layer.moe.backend = backend

    def forward(self, input_ids: torch.Tensor, keep_layer_outputs: bool = False) -> ModelOutput:
        """Logits for ``input_ids [B, S]``; routing of every layer is always returned."""
        key = (input_ids.shape[1], input_ids.device)
        if key not in self._rope_cache:
            self._rope_cache = {key: rope_cos_sin(key[0], self.cfg, input_ids.device)}
        cos, sin = self._rope_cache[key]
        x = self.embed_tokens(input_ids)
        routings, layer_outputs = [], []
        for layer in self.layers:
            x, routing = layer(x, cos, sin, self.residual_dropout)
            routings.append(routing)
            if keep_layer_outputs:
                layer_outputs.append(x)
        logits = self.lm_head(self.norm(x))
        aux = torch.stack([r.aux_loss() for r in routings]).mean()
        return ModelOutput(logits, aux, routings, layer_outputs)


def grouped_mm_works(device: torch.device) -> bool:
    """Self-check of the grouped backend against the loop (forward and backward)."""
    if not hasattr(torch, "_grouped_mm"):
        print("torch._grouped_mm not available: experts via a loop")
        return False
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 0, 37, 1, 21], device=device)  # an empty and odd-sized groups
    ids = torch.repeat_interleave(torch.arange(5, device=device), counts)
    shapes = ((64, 64), (64,), (5, 32, 64), (5, 32, 64), (5, 64, 32))  # x, row_w, w_*
    inputs = [(torch.rand(s, generator=gen) - 0.5).to(device, dtype) for s in shapes]
    results = []
    try:
        for use_grouped in (True, False):
            leaves = [t.clone().requires_grad_() for t in inputs]
            if use_grouped:
                y = _experts_grouped(*leaves, ids, counts)
            else:
                y = _experts_loop(*leaves, counts)
            probe = torch.linspace(-1, 1, y.numel(), device=device).view_as(y)
            (y.float() * probe).sum().backward()
            results.append([y.detach().float(), *(t.grad.float() for t in leaves)])
    except (RuntimeError, NotImplementedError, TypeError) as error:
        print(f"torch._grouped_mm failed its self-check ({error}): experts via a loop")
        return False
    # Relative to each tensor's scale: bf16 GEMMs differ in accumulation order only.
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    worst = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(*results))
    if worst > tol:
        print(f"torch._grouped_mm differs from the loop by {worst:.3g}: experts via a loop")
    return worst <= tol
