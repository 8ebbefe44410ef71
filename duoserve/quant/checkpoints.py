"""AWQ / GPTQ checkpoint tensors -> our int4 representation, exactly; `quantization_config` parsing.

Supported on-disk formats (4-bit only):

- AWQ "gemm" (AutoAWQ's WQLinear_GEMM), asymmetric (zero_point true):
  qweight int32 [in, out/8], qzeros int32 [in/g, out/8], scales fp16 [in/g, out].
  Packed along *out*, nibbles interleaved: nibble i (bits 4i..4i+3) of word c holds output
  column 8c + AWQ_NIBBLE_COLUMN[i]. Dequant: (q - z) * s.
- GPTQ, checkpoint_format "gptq" (v1, the classic AutoGPTQ format) and "gptq_v2":
  qweight int32 [in/8, out] packed along *in* (nibble j of word r = input row 8r + j),
  qzeros int32 [in/g, out/8] packed along out (nibble j = column 8c + j), scales fp16 [in/g, out],
  g_idx int32 [in] (input row -> group; i // g without act-order). v1 stores zero - 1, so the
  zero point is nibble + 1 (1..16: a stored 15 means 16, the v1 quirk kept bit-exactly);
  v2 stores the zero point itself. Dequant: (q - z[g_idx]) * s[g_idx].

Act-order (desc_act) is handled by permuting the input dimension into group order: the result
holds W[:, in_perm] with plain contiguous groups, and the consumer feeds x[:, in_perm]. This
needs every group to own exactly `group_size` input rows, which GPTQ's act-order produces; any
other g_idx raises. Scales stay fp16, so dequantized values are bit-identical to the checkpoint's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from duoserve.quant.int4 import (
    SYMMETRIC_ZERO,
    Int4ExpertLayout,
    Int4Weights,
    pack_expert_int4,
    pack_nibbles,
)

# Output column held by nibble i of an AWQ GEMM word (relative to 8 * word index).
AWQ_NIBBLE_COLUMN = (0, 2, 4, 6, 1, 3, 5, 7)


@dataclass(frozen=True)
class QuantizedLinear:
    """One linear layer converted to our int4 format.

    `weights` hold W[:, in_perm] (in_perm None: identity); y = x[:, in_perm] @ dequant^T.
    """

    weights: Int4Weights
    group_size: int
    in_perm: torch.Tensor | None = None


def _unpack_words(words: torch.Tensor) -> torch.Tensor:
    # int32 [R, C] -> int64 codes [R, C, 8] in nibble order (nibble j = bits 4j..4j+3)
    shifts = torch.arange(0, 32, 4, device=words.device, dtype=torch.int64)
    return (words.to(torch.int64)[..., None] >> shifts) & 0xF


def _zeros_or_none(zeros: torch.Tensor) -> torch.Tensor | None:
    # zeros that are all 8 are the symmetric format: store none (exact, the implied zero is 8)
    return None if bool((zeros == SYMMETRIC_ZERO).all()) else zeros.to(torch.uint8)


def _resolve_group(group_size: int, in_features: int) -> int:
    g = in_features if group_size == -1 else group_size
    if g <= 0 or in_features % g != 0:
        raise ValueError(f"group_size={group_size} does not divide in_features={in_features}")
    return g


def awq_to_int4(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> QuantizedLinear:
    """Convert one AWQ GEMM-packed linear layer (see module docstring) exactly."""
    # IN input features, OUT output features, G groups
    num_in, num_out = qweight.shape[0], qweight.shape[1] * 8
    g = _resolve_group(group_size, num_in)
    num_groups = num_in // g
    if qzeros.shape != (num_groups, num_out // 8) or scales.shape != (num_groups, num_out):
        raise ValueError(
            f"AWQ shapes disagree: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
            f"scales {tuple(scales.shape)} for group_size {g}"
        )
    # nibble i holds column AWQ_NIBBLE_COLUMN[i]: scatter nibbles back into column order
    order = torch.tensor(AWQ_NIBBLE_COLUMN, device=qweight.device)
    inverse = torch.argsort(order)  # column c -> nibble holding it
    q = _unpack_words(qweight)[..., inverse].reshape(num_in, num_out)  # [IN, OUT]
    z = _unpack_words(qzeros)[..., inverse].reshape(num_groups, num_out)  # [G, OUT]
    weights = Int4Weights(
        pack_nibbles(q.T.contiguous()), scales.T.contiguous(), _zeros_or_none(z.T.contiguous())
    )
    return QuantizedLinear(weights, g)


def _act_order_perm(g_idx: torch.Tensor, g: int, num_groups: int) -> torch.Tensor | None:
    # returns in_perm such that g_idx[in_perm] == arange(IN) // g, or None for the identity
    expected = torch.arange(g_idx.numel(), device=g_idx.device) // g
    g_idx = g_idx.to(torch.int64)
    if torch.equal(g_idx, expected):
        return None
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= num_groups:
        raise ValueError(
            f"g_idx values must lie in [0, {num_groups}), got {g_idx.min()}..{g_idx.max()}"
        )
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], expected):
        counts = torch.bincount(g_idx, minlength=num_groups)
        raise ValueError(
            f"g_idx assigns {counts.min()}..{counts.max()} input rows to a group, not exactly "
            f"group_size={g}; this act-order layout cannot be represented"
        )
    return perm.to(torch.int32)


def gptq_to_int4(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
    checkpoint_format: str = "gptq",
) -> QuantizedLinear:
    """Convert one GPTQ linear layer (v1 "gptq" or "gptq_v2"; see module docstring) exactly."""
    # IN input features, OUT output features, G groups
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"checkpoint_format={checkpoint_format!r}: supported 'gptq', 'gptq_v2'")
    num_in, num_out = qweight.shape[0] * 8, qweight.shape[1]
    g = _resolve_group(group_size, num_in)
    num_groups = num_in // g
    if qzeros.shape != (num_groups, num_out // 8) or scales.shape != (num_groups, num_out):
        raise ValueError(
            f"GPTQ shapes disagree: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
            f"scales {tuple(scales.shape)} for group_size {g}"
        )
    q = _unpack_words(qweight.T.contiguous()).reshape(num_out, num_in)  # [OUT, IN]
    z = _unpack_words(qzeros).reshape(num_groups, num_out)  # [G, OUT]
    if checkpoint_format == "gptq":
        z = z + 1  # v1 stores zero - 1
    perm = None
    if g_idx is not None:
        if g_idx.shape != (num_in,):
            raise ValueError(f"g_idx has shape {tuple(g_idx.shape)}, expected ({num_in},)")
        perm = _act_order_perm(g_idx, g, num_groups)
    if perm is not None:
        q = q[:, perm.to(torch.int64)]
    weights = Int4Weights(pack_nibbles(q), scales.T.contiguous(), _zeros_or_none(z.T.contiguous()))
    return QuantizedLinear(weights, g, perm)


def regroup(linear: QuantizedLinear, group_size: int) -> QuantizedLinear:
    """Split groups into smaller `group_size` ones by repeating scales/zeros (exact).

    Used for per-channel checkpoints (group_size -1) and to give gate/up/down one group size.
    """
    if linear.group_size == group_size:
        return linear
    if linear.group_size % group_size != 0:
        raise ValueError(f"cannot regroup group {linear.group_size} into groups of {group_size}")
    rep = linear.group_size // group_size
    w = linear.weights
    zeros = None if w.zeros is None else w.zeros.repeat_interleave(rep, dim=1)
    new = Int4Weights(w.qweight, w.scales.repeat_interleave(rep, dim=1), zeros)
    return QuantizedLinear(new, group_size, linear.in_perm)


def _take_rows(w: Int4Weights, rows: torch.Tensor) -> Int4Weights:
    return Int4Weights(*(None if t is None else t[rows] for t in w))


def _with_zeros(w: Int4Weights) -> Int4Weights:
    if w.zeros is not None:
        return w
    zeros = torch.full(w.scales.shape, SYMMETRIC_ZERO, dtype=torch.uint8, device=w.scales.device)
    return Int4Weights(w.qweight, w.scales, zeros)


def pack_expert_from_linears(
    gate: QuantizedLinear,
    up: QuantizedLinear,
    down: QuantizedLinear,
    *,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Int4ExpertLayout]:
    """Pack converted gate [I, H], up [I, H], down [H, I] layers into one expert buffer.

    Group sizes are unified to the smallest (exact regrouping); down's act-order permutation is
    absorbed by permuting gate/up output rows (free); gate and up must share one act-order
    permutation of the hidden input (GPTQ gives them the same g_idx: same inputs, same Hessian).
    """
    g = min(gate.group_size, up.group_size, down.group_size)
    gate, up, down = (regroup(lin, g) for lin in (gate, up, down))
    perms = [gate.in_perm, up.in_perm]
    if (perms[0] is None) != (perms[1] is None) or (
        perms[0] is not None and not torch.equal(perms[0], perms[1])
    ):
        raise ValueError("gate and up have different act-order permutations (g_idx); unsupported")
    gate_w, up_w, down_w = gate.weights, up.weights, down.weights
    if down.in_perm is not None:  # h[:, perm] feeds down: produce h in that order directly
        rows = down.in_perm.to(torch.int64)
        gate_w, up_w = _take_rows(gate_w, rows), _take_rows(up_w, rows)
    mats = (gate_w, up_w, down_w)
    has_zeros = any(w.zeros is not None for w in mats)
    if has_zeros:
        mats = tuple(_with_zeros(w) for w in mats)
    dtypes = {w.scales.dtype for w in mats}
    if dtypes not in ({torch.float16}, {torch.bfloat16}):
        raise ValueError(f"scales must all be fp16 or all bf16, got {sorted(map(str, dtypes))}")
    scale_dtype = "fp16" if dtypes == {torch.float16} else "bf16"
    i, h = gate_w.qweight.shape[0], gate_w.qweight.shape[1] * 8
    layout = Int4ExpertLayout(h, i, g, has_zeros, scale_dtype, perms[0] is not None)
    return pack_expert_int4(*mats, layout, hidden_perm=perms[0], out=out), layout


# --------------------------------------------------------------------------- config parsing


@dataclass(frozen=True)
class CheckpointQuantConfig:
    """A validated `quantization_config` we can load."""

    method: str  # "awq" | "gptq"
    group_size: int  # -1: one group per input row (per-channel)
    bits: int = 4
    sym: bool = False
    desc_act: bool = False
    checkpoint_format: str = "gemm"  # awq: "gemm"; gptq: "gptq" (v1) | "gptq_v2"
    modules_to_not_convert: tuple[str, ...] = field(default_factory=tuple)


def _get(cfg: dict[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if name in cfg and cfg[name] is not None:
            return cfg[name]
    return default


def _unsupported(key: str, value: Any, supported: str) -> ValueError:
    return ValueError(
        f"quantization_config.{key}={value!r} is not supported (supported: {supported})"
    )


def _parse_group_size(cfg: dict[str, Any]) -> int:
    group_size = _get(cfg, "group_size", "q_group_size", default=128)
    ok = isinstance(group_size, int) and (
        group_size == -1 or (16 <= group_size <= 4096 and group_size & (group_size - 1) == 0)
    )
    if not ok:
        raise _unsupported("group_size", group_size, "-1 or a power of two in 16..4096")
    return group_size


def parse_quantization_config(config: dict[str, Any]) -> CheckpointQuantConfig:
    """Validate a HF `config.json` dict (or its `quantization_config`) for int4 loading.

    Raises ValueError naming the offending key and the supported values.
    """
    cfg = config.get("quantization_config", config)
    if not isinstance(cfg, dict):
        raise ValueError("quantization_config must be a JSON object")
    method = str(_get(cfg, "quant_method", default="")).lower()
    if method not in ("awq", "gptq"):
        raise _unsupported("quant_method", cfg.get("quant_method"), "'awq', 'gptq'")
    bits = _get(cfg, "bits", "w_bit", default=4)
    if bits != 4:
        raise _unsupported("bits", bits, "4")
    group_size = _parse_group_size(cfg)
    skip = tuple(_get(cfg, "modules_to_not_convert", default=()) or ())
    if method == "awq":
        version = str(_get(cfg, "version", default="gemm")).lower()
        if version != "gemm":
            raise _unsupported("version", cfg.get("version"), "'gemm' (GEMM packing)")
        if _get(cfg, "zero_point", default=True) is not True:
            raise _unsupported("zero_point", cfg.get("zero_point"), "true")
        return CheckpointQuantConfig("awq", group_size, 4, False, False, "gemm", skip)
    if _get(cfg, "is_marlin_format", default=False):
        raise _unsupported("is_marlin_format", cfg["is_marlin_format"], "false")
    fmt = str(_get(cfg, "checkpoint_format", "format", default="gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        key = "checkpoint_format" if "checkpoint_format" in cfg else "format"
        raise _unsupported(key, fmt, "'gptq' (v1), 'gptq_v2'")
    pack_dtype = str(_get(cfg, "pack_dtype", default="int32")).lower().removeprefix("torch.")
    if pack_dtype != "int32":
        raise _unsupported("pack_dtype", cfg.get("pack_dtype"), "'int32'")
    if _get(cfg, "dynamic", default=None):
        raise _unsupported("dynamic", "<per-module overrides>", "none (one config for all modules)")
    sym, desc_act = _get(cfg, "sym", default=True), _get(cfg, "desc_act", default=False)
    for key, value in (("sym", sym), ("desc_act", desc_act)):
        if not isinstance(value, bool):
            raise _unsupported(key, value, "true, false")
    return CheckpointQuantConfig("gptq", group_size, 4, sym, desc_act, fmt, skip)
