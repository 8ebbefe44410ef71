"""Self-attention over the KV cache: GQA, optional q/k norms, qkv clipping, sliding windows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from duoserve.config import ModelConfig
from duoserve.engine.context import get_step_context
from duoserve.engine.kv_cache import KVCache
from duoserve.layers.norm import RMSNorm
from duoserve.layers.rotary import apply_rope


class Attention(nn.Module):
    """One attention block; reads positions and slots from the step context."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        H, D = cfg.hidden_size, cfg.head_dim
        self.layer_id = layer_id
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, D
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(H, cfg.num_heads * D, bias=bias)
        self.k_proj = nn.Linear(H, cfg.num_kv_heads * D, bias=bias)
        self.v_proj = nn.Linear(H, cfg.num_kv_heads * D, bias=bias)
        self.o_proj = nn.Linear(cfg.num_heads * D, H, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(D, cfg.rms_norm_eps), RMSNorm(D, cfg.rms_norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(cfg.num_heads * D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.num_kv_heads * D, cfg.rms_norm_eps)
        self.clip_qkv = cfg.clip_qkv
        self.sliding_window = cfg.sliding_windows[layer_id]

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVCache
    ) -> torch.Tensor:
        # T tokens, NH query heads, KVH kv heads, D head dim
        ctx = get_step_context()
        T = x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(T, self.num_heads, self.head_dim)  # [T, NH, D]
        k = k.view(T, self.num_kv_heads, self.head_dim)  # [T, KVH, D]
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kv.write(self.layer_id, ctx.token_slots_dev, ctx.positions_dev, k, v)
        if ctx.is_pure_decode and ctx.seq_lens_dev is not None:
            out = self._decode_attention(q, kv, ctx)
        else:
            out = self._prefill_attention(q, kv, ctx)
        return self.o_proj(out.reshape(T, self.num_heads * self.head_dim))

    def _prefill_attention(self, q: torch.Tensor, kv: KVCache, ctx) -> torch.Tensor:
        """Sequence by sequence: n new queries against the first start+n cached keys."""
        outs = []
        offsets = ctx.token_offsets
        for b, slot in enumerate(ctx.slot_ids):
            start, n = ctx.start_positions[b], ctx.num_new_tokens[b]
            end = start + n
            q_b = q[offsets[b] : offsets[b + 1]].transpose(0, 1)[None]  # [1, NH, n, D]
            k_b = kv.keys[self.layer_id][slot : slot + 1, :, :end]  # [1, KVH, end, D]
            v_b = kv.values[self.layer_id][slot : slot + 1, :, :end]
            if start == 0 and self.sliding_window is None:
                o = F.scaled_dot_product_attention(q_b, k_b, v_b, is_causal=True, enable_gqa=True)
            else:
                q_pos = torch.arange(start, end, device=q.device)[:, None]
                k_pos = torch.arange(end, device=q.device)[None, :]
                mask = self._window(k_pos <= q_pos, q_pos, k_pos)  # [n, end]
                o = F.scaled_dot_product_attention(q_b, k_b, v_b, attn_mask=mask, enable_gqa=True)
            outs.append(o[0].transpose(0, 1))  # [n, NH, D]
        return torch.cat(outs, dim=0)

    def _decode_attention(self, q: torch.Tensor, kv: KVCache, ctx) -> torch.Tensor:
        """All sequences at once, one query each, keys padded to the longest sequence."""
        max_len = ctx.static_kv_len or int(max(s + 1 for s in ctx.start_positions))
        k = kv.keys[self.layer_id][ctx.slot_ids_dev, :, :max_len]  # [B, KVH, L, D]
        v = kv.values[self.layer_id][ctx.slot_ids_dev, :, :max_len]
        k_pos = torch.arange(max_len, device=q.device)[None, :]  # [1, L]
        q_pos = (ctx.seq_lens_dev - 1)[:, None]  # [B, 1]
        mask = self._window(k_pos <= q_pos, q_pos, k_pos)[:, None, None, :]  # [B, 1, 1, L]
        o = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask, enable_gqa=True)
        return o[:, :, 0, :]  # [B, NH, D]

    def _window(self, mask: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        if self.sliding_window is not None:
            mask = mask & (k_pos > q_pos - self.sliding_window)
        return mask
