"""Frozen configuration: the model (read once from an HF config.json) and the engine.

Every knob is declared once, as a dataclass field with a `help` string in its metadata; the
CLI generates its flags from these fields (see `add_dataclass_flags`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# architecture (config.json "architectures"[0]) -> family key used by models/ and weights/
ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
    """A config.json that we cannot serve: the message names the file, key and expected value."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, normalised from both HF spellings."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of one MoE checkpoint, validated once at load time."""

    family: str
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP layers (mlp_only_layers, decoder_sparse_step gaps)
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool
    moe_layer_ids: tuple[int, ...]
    shared_expert_intermediate_size: int  # 0: no shared expert
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    attention_bias: bool
    qk_norm: str  # "none" | "head" (per-head RMSNorm, Qwen3) | "full" (over the full width, OLMoE)
    clip_qkv: float | None
    sliding_windows: tuple[int | None, ...]  # per layer; None = full attention
    tie_word_embeddings: bool
    dtype: str  # the checkpoint's dtype ("bfloat16", "float32", ...)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    quantization: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        assert self.num_heads % self.num_kv_heads == 0, "num_heads must be a multiple of kv heads"
        assert 0 < self.num_experts_per_tok <= self.num_experts, "top-k must be in [1, E]"
        assert len(self.sliding_windows) == self.num_layers
        assert all(0 <= i < self.num_layers for i in self.moe_layer_ids)

    @property
    def expert_numel(self) -> int:
        """Elements of one expert: gate [I, H], up [I, H], down [H, I] packed back to back."""
        return 3 * self.moe_intermediate_size * self.hidden_size

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_ids)

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id in self.moe_layer_ids

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        return _parse_model_config(raw, source)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: not found (a model folder needs an HF config.json)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: malformed JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        return _parse_model_config(raw, str(path))


def _get(
    raw: dict[str, Any], key: str, kind: type | tuple[type, ...], source: str, default: Any = ...
):
    if key not in raw or raw[key] is None:
        if default is ...:
            raise ConfigError(f"{source}: missing required key '{key}'")
        return default
    value = raw[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: key '{key}' must be {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _positive(value: int, key: str, source: str) -> int:
    if value <= 0:
        raise ConfigError(f"{source}: key '{key}' must be > 0, got {value}")
    return value


def _parse_rope(raw: dict[str, Any], source: str) -> RopeConfig:
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        spec = dict(params)
        theta = spec.pop("rope_theta")
    else:
        spec = dict(raw.get("rope_scaling") or {})
        theta = raw.get("rope_theta", 10000.0)
    rope_type = spec.get("rope_type", spec.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{source}: rope type '{rope_type}' is not supported; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError(f"{source}: rope_theta must be a positive number, got {theta!r}")
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(spec.get("factor", 1.0)),
        low_freq_factor=float(spec.get("low_freq_factor", 1.0)),
        high_freq_factor=float(spec.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(spec.get("original_max_position_embeddings", 8192)),
    )


def _moe_layers(raw: dict[str, Any], family: str, num_layers: int, source: str) -> tuple[int, ...]:
    if family != "qwen2_moe" and family != "qwen3_moe":
        return tuple(range(num_layers))
    mlp_only = set(_get(raw, "mlp_only_layers", list, source, default=[]))
    step = _positive(
        _get(raw, "decoder_sparse_step", int, source, default=1), "decoder_sparse_step", source
    )
    return tuple(i for i in range(num_layers) if i not in mlp_only and (i + 1) % step == 0)


def _sliding_windows(raw: dict[str, Any], family: str, num_layers: int, source: str):
    window = raw.get("sliding_window")
    if family in ("qwen2_moe", "qwen3_moe") and not raw.get("use_sliding_window", False):
        window = None
    if family == "olmoe":
        window = None
    if window is not None and (not isinstance(window, int) or window <= 0):
        window = None if window == 0 else window
        if window is not None:
            raise ConfigError(f"{source}: sliding_window must be a positive int, got {window!r}")
    layer_types = raw.get("layer_types")
    if window is None:
        return (None,) * num_layers
    if isinstance(layer_types, list) and len(layer_types) == num_layers:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if family == "qwen2_moe":
        max_window_layers = int(raw.get("max_window_layers", num_layers))
        return tuple(
            window if (i + 1) % 2 and i < max_window_layers else None for i in range(num_layers)
        )
    return (window,) * num_layers


def _parse_model_config(raw: dict[str, Any], source: str) -> ModelConfig:
    archs = raw.get("architectures")
    if not isinstance(archs, list) or not archs:
        raise ConfigError(f"{source}: key 'architectures' must be a non-empty list")
    architecture = archs[0]
    if architecture not in ARCHITECTURES:
        raise ConfigError(
            f"{source}: unsupported architecture '{architecture}'; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    family = ARCHITECTURES[architecture]
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act must be 'silu', got {act!r}")
    g = lambda key, kind, default=...: _get(raw, key, kind, source, default)  # noqa: E731
    hidden = _positive(g("hidden_size", int), "hidden_size", source)
    num_layers = _positive(g("num_hidden_layers", int), "num_hidden_layers", source)
    num_heads = _positive(g("num_attention_heads", int), "num_attention_heads", source)
    num_kv_heads = _positive(
        g("num_key_value_heads", int, num_heads), "num_key_value_heads", source
    )
    if num_heads % num_kv_heads:
        raise ConfigError(
            f"{source}: num_attention_heads ({num_heads}) must be a multiple of "
            f"num_key_value_heads ({num_kv_heads})"
        )
    head_dim = g("head_dim", int, hidden // num_heads)
    # transformers 5.x writes num_local_experts for every family; released checkpoints
    # spell it num_experts outside Mixtral.
    expert_key = "num_local_experts" if raw.get("num_local_experts") is not None else "num_experts"
    num_experts = g(expert_key, int)
    if family in ("mixtral", "olmoe"):
        moe_inter = g("intermediate_size", int)
    else:
        moe_inter = g("moe_intermediate_size", int)
    top_k = g("num_experts_per_tok", int)
    if not 0 < top_k <= num_experts:
        raise ConfigError(
            f"{source}: num_experts_per_tok ({top_k}) must be in [1, num_experts={num_experts}]"
        )
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    qk_norm = {"qwen3_moe": "head", "olmoe": "full"}.get(family, "none")
    return ModelConfig(
        family=family,
        architecture=architecture,
        vocab_size=_positive(g("vocab_size", int), "vocab_size", source),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=_positive(head_dim, "head_dim", source),
        intermediate_size=g("intermediate_size", int, moe_inter),
        moe_intermediate_size=_positive(moe_inter, "moe_intermediate_size", source),
        num_experts=_positive(num_experts, "num_experts", source),
        num_experts_per_tok=top_k,
        norm_topk_prob=True if family == "mixtral" else bool(g("norm_topk_prob", bool, False)),
        moe_layer_ids=_moe_layers(raw, family, num_layers, source),
        shared_expert_intermediate_size=(
            g("shared_expert_intermediate_size", int, 0) if family == "qwen2_moe" else 0
        ),
        rms_norm_eps=g("rms_norm_eps", float, 1e-6),
        rope=_parse_rope(raw, source),
        max_position_embeddings=g("max_position_embeddings", int, 4096),
        attention_bias=(True if family == "qwen2_moe" else bool(g("attention_bias", bool, False))),
        qk_norm=qk_norm,
        clip_qkv=g("clip_qkv", float, None) if family == "olmoe" else None,
        sliding_windows=_sliding_windows(raw, family, num_layers, source),
        tie_word_embeddings=bool(g("tie_word_embeddings", bool, False)),
        dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
        quantization=raw.get("quantization_config"),
    )


# ----------------------------------------------------------------------------- engine


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model: device, dtype, memory budget, batching and expert policy."""

    device: str = _opt("auto", "cpu, cuda, cuda:N, or auto (cuda when available)")
    dtype: str = _opt("auto", "bfloat16, float16, float32, or auto (bf16 on GPU, fp32 on CPU)")
    max_model_len: int = _opt(2048, "longest prompt + output, in tokens")
    max_num_seqs: int = _opt(8, "sequences that may run at once (KV cache slots)")
    max_num_batched_tokens: int = _opt(2048, "token budget of one engine step (prefill chunk)")
    gpu_memory_budget: float | None = _opt(
        None, "GiB the process may hold on the device, all included; None: no offloading"
    )
    policy: str = _opt(
        "auto",
        "expert policy: full-gpu, ondemand, lru, lfu, fifo, lfu-decay, next-use, pipeline, "
        "uniform, duoserve, "
        "gate-lookahead, trace-match, or auto",
    )
    prefill_ring_slots: int = _opt(0, "prefill staging ring slots (0: the planner chooses)")
    predictor: str = _opt(
        "auto", "decode predictor .safetensors for duoserve/uniform (auto: the shipped one)"
    )
    prefetch_distance: int = _opt(1, "decode prefetch looks d = 1..N MoE layers ahead")
    prefetch_budget: int = _opt(
        0, "experts prefetched per token, layer and distance (0: 3/4 of the top-k, rounded up)"
    )
    prefetch_eviction: str = _opt(
        "next-use",
        "eviction policy of the prefetching policies' cache: lru, lfu, fifo, lfu-decay, next-use",
    )
    synthetic_seed: int = _opt(0, "seed of synthetic (random) weights")
    enforce_eager: int = _opt(0, "1: never capture CUDA graphs for decode")
    expert_dtype: str = _opt(
        "bf16", "expert weights: bf16 (the serving dtype) or int4 (4-bit, quantized at load)"
    )

    def __post_init__(self) -> None:
        if self.max_model_len <= 0 or self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise ValueError("max_model_len, max_num_seqs and max_num_batched_tokens must be > 0")
        if self.gpu_memory_budget is not None and not (
            math.isfinite(self.gpu_memory_budget) and self.gpu_memory_budget > 0
        ):
            raise ValueError(
                f"gpu_memory_budget must be a positive GiB value, got {self.gpu_memory_budget}"
            )
        if self.prefill_ring_slots < 0 or self.prefetch_budget < 0:
            raise ValueError("prefill_ring_slots and prefetch_budget must be >= 0")
        if not 1 <= self.prefetch_distance <= 4:
            raise ValueError(f"prefetch_distance must be in 1..4, got {self.prefetch_distance}")
        from duoserve.offload.policies import EVICTION_POLICIES

        if self.prefetch_eviction not in EVICTION_POLICIES:
            known = ", ".join(sorted(EVICTION_POLICIES))
            raise ValueError(
                f"prefetch_eviction must be one of {known}, got {self.prefetch_eviction!r}"
            )
        if self.expert_dtype not in ("bf16", "int4"):
            raise ValueError(f"expert_dtype must be 'bf16' or 'int4', got {self.expert_dtype!r}")

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)


def add_dataclass_flags(
    parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()
) -> None:
    """Add one `--flag-name` per dataclass field (type and help taken from the field)."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = {"int": int, "float": float, "str": str}.get(str(f.type).split("|")[0].strip(), str)
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=kind,
            default=f.default,
            help=f"{f.metadata.get('help', '')} (default: {f.default})",
        )


def dataclass_from_args(cls: type, args: argparse.Namespace, **overrides: Any):
    """Build `cls` from parsed flags made by `add_dataclass_flags`."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    return cls(**values)
