"""On-disk HF tensor names -> our parameters, one table per family.

Schema of a table row: our parameter name (a key of `MoELM.state_dict()`) -> (on-disk name,
shape). Experts are not parameters: `expert_tensor_names` gives the three on-disk names of
one expert (gate [I, H], up [I, H], down [H, I]); checkpoints written by transformers 5.x's
in-memory layout (fused `experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I])
are read too, see `fused_expert_names`.
"""

from __future__ import annotations

from duoserve.config import ModelConfig

# family -> (moe module name, router name, (gate, up, down) expert leaf names)
MOE_NAMES = {
    "mixtral": ("block_sparse_moe", "gate", ("w1", "w3", "w2")),
    "qwen2_moe": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj")),
    "qwen3_moe": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj")),
    "olmoe": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj")),
}


def dense_param_table(cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every non-expert parameter of the model: ours -> (on-disk name, shape)."""
    H, D = cfg.hidden_size, cfg.head_dim
    q_dim, kv_dim = cfg.num_heads * D, cfg.num_kv_heads * D
    moe_mod, router, _ = MOE_NAMES[cfg.family]
    table: dict[str, tuple[str, tuple[int, ...]]] = {
        "embed_tokens.weight": ("model.embed_tokens.weight", (cfg.vocab_size, H)),
        "norm.weight": ("model.norm.weight", (H,)),
    }
    if not cfg.tie_word_embeddings:
        table["lm_head.weight"] = ("lm_head.weight", (cfg.vocab_size, H))
    for i in range(cfg.num_layers):
        ours, disk = f"layers.{i}.", f"model.layers.{i}."
        attn = {
            "q_proj.weight": (q_dim, H),
            "k_proj.weight": (kv_dim, H),
            "v_proj.weight": (kv_dim, H),
            "o_proj.weight": (H, q_dim),
        }
        if cfg.attention_bias:
            attn.update(
                {"q_proj.bias": (q_dim,), "k_proj.bias": (kv_dim,), "v_proj.bias": (kv_dim,)}
            )
        if cfg.qk_norm == "head":
            attn.update({"q_norm.weight": (D,), "k_norm.weight": (D,)})
        elif cfg.qk_norm == "full":
            attn.update({"q_norm.weight": (q_dim,), "k_norm.weight": (kv_dim,)})
        for leaf, shape in attn.items():
            table[ours + "self_attn." + leaf] = (disk + "self_attn." + leaf, shape)
        for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            table[ours + norm] = (disk + norm, (H,))
        if cfg.is_moe_layer(i):
            table[ours + "mlp.router.weight"] = (
                f"{disk}{moe_mod}.{router}.weight",
                (cfg.num_experts, H),
            )
            S = cfg.shared_expert_intermediate_size
            if S:
                _add_mlp(table, ours + "mlp.shared_expert.", disk + "mlp.shared_expert.", H, S)
                table[ours + "mlp.shared_expert_gate.weight"] = (
                    disk + "mlp.shared_expert_gate.weight",
                    (1, H),
                )
        else:
            _add_mlp(table, ours + "mlp.", disk + "mlp.", H, cfg.intermediate_size)
    return table


def _add_mlp(table: dict, ours: str, disk: str, H: int, inter: int) -> None:
    for leaf, shape in (
        ("gate_proj", (inter, H)),
        ("up_proj", (inter, H)),
        ("down_proj", (H, inter)),
    ):
        table[f"{ours}{leaf}.weight"] = (f"{disk}{leaf}.weight", shape)


def expert_tensor_names(cfg: ModelConfig, layer_id: int, expert_id: int) -> tuple[str, str, str]:
    """On-disk names of one expert's (gate, up, down) weights in the per-expert layout."""
    moe_mod, _, leaves = MOE_NAMES[cfg.family]
    prefix = f"model.layers.{layer_id}.{moe_mod}.experts.{expert_id}."
    return tuple(f"{prefix}{leaf}.weight" for leaf in leaves)  # type: ignore[return-value]


def fused_expert_names(cfg: ModelConfig, layer_id: int) -> tuple[str, str]:
    """On-disk names of a layer's fused experts: gate_up [E, 2I, H], down [E, H, I]."""
    moe_mod, _, _ = MOE_NAMES[cfg.family]
    prefix = f"model.layers.{layer_id}.{moe_mod}.experts."
    return prefix + "gate_up_proj", prefix + "down_proj"
