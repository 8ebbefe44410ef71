"""Int4 expert format: group-wise 4-bit weights, one packed uint8 buffer per expert.

Per matrix W [N out, K in] (the runtime computes y = x @ W^T):

- Groups run along K, the input (= reduction) dimension: `group_size` consecutive input columns
  of one output row share a scale and a zero point. G = K / group_size.
- ``qweight`` int32 [N, K/8]: out-major, packed along K. Word (n, w) holds q[n, 8w + j] in bits
  4j..4j+3 (j = 0 is the least significant nibble). Seen as bytes (little-endian): byte k // 2 of
  row n, even k in the low nibble. q is unsigned, 0..15.
- ``scales`` [N, G]: bf16 for weights we quantize; fp16 for AWQ/GPTQ checkpoints (their fp16
  scales do not fit bf16 exactly, and conversion is exact).
- ``zeros`` uint8 [N, G], asymmetric formats only: an integer zero point, 0..15 from our
  quantizer and AWQ, 1..16 from GPTQ v1 checkpoints (hence a byte, not a nibble). Symmetric
  formats store no zeros: the zero point is 8.
- Dequantized W[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g], computed exactly in fp32 and
  rounded once to the output dtype.

Why out-major and packed along K: a decode GEMV program owns a block of output rows and streams
each row's K range as long contiguous runs (vector loads, full 32-byte sectors), the 8
nibbles of a word are 8 consecutive k, so the reduction stays inside a thread until the end, and
a row's scale is one value per group. The same tile is the A operand of the MMA kernel (x^T is
B), the usual swap-AB shape for small token counts.

An expert (gate [I, H], up [I, H], down [H, I]) is ONE buffer; sections start at 256-byte
offsets, in this order:

  gate_up.qweight int32 [2I, H/8]   gate rows 0..I-1, then up rows I..2I-1
  gate_up.scales        [2I, H/g]
  gate_up.zeros   uint8 [2I, H/g]   (has_zeros)
  down.qweight    int32 [H, I/8]
  down.scales           [H, I/g]
  down.zeros      uint8 [H, I/g]    (has_zeros)
  hidden_perm     int32 [H]         (has_act_order: gate/up read x[:, hidden_perm], GPTQ act-order)

gate and up are adjacent so one kernel (or one dequant + one matmul) covers both.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

ALIGN_BYTES = 256
SYMMETRIC_ZERO = 8
_SCALE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_MAX_CHUNK_ELEMS = 1 << 24  # rows are quantized in chunks of at most this many weights


class Int4Weights(NamedTuple):
    """One int4 matrix [N, K]: qweight int32 [N, K/8], scales [N, G], zeros uint8 [N, G] or None."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None


def _align(num_bytes: int) -> int:
    return (num_bytes + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES


@dataclass(frozen=True)
class Int4ExpertLayout:
    """Byte layout of one int4 expert buffer (see the module docstring for the format)."""

    hidden_size: int
    intermediate_size: int
    group_size: int = 128
    has_zeros: bool = True
    scale_dtype: str = "bf16"  # "bf16" (our quantizer) or "fp16" (AWQ/GPTQ checkpoints)
    has_act_order: bool = False  # a hidden-size input permutation for gate/up is stored

    def __post_init__(self) -> None:
        g = self.group_size
        assert g >= 16 and g & (g - 1) == 0, f"group_size must be a power of two >= 16, got {g}"
        for name in ("hidden_size", "intermediate_size"):
            size = getattr(self, name)
            assert size > 0 and size % g == 0, f"{name}={size} is not a multiple of group {g}"
        assert self.scale_dtype in _SCALE_DTYPES, f"scale_dtype must be one of {_SCALE_DTYPES}"

    @property
    def scale_torch_dtype(self) -> torch.dtype:
        return _SCALE_DTYPES[self.scale_dtype]

    @functools.cached_property
    def sections(self) -> dict[str, tuple[int, int]]:
        """Section name -> (byte offset, byte length); every offset is 256-byte aligned."""
        h, i, g = self.hidden_size, self.intermediate_size, self.group_size
        sizes = [
            ("gate_up.qweight", 2 * i * h // 2),
            ("gate_up.scales", 2 * i * (h // g) * 2),
            ("gate_up.zeros", 2 * i * (h // g) if self.has_zeros else 0),
            ("down.qweight", h * i // 2),
            ("down.scales", h * (i // g) * 2),
            ("down.zeros", h * (i // g) if self.has_zeros else 0),
            ("hidden_perm", 4 * h if self.has_act_order else 0),
        ]
        out, offset = {}, 0
        for name, size in sizes:
            out[name] = (offset, size)
            offset = _align(offset + size)
        return out

    @property
    def num_bytes(self) -> int:
        """Buffer size in bytes (a multiple of 256, so buffers can sit back to back)."""
        offset, size = self.sections["hidden_perm"]
        return _align(offset + size)

    def _section(self, buffer: torch.Tensor, name: str, dtype: torch.dtype, rows: int):
        offset, size = self.sections[name]
        return buffer[offset : offset + size].view(dtype).view(rows, -1)

    def gate_up_views(self, buffer: torch.Tensor) -> Int4Weights:
        """The stacked gate/up matrix [2I, H] (gate rows first) as views into `buffer`."""
        self._check(buffer)
        rows = 2 * self.intermediate_size
        zeros = (
            self._section(buffer, "gate_up.zeros", torch.uint8, rows) if self.has_zeros else None
        )
        return Int4Weights(
            self._section(buffer, "gate_up.qweight", torch.int32, rows),
            self._section(buffer, "gate_up.scales", self.scale_torch_dtype, rows),
            zeros,
        )

    def down_views(self, buffer: torch.Tensor) -> Int4Weights:
        """The down matrix [H, I] as views into `buffer`."""
        self._check(buffer)
        rows = self.hidden_size
        zeros = self._section(buffer, "down.zeros", torch.uint8, rows) if self.has_zeros else None
        return Int4Weights(
            self._section(buffer, "down.qweight", torch.int32, rows),
            self._section(buffer, "down.scales", self.scale_torch_dtype, rows),
            zeros,
        )

    def views(self, buffer: torch.Tensor) -> tuple[Int4Weights, Int4Weights, Int4Weights]:
        """(gate, up, down) as views into `buffer`; writes through them land in the buffer."""
        gate_up, i = self.gate_up_views(buffer), self.intermediate_size
        zeros = gate_up.zeros
        gate = Int4Weights(
            gate_up.qweight[:i], gate_up.scales[:i], None if zeros is None else zeros[:i]
        )
        up = Int4Weights(
            gate_up.qweight[i:], gate_up.scales[i:], None if zeros is None else zeros[i:]
        )
        return gate, up, self.down_views(buffer)

    def hidden_perm_view(self, buffer: torch.Tensor) -> torch.Tensor | None:
        """int32 [H]: gate/up consume x[:, hidden_perm]; None without act-order."""
        if not self.has_act_order:
            return None
        self._check(buffer)
        return self._section(buffer, "hidden_perm", torch.int32, 1)[0]

    def _check(self, buffer: torch.Tensor) -> None:
        assert buffer.dtype == torch.uint8 and buffer.dim() == 1, "expert buffer must be 1-D uint8"
        assert buffer.is_contiguous() and buffer.numel() >= self.num_bytes, (
            f"expert buffer holds {buffer.numel()} bytes, layout needs {self.num_bytes}"
        )
        assert buffer.storage_offset() % 4 == 0, "expert buffer must start 4-byte aligned"


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Pack integer codes [N, K] (0..15) along K into int32 [N, K/8] (nibble j = k % 8)."""
    n, k = q.shape
    assert k % 8 == 0, f"K={k} must be a multiple of 8"
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)
    words = (q.to(torch.int64).view(n, k // 8, 8) << shifts).sum(-1)  # [N, K/8], < 2^32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_nibbles(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: int32 [N, K/8] -> uint8 codes [N, K]."""
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    codes = (qweight[..., None] >> shifts) & 0xF  # [N, K/8, 8]
    return codes.reshape(qweight.shape[0], -1).to(torch.uint8)


def _group_params(w, ratio, symmetric, scale_dtype):
    # w [R, G, g] fp32 -> scales [R, G] (scale_dtype), zeros [R, G] fp32 (integer valued)
    if symmetric:
        scale = w.abs().amax(-1) * ratio / 7
    else:  # the range always contains 0 so the zero point stays within 0..15
        w_max = w.amax(-1).clamp(min=0) * ratio
        w_min = w.amin(-1).clamp(max=0) * ratio
        scale = (w_max - w_min) / 15
    tiny = torch.finfo(scale_dtype).tiny
    scale = torch.where(scale > 0, scale.clamp(min=tiny), torch.ones_like(scale)).to(scale_dtype)
    if symmetric:
        return scale, torch.full_like(w[..., 0], SYMMETRIC_ZERO)
    return scale, torch.round(-w_min / scale.float()).clamp(0, 15)


def _quantize_rows(w, group_size, symmetric, scale_dtype, clip_ratios):
    # w [R, K] fp32; returns codes [R, K] uint8, scales [R, G], zeros [R, G] fp32
    r, k = w.shape
    wg = w.view(r, k // group_size, group_size)  # [R, G, g]
    best = None
    for ratio in clip_ratios:
        scale, zero = _group_params(wg, ratio, symmetric, scale_dtype)
        s, z = scale.float()[..., None], zero[..., None]
        q = (torch.round(wg / s) + z).clamp(0, 15)
        if len(clip_ratios) == 1:
            return q.view(r, k).to(torch.uint8), scale, zero
        err = ((q - z) * s - wg).square().sum(-1)  # [R, G]
        if best is None:
            best = [err, q, scale, zero]
            continue
        better = err < best[0]
        best[0] = torch.where(better, err, best[0])
        best[1] = torch.where(better[..., None], q, best[1])
        best[2] = torch.where(better, scale, best[2])
        best[3] = torch.where(better, zero, best[3])
    _, q, scale, zero = best
    return q.view(r, k).to(torch.uint8), scale, zero


# Clipping ratios tried per group by method="clip" (the best weight MSE wins; 1.0 is plain RTN).
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def quantize_int4(
    weight: torch.Tensor,
    group_size: int = 128,
    *,
    symmetric: bool = False,
    method: str = "rtn",
    scale_dtype: torch.dtype = torch.bfloat16,
) -> Int4Weights:
    """Quantize a bf16/fp32 matrix [N, K] group-wise along K to int4.

    method "rtn": round-to-nearest (half to even) on the group's range: asymmetric min/max
    (range widened to contain 0; scale = range / 15, integer zero point) or symmetric
    (scale = max|w| / 7, zero point 8, no zeros stored). method "clip": additionally tries the
    clipping ratios in `CLIP_RATIOS` per group and keeps the one with the least squared error.
    Values exactly on a group's grid (min and max of the grid present) round-trip exactly.
    """
    # N out rows, K in, G groups
    n, k = weight.shape
    assert k % group_size == 0, f"K={k} is not a multiple of group_size={group_size}"
    assert method in ("rtn", "clip"), f"method must be 'rtn' or 'clip', got {method!r}"
    ratios = CLIP_RATIOS if method == "clip" else (1.0,)
    rows_per_chunk = max(1, _MAX_CHUNK_ELEMS // (k * len(ratios)))
    codes, scales, zeros = [], [], []
    for start in range(0, n, rows_per_chunk):
        w = weight[start : start + rows_per_chunk].float()
        q, s, z = _quantize_rows(w, group_size, symmetric, scale_dtype, ratios)
        codes.append(pack_nibbles(q))
        scales.append(s)
        zeros.append(z.to(torch.uint8))
    zeros_all = None if symmetric else torch.cat(zeros)
    return Int4Weights(torch.cat(codes), torch.cat(scales), zeros_all)


def dequantize_int4(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Dequantize int4 [N, K/8] to `dtype` [N, K]: (q - z) * s exact in fp32, rounded once."""
    # N out, K in, G groups
    n, g = qweight.shape[0], group_size
    q = unpack_nibbles(qweight).float().view(n, -1, g)  # [N, G, g]
    z = zeros.float() if zeros is not None else torch.full_like(q[..., 0], SYMMETRIC_ZERO)
    w = (q - z[..., None]) * scales.float()[..., None]
    return w.view(n, -1).to(dtype)


def pack_expert_int4(
    gate: Int4Weights,
    up: Int4Weights,
    down: Int4Weights,
    layout: Int4ExpertLayout,
    *,
    hidden_perm: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write three int4 matrices (and the act-order hidden permutation) into one expert buffer.

    `out` (e.g. a pinned host buffer) receives the bytes when given; padding is zeroed.
    """
    if out is None:
        out = torch.zeros(layout.num_bytes, dtype=torch.uint8, device=gate.qweight.device)
    assert (hidden_perm is not None) == layout.has_act_order, "hidden_perm iff has_act_order"
    out[: layout.num_bytes].zero_()
    for dst, src in zip(layout.views(out), (gate, up, down)):
        assert (src.zeros is not None) == layout.has_zeros, "zeros present iff layout.has_zeros"
        assert src.qweight.shape == dst.qweight.shape, (src.qweight.shape, dst.qweight.shape)
        assert src.scales.shape == dst.scales.shape, (src.scales.shape, dst.scales.shape)
        assert src.scales.dtype == dst.scales.dtype, "scale dtype differs from the layout's"
        for d, s in zip(dst, src):
            if d is not None:
                d.copy_(s)
    if hidden_perm is not None:
        layout.hidden_perm_view(out).copy_(hidden_perm)
    return out


def quantize_expert_int4(
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    group_size: int = 128,
    *,
    symmetric: bool = False,
    method: str = "rtn",
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Int4ExpertLayout]:
    """Quantize a bf16 expert (gate [I, H], up [I, H], down [H, I]) into one int4 buffer."""
    i, h = gate.shape
    layout = Int4ExpertLayout(h, i, group_size, has_zeros=not symmetric)
    mats = [
        quantize_int4(w, group_size, symmetric=symmetric, method=method) for w in (gate, up, down)
    ]
    return pack_expert_int4(*mats, layout, out=out), layout


def expert_forward_int4_reference(
    x: torch.Tensor,
    buffer: torch.Tensor,
    layout: Int4ExpertLayout,
    weight_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """down(silu(gate x) * up x) with weights dequantized to `weight_dtype`, fp32 matmuls."""
    # T tokens, H hidden, I intermediate
    g = layout.group_size
    gate_up, down = layout.gate_up_views(buffer), layout.down_views(buffer)
    w_gate_up = dequantize_int4(*gate_up, g, dtype=weight_dtype).float()  # [2I, H]
    w_down = dequantize_int4(*down, g, dtype=weight_dtype).float()  # [H, I]
    xf = x.float()
    perm = layout.hidden_perm_view(buffer)
    if perm is not None:
        xf = xf.index_select(1, perm.to(torch.int64))
    h_gate, h_up = (xf @ w_gate_up.T).chunk(2, dim=1)  # [T, I] each
    return ((F.silu(h_gate) * h_up) @ w_down.T).to(x.dtype)  # [T, H]
