"""The decoder shared by the four MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE).

The families differ only in switches that ModelConfig carries (q/k norms, qkv bias and
clipping, shared expert, dense layers, top-k normalisation, sliding windows); the on-disk
names live in weights/mapping.py. Expert weights are not parameters of this module: each
MoE block calls its expert backend (see offload/).
"""

from __future__ import annotations

import torch
from torch import nn

from duoserve.config import ModelConfig
from duoserve.engine.context import get_step_context
from duoserve.engine.kv_cache import KVCache
from duoserve.layers.attention import Attention
from duoserve.layers.moe import DenseMLP, MoEBlock, MoEPoint
from duoserve.layers.norm import RMSNorm
from duoserve.layers.rotary import inv_frequencies, rope_cos_sin


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP (MoE or dense) with residuals."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_id)
        self.mlp = (
            MoEBlock(cfg, layer_id)
            if cfg.is_moe_layer(layer_id)
            else DenseMLP(cfg.hidden_size, cfg.intermediate_size)
        )
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVCache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class MoELM(nn.Module):
    """Causal LM over a flat batch of tokens; positions and KV slots come from the step context."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", inv_frequencies(cfg.rope, cfg.head_dim), persistent=False)

    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoEBlock)]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv: KVCache,
        logits_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [R, V] (float32) for the token rows `logits_rows` (all rows when None)."""
        x = self.embed_tokens(input_ids)  # [T, H]
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)  # [T, D]
        for layer in self.layers:
            x = layer(x, cos, sin, kv)
        return self.logits(x, logits_rows)

    def logits(self, x: torch.Tensor, logits_rows: torch.Tensor | None = None) -> torch.Tensor:
        if logits_rows is not None:
            x = x[logits_rows]
        x = self.norm(x)
        head = self.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight
        return torch.nn.functional.linear(x, head).float()

    def segments(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: KVCache):
        """forward in segments that end at each MoE layer's routing sync: a generator that
        yields (block, MoEPoint) after each MoE block's `begin` (the caller runs
        `block.run_experts(point)` before resuming; while capturing, also
        `block.after_experts(point)` once the next segment ran) and finally
        (None, logits [T, V])."""
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for layer in self.layers:
            x = x + layer.self_attn(layer.input_layernorm(x), cos, sin, kv)
            h = layer.post_attention_layernorm(x)
            if isinstance(layer.mlp, MoEBlock):
                point: MoEPoint = layer.mlp.begin(h)
                yield layer.mlp, point
                x = x + layer.mlp.finish(point)
                if not get_step_context().capturing:  # else the graph's driver calls it
                    layer.mlp.after_experts(point)
            else:
                x = x + layer.mlp(h)
        yield None, self.logits(x)
