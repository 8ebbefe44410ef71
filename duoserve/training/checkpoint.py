"""Hugging Face export/import of ``MoeForCausalLM`` and the resumable training state.

Export writes what real checkpoints hold: ``config.json`` (accepted by transformers'
MixtralConfig / Qwen3MoeConfig, with both ``rope_theta`` and ``rope_parameters``),
``model.safetensors`` or shards plus ``model.safetensors.index.json`` (one tensor per
expert and projection, on-disk names below), ``generation_config.json`` and the tokenizer
files. Only safetensors and JSON are read or written; nothing is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from duoserve.training.model import MoeConfig, MoeForCausalLM
from duoserve.training.tokenizer import eos_token_id, save_tokenizer_files

# Schema: on-disk name -> our parameter name; "{l}" is the layer index. Expert tensors
# are per expert on disk ("{e}") and stacked [E, ...] in our model (see _EXPERT_NAMES).
_DENSE_NAMES = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "model.layers.{l}.input_layernorm.weight": "layers.{l}.input_norm.weight",
    "model.layers.{l}.post_attention_layernorm.weight": "layers.{l}.post_attn_norm.weight",
    "model.layers.{l}.self_attn.q_proj.weight": "layers.{l}.attn.q_proj.weight",
    "model.layers.{l}.self_attn.k_proj.weight": "layers.{l}.attn.k_proj.weight",
    "model.layers.{l}.self_attn.v_proj.weight": "layers.{l}.attn.v_proj.weight",
    "model.layers.{l}.self_attn.o_proj.weight": "layers.{l}.attn.o_proj.weight",
}
_QK_NORM_NAMES = {
    "model.layers.{l}.self_attn.q_norm.weight": "layers.{l}.attn.q_norm.weight",
    "model.layers.{l}.self_attn.k_norm.weight": "layers.{l}.attn.k_norm.weight",
}
# family -> {our stacked parameter: on-disk name with "{l}" and "{e}"}; "router" is [E, H].
_EXPERT_NAMES = {
    "mixtral": {
        "router": "model.layers.{l}.block_sparse_moe.gate.weight",
        "w_gate": "model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight",
        "w_down": "model.layers.{l}.block_sparse_moe.experts.{e}.w2.weight",
        "w_up": "model.layers.{l}.block_sparse_moe.experts.{e}.w3.weight",
    },
    "qwen3_moe": {
        "router": "model.layers.{l}.mlp.gate.weight",
        "w_gate": "model.layers.{l}.mlp.experts.{e}.gate_proj.weight",
        "w_up": "model.layers.{l}.mlp.experts.{e}.up_proj.weight",
        "w_down": "model.layers.{l}.mlp.experts.{e}.down_proj.weight",
    },
}
_ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def tensor_name_map(cfg: MoeConfig) -> dict[str, tuple[str, int | None]]:
    """On-disk name -> (our parameter name, expert index or None), in file order."""
    names: dict[str, tuple[str, int | None]] = {k: (v, None) for k, v in _DENSE_NAMES.items()}
    layer_names = {**_LAYER_NAMES, **(_QK_NORM_NAMES if cfg.has_qk_norm else {})}
    experts = _EXPERT_NAMES[cfg.family]
    for layer in range(cfg.num_layers):
        for disk, ours in layer_names.items():
            names[disk.format(l=layer)] = (ours.format(l=layer), None)
        names[experts["router"].format(l=layer)] = (f"layers.{layer}.moe.router", None)
        for expert in range(cfg.num_experts):
            for param in ("w_gate", "w_up", "w_down"):
                disk = experts[param].format(l=layer, e=expert)
                names[disk] = (f"layers.{layer}.moe.{param}", expert)
    return names


def export_tensors(model: MoeForCausalLM, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's weights under on-disk names, on the CPU, one independent tensor each."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    out = {}
    for disk, (ours, expert) in tensor_name_map(model.cfg).items():
        tensor = params[ours] if expert is None else params[ours][expert]
        out[disk] = tensor.to("cpu", dtype).clone()  # clone: safetensors refuses shared storage
    return out


@torch.no_grad()
def import_tensors(model: MoeForCausalLM, tensors: dict[str, torch.Tensor]) -> None:
    """Copy on-disk tensors into the model; asserts none is missing and none unused."""
    params = dict(model.named_parameters())
    name_map = tensor_name_map(model.cfg)
    missing = sorted(set(name_map) - set(tensors))
    unused = sorted(set(tensors) - set(name_map))
    assert not missing and not unused, f"missing {missing[:5]}, unused {unused[:5]}"
    for disk, (ours, expert) in name_map.items():
        target = params[ours] if expert is None else params[ours][expert]
        assert target.shape == tensors[disk].shape, f"{disk}: {tuple(tensors[disk].shape)}"
        target.copy_(tensors[disk])


def hf_config(cfg: MoeConfig, eos_id: int, router_aux_loss_coef: float) -> dict[str, object]:
    """config.json contents for MixtralConfig / Qwen3MoeConfig."""
    common = {
        "architectures": [_ARCHITECTURES[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "num_experts_per_tok": cfg.top_k,
        # HF's balance loss is top_k times ours (it sums the top-k fractions).
        "router_aux_loss_coef": router_aux_loss_coef / cfg.top_k,
        "output_router_logits": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        "attention_dropout": 0.0,
        "sliding_window": None,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "dtype": "bfloat16",
    }
    if cfg.family == "mixtral":
        return {
            **common,
            "intermediate_size": cfg.expert_intermediate_size,
            "num_local_experts": cfg.num_experts,
            "router_jitter_noise": 0.0,
        }
    return {
        **common,
        "intermediate_size": cfg.expert_intermediate_size * cfg.top_k,  # dense MLP: unused
        "moe_intermediate_size": cfg.expert_intermediate_size,
        "num_experts": cfg.num_experts,
        "norm_topk_prob": cfg.norm_topk_prob,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "use_sliding_window": False,
        "max_window_layers": cfg.num_layers,
        "attention_bias": False,
    }


def config_from_hf(config: dict) -> MoeConfig:
    """Inverse of ``hf_config`` (reads rope_parameters or rope_theta)."""
    family = config["model_type"]
    assert family in _ARCHITECTURES, f"unsupported model_type {family!r}"
    rope = config.get("rope_parameters") or {}
    mixtral = family == "mixtral"
    return MoeConfig(
        family=family,
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        num_kv_heads=config["num_key_value_heads"],
        head_dim=config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
        num_experts=config["num_local_experts" if mixtral else "num_experts"],
        top_k=config["num_experts_per_tok"],
        expert_intermediate_size=config[
            "intermediate_size" if mixtral else "moe_intermediate_size"
        ],
        norm_topk_prob=True if mixtral else config.get("norm_topk_prob", False),
        rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
        rms_norm_eps=config["rms_norm_eps"],
        max_position_embeddings=config["max_position_embeddings"],
    )


def save_hf_checkpoint(
    model: MoeForCausalLM,
    tokenizer: Tokenizer,
    out_dir: Path,
    dtype: torch.dtype = torch.bfloat16,
    router_aux_loss_coef: float = 0.01,
    max_shard_bytes: int = 512 << 20,
) -> int:
    """Write a loadable HF folder; returns the bytes of safetensors written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    eos_id = eos_token_id(tokenizer)
    config = hf_config(model.cfg, eos_id, router_aux_loss_coef)
    config["dtype"] = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"eos_token_id": eos_id, "pad_token_id": eos_id, "do_sample": False}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_tokenizer_files(tokenizer, out_dir, model.cfg.max_position_embeddings)
    tensors = export_tensors(model, dtype)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in tensors.items():
        num_bytes = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + num_bytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += num_bytes
    total_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return total_bytes
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        file_name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
    index_json = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")
    return total_bytes


def load_hf_checkpoint(path: Path, device: str | torch.device = "cpu") -> MoeForCausalLM:
    """Build the model from an HF folder written by ``save_hf_checkpoint`` (fp32 weights)."""
    cfg = config_from_hf(json.loads((path / "config.json").read_text()))
    with torch.device("meta"):
        model = MoeForCausalLM(cfg)
    model = model.to_empty(device=device)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    import_tensors(model, tensors)
    return model.float()


def save_train_state(
    run_dir: Path, model: MoeForCausalLM, optimizer: torch.optim.Optimizer, meta: dict
) -> None:
    """Resumable state: ``train_state.safetensors`` (weights, AdamW moments) + ``.json``."""
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt_state = optimizer.state_dict()
    for index, state in opt_state["state"].items():
        for key, value in state.items():
            tensors[f"optim/{index}/{key}"] = value.detach().cpu().contiguous().clone()
    tmp = run_dir / "train_state.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(run_dir / "train_state.safetensors")
    state_json = {"param_groups": opt_state["param_groups"], **meta}
    (run_dir / "train_state.json").write_text(json.dumps(state_json, indent=1) + "\n")


def load_train_state(
    run_dir: Path, model: MoeForCausalLM, optimizer: torch.optim.Optimizer
) -> dict:
    """Restore what ``save_train_state`` wrote; returns its JSON metadata."""
    meta = json.loads((run_dir / "train_state.json").read_text())
    tensors = load_file(str(run_dir / "train_state.safetensors"))
    model_state = {k.removeprefix("model/"): v for k, v in tensors.items() if k[:6] == "model/"}
    model.load_state_dict(model_state, strict=True)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim/"):
            _, index, key = name.split("/")
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    return meta
