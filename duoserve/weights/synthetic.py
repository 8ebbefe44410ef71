"""Synthetic models: real topologies with random weights, in memory or written as HF folders.

`synthetic:ARCH[:SCALE]` names one as a model, e.g. `synthetic:qwen3-30b-a3b` (full size, built
in memory, never written) or `synthetic:olmoe-1b-7b:tiny`. Weights come from
`SyntheticCheckpoint` (a pure function of seed and tensor name); the tokenizer is a byte-level
one built in memory, so text round-trips exactly whatever the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from duoserve.config import ModelConfig
from duoserve.tokenizer import Tokenizer
from duoserve.weights.checkpoint import SyntheticCheckpoint
from duoserve.weights.mapping import dense_param_table, expert_tensor_names

# Full-size topologies, as in the public config.json of each model.
ARCHS: dict[str, dict[str, Any]] = {
    "mixtral-8x7b": dict(
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
    ),
    "mixtral-8x22b": dict(
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        vocab_size=32768,
        hidden_size=6144,
        intermediate_size=16384,
        num_hidden_layers=56,
        num_attention_heads=48,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        max_position_embeddings=65536,
        tie_word_embeddings=False,
    ),
    "qwen3-30b-a3b": dict(
        architectures=["Qwen3MoeForCausalLM"],
        model_type="qwen3_moe",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        max_position_embeddings=40960,
        tie_word_embeddings=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
    "qwen1.5-moe-a2.7b": dict(
        architectures=["Qwen2MoeForCausalLM"],
        model_type="qwen2_moe",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=5632,
        moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_experts=60,
        num_experts_per_tok=4,
        norm_topk_prob=False,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
    "olmoe-1b-7b": dict(
        architectures=["OlmoeForCausalLM"],
        model_type="olmoe",
        vocab_size=50304,
        hidden_size=2048,
        intermediate_size=1024,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_experts=64,
        num_experts_per_tok=8,
        norm_topk_prob=False,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        clip_qkv=None,
    ),
}
# tiny: same layers x experts x top-k (the routing topology), narrow widths.
TINY_WIDTHS = dict(
    vocab_size=512,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=4096,
)
SCALES = ("tiny", "full")
BOS, EOS = "<s>", "</s>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def synthetic_config(arch: str, scale: str = "full") -> dict[str, Any]:
    """The HF config.json dict of a synthetic model."""
    if arch not in ARCHS:
        raise ValueError(f"unknown synthetic arch '{arch}'; known: {', '.join(sorted(ARCHS))}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale '{scale}'; known: {', '.join(SCALES)}")
    raw = dict(ARCHS[arch])
    if scale == "tiny":
        raw.update(TINY_WIDTHS)
        inter_keys = (
            "intermediate_size",
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
        )
        for key in inter_keys:
            if key in raw:
                raw[key] = (
                    16 if key == "moe_intermediate_size" or arch.startswith("mixtral") else 32
                )
        if arch.startswith("mixtral"):
            raw["intermediate_size"] = 16
    raw.update(bos_token_id=256, eos_token_id=257, dtype="bfloat16")
    return raw


def parse_synthetic_spec(spec: str) -> tuple[str, str] | None:
    """'synthetic:ARCH[:SCALE]' -> (arch, scale), or None when `spec` is not synthetic."""
    if not spec.startswith("synthetic:"):
        return None
    parts = spec.split(":")[1:]
    return parts[0], parts[1] if len(parts) > 1 else "full"


def byte_tokenizer() -> HFTokenizer:
    """A byte-level tokenizer: 256 byte tokens, then <s> (256) and </s> (257)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: _byte_of(c))
    vocab = {c: i for i, c in enumerate(byte_chars)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    return tok


def _byte_of(char: str) -> int:
    # Inverse of the GPT-2 byte -> printable-char table that ByteLevel uses.
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    )
    if ord(char) in printable:
        return ord(char)
    extra = [b for b in range(256) if b not in printable]
    return extra[ord(char) - 256]


def synthetic_tokenizer(raw: dict[str, Any]) -> Tokenizer:
    tok_cfg = {"bos_token": BOS, "eos_token": EOS}
    return Tokenizer(
        byte_tokenizer(), tok_cfg, {"eos_token_id": raw["eos_token_id"]}, CHAT_TEMPLATE
    )


def write_synthetic_checkpoint(
    arch: str, scale: str, out_dir: str | Path, seed: int = 0, max_shard_bytes: int = 2 << 30
) -> Path:
    """Write a random-weights HF folder (sharded safetensors + index, tokenizer, configs)."""
    raw = synthetic_config(arch, scale)
    cfg = ModelConfig.from_dict(raw)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = SyntheticCheckpoint(seed=seed, device="cuda" if torch.cuda.is_available() else "cpu")
    names = [(d, s) for d, s in dense_param_table(cfg).values()]
    H, I = cfg.hidden_size, cfg.moe_intermediate_size
    for layer_id in cfg.moe_layer_ids:
        for e in range(cfg.num_experts):
            gate, up, down = expert_tensor_names(cfg, layer_id, e)
            names += [(gate, (I, H)), (up, (I, H)), (down, (H, I))]
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, weight_map, files = 0, {}, []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            file_name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(out / file_name), metadata={"format": "pt"})
            files.append(file_name)
            weight_map.update({n: file_name for n in shard})
            shard, shard_bytes = {}, 0

    for name, shape in names:
        tensor = source.get(name, shape).to(torch.bfloat16).contiguous()
        if shard_bytes + tensor.numel() * 2 > max_shard_bytes:
            flush()
        shard[name] = tensor
        shard_bytes += tensor.numel() * 2
    flush()
    total = sum((out / f).stat().st_size for f in files)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    byte_tokenizer().save(str(out / "tokenizer.json"))
    tok_cfg = {"bos_token": BOS, "eos_token": EOS, "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    gen_cfg = {"bos_token_id": raw["bos_token_id"], "eos_token_id": raw["eos_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    return out
