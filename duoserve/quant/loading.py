"""Int4 experts at load time: which layout a model gets, and filling expert buffers.

Two sources of int4 experts:

- ``--expert-dtype int4`` on an unquantized checkpoint: each expert is quantized as it is read
  (round-to-nearest by default, `QUANT_METHOD`), asymmetric, bf16 scales. The group size is the
  largest power of two <= 128 dividing both H and I (the format needs one group size per
  expert and whole groups per row): 128 for Mixtral (4096/14336) and Qwen3-30B-A3B
  (2048/768), 16 for the shipped default model (192/112).
- a checkpoint whose config.json has ``quantization_config`` (AWQ gemm, GPTQ v1/v2, with or
  without act-order): expert linears (``...experts.{e}.{leaf}.qweight`` etc.) convert exactly
  into the int4 format (fp16 scales); dense quantized linears are dequantized to the serving
  dtype. Such a checkpoint always serves int4 experts, whatever ``expert_dtype`` says.

One layout per model (every expert buffer the same size): that is what makes a cache slot
hold any expert and one copy move one expert.
"""

from __future__ import annotations

import dataclasses

import torch

from duoserve.config import EngineConfig, ModelConfig
from duoserve.quant.checkpoints import (
    CheckpointQuantConfig,
    QuantizedLinear,
    _with_zeros,
    awq_to_int4,
    gptq_to_int4,
    pack_expert_from_linears,
    parse_quantization_config,
)
from duoserve.quant.int4 import Int4ExpertLayout, dequantize_int4, quantize_expert_int4

EXPERT_DTYPES = ("bf16", "int4")
MAX_GROUP_SIZE = 128
MIN_GROUP_SIZE = 16
QUANT_METHOD = "rtn"  # quantize-at-load method: "rtn" or "clip" (see quant/int4.py)


def int4_group_size(hidden: int, inter: int, max_group: int = MAX_GROUP_SIZE) -> int:
    """The largest power of two <= max_group dividing both H and I (at least 16)."""
    g = max_group
    while g >= MIN_GROUP_SIZE and (hidden % g or inter % g):
        g //= 2
    if g < MIN_GROUP_SIZE:
        raise ValueError(
            f"int4 experts need H={hidden} and I={inter} to be multiples of {MIN_GROUP_SIZE}"
        )
    return g


def checkpoint_quant_config(cfg: ModelConfig) -> CheckpointQuantConfig | None:
    """The parsed `quantization_config` of the checkpoint (ValueError if unsupported)."""
    if cfg.quantization is None:
        return None
    return parse_quantization_config({"quantization_config": cfg.quantization})


def expert_layout(cfg: ModelConfig, engine: EngineConfig) -> Int4ExpertLayout | None:
    """The int4 layout every expert buffer of this model uses, or None for unquantized experts."""
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    qcfg = checkpoint_quant_config(cfg)
    if qcfg is None:
        if engine.expert_dtype != "int4":
            return None
        return Int4ExpertLayout(h, i, int4_group_size(h, i), has_zeros=True, scale_dtype="bf16")
    gate_group = h if qcfg.group_size == -1 else qcfg.group_size
    down_group = i if qcfg.group_size == -1 else qcfg.group_size
    g = min(gate_group, down_group)
    if h % g or i % g or g & (g - 1) or g < MIN_GROUP_SIZE:
        raise ValueError(
            f"quantization_config.group_size={qcfg.group_size} gives group {g}, which the int4 "
            f"expert format cannot hold for H={h}, I={i} (needs a power of two >= 16 dividing both)"
        )
    has_zeros = qcfg.method == "awq" or not qcfg.sym
    return Int4ExpertLayout(h, i, g, has_zeros, "fp16", has_act_order=qcfg.desc_act)


def expert_slot_bytes(cfg: ModelConfig, engine: EngineConfig, dtype: torch.dtype) -> int:
    """Bytes of one expert as stored on the host and in a device slot."""
    layout = expert_layout(cfg, engine)
    if layout is not None:
        return layout.num_bytes
    return cfg.expert_numel * torch.empty((), dtype=dtype).element_size()


def dequant_scratch_bytes(cfg: ModelConfig, engine: EngineConfig, dtype: torch.dtype) -> int:
    """Bytes of the prefill dequant scratch (one expert in the serving dtype) for int4 experts."""
    if expert_layout(cfg, engine) is None:
        return 0
    return cfg.expert_numel * torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------- checkpoint tensors


def read_raw(source, name: str) -> torch.Tensor:
    """Read a checkpoint tensor of any dtype (int32 qweight/qzeros/g_idx, fp16 scales).

    NOTE: the checkpoint's public `get` admits float tensors only; this reads through its file
    handle and marks the tensor used, so the end-of-load "nothing unused" check still holds.
    """
    tensor = source._open(source._file(name)).get_tensor(name)
    source.used.add(name)
    return tensor


def read_quantized_linear(source, prefix: str, qcfg: CheckpointQuantConfig) -> QuantizedLinear:
    """Convert the quantized linear `prefix` (`prefix.qweight`, ...) into our int4 format."""
    qweight, qzeros = read_raw(source, f"{prefix}.qweight"), read_raw(source, f"{prefix}.qzeros")
    scales = read_raw(source, f"{prefix}.scales")
    if qcfg.method == "awq":
        return awq_to_int4(qweight, qzeros, scales, qcfg.group_size)
    g_idx = read_raw(source, f"{prefix}.g_idx") if f"{prefix}.g_idx" in source else None
    return gptq_to_int4(qweight, qzeros, scales, qcfg.group_size, g_idx, qcfg.checkpoint_format)


def dequantize_linear(linear: QuantizedLinear, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in `dtype`, in the checkpoint's input order (act-order undone), exact in fp32."""
    w = dequantize_int4(*linear.weights, linear.group_size, torch.float32)  # W[:, in_perm]
    if linear.in_perm is not None:
        unpermuted = torch.empty_like(w)
        unpermuted[:, linear.in_perm.to(torch.int64)] = w
        w = unpermuted
    return w.to(dtype)


def read_dense_weight(source, name: str, shape: tuple[int, ...], cfg: ModelConfig) -> torch.Tensor:
    """A dense weight: read as is, or dequantized when the checkpoint stores `...qweight`."""
    prefix = name.removesuffix(".weight")
    if cfg.quantization is None or name in source or f"{prefix}.qweight" not in source:
        return source.get(name, shape)
    qcfg = checkpoint_quant_config(cfg)
    assert qcfg is not None
    w = dequantize_linear(read_quantized_linear(source, prefix, qcfg), torch.float32)
    if tuple(w.shape) != tuple(shape):
        raise ValueError(f"quantized '{prefix}' dequantizes to {tuple(w.shape)}, want {shape}")
    return w


def _pack_checkpoint_expert(linears, layout: Int4ExpertLayout, out: torch.Tensor, where: str):
    gate, up, down = linears
    if layout.has_act_order and gate.in_perm is None and up.in_perm is None:
        identity = torch.arange(layout.hidden_size, dtype=torch.int32)  # trivial act-order
        gate = dataclasses.replace(gate, in_perm=identity)
        up = dataclasses.replace(up, in_perm=identity)
    if layout.has_zeros:
        gate, up, down = (
            dataclasses.replace(lin, weights=_with_zeros(lin.weights)) for lin in (gate, up, down)
        )
    _, got = pack_expert_from_linears(gate, up, down, out=out)
    if got != layout:
        raise ValueError(f"{where}: packs as {got}, but the model's experts use {layout}")


def load_int4_layer(
    cfg: ModelConfig,
    source,
    layer_id: int,
    layout: Int4ExpertLayout,
    block: torch.Tensor,
    staging_device: str | torch.device = "cpu",
) -> None:
    """Fill block [E, layout.num_bytes] (uint8) with the int4 experts of one MoE layer."""
    # imported here: weights.loader imports this module for dense weights
    from duoserve.weights.loader import iter_expert_weights
    from duoserve.weights.mapping import expert_tensor_names

    qcfg = checkpoint_quant_config(cfg)
    if qcfg is None:
        for e, gate, up, down in iter_expert_weights(cfg, source, layer_id, staging_device):
            quantize_expert_int4(
                gate, up, down, layout.group_size, method=QUANT_METHOD, out=block[e]
            )
        return
    for e in range(cfg.num_experts):
        names = expert_tensor_names(cfg, layer_id, e)
        prefixes = [name.removesuffix(".weight") for name in names]
        linears = [read_quantized_linear(source, p, qcfg) for p in prefixes]
        _pack_checkpoint_expert(linears, layout, block[e], f"layer {layer_id} expert {e}")
