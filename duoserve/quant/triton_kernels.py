"""Triton kernels for int4 experts (format: duoserve/quant/int4.py), with torch fallbacks.

- ``gemv``: one token, FMA units. A program owns `block_n` output rows and walks K one group at
  a time; per-thread partial dots are scaled per group and reduced across threads once.
- ``mma``: 2..16 tokens (or prefill tiles of `block_t`): each group's dequantized weight tile is
  the A operand of tl.dot and x^T the B operand (tokens are the MMA's N), scale applied after.
- ``dequant``: int4 -> bf16 into a caller-given scratch buffer (prefill, then cuBLAS matmul).

gemv/mma read the packed weights exactly once, optionally fuse gate/up (rows n and n + I of the
stacked [2I, H] matrix) into silu(gate) * up, and split K across programs when there are too few
row blocks to fill the GPU (the last program of a tile sums the fp32 partials: one launch).
Dequantization avoids int -> float instructions (see _int4_triton.py). triton is imported
lazily: the package imports and the torch paths run without it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from duoserve.quant.int4 import Int4ExpertLayout, dequantize_int4

MAX_DECODE_TOKENS = 16  # above this expert_forward_int4 dequantizes to scratch and uses matmul
GEMV_MAX_TOKENS = 1  # T <= this uses the gemv (FMA) kernel, larger T the mma kernel


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters. unroll: groups per loop step (dequant: groups per program);
    split_k: K splits (0: about 4 programs per SM); block_t: tokens per program (0: T rounded
    up to a power of two for gemv, 16 for mma)."""

    kernel: str  # "gemv" | "mma" | "dequant"
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    unroll: int = 1
    split_k: int = 0
    block_t: int = 0
    prefetch: bool = False  # gemv: load the next group while computing this one


_CANDIDATES = {  # (block_n, num_warps, num_stages, unroll, prefetch); first = untuned default
    "gemv": [
        (128, 4, 1, 1, True),
        (64, 2, 1, 1, True),
        (64, 4, 1, 1, True),
        (128, 4, 1, 2, False),
        (32, 1, 1, 2, False),
    ],
    "mma": [
        (64, 4, 3, 1, False),
        (128, 4, 3, 1, False),
        (64, 4, 2, 2, False),
        (128, 8, 3, 1, False),
    ],
    "dequant": [
        (32, 4, 1, 2, False),
        (64, 4, 1, 1, False),
        (16, 4, 1, 4, False),
        (64, 8, 1, 2, False),
    ],
}


def candidate_configs(kernel: str, block_t: int = 0) -> list[KernelConfig]:
    """A few configurations worth timing for `kernel` (the first is the untuned default)."""
    return [
        KernelConfig(kernel, n, w, s, u, 0, block_t, p) for n, w, s, u, p in _CANDIDATES[kernel]
    ]


def triton_available() -> bool:
    """True when triton can be imported."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels() -> ModuleType:
    # triton decides at decoration time whether to interpret: reload when the mode changed
    from duoserve.quant import _int4_triton

    if _interpreting() != _int4_triton.INTERPRETED:
        importlib.reload(_int4_triton)
    return _int4_triton


# --------------------------------------------------------------------------- launchers

_TUNED: dict[tuple, KernelConfig] = {}
_AUTOTUNE = True
_SCRATCH: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def set_autotune(enabled: bool) -> None:
    """Turn on/off timing the candidate configs on first use of a shape (CUDA only; off: the
    first candidate). Tune during warm-up: timing inside CUDA-graph capture is not possible."""
    global _AUTOTUNE
    _AUTOTUNE = enabled


def _split_scratch(device, ws_numel: int, num_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    # fp32 partials and per-tile arrival counters for split-K (counters return to 0 after use).
    # NOTE: shared per device: split-K launches must not run concurrently on several streams.
    ws, cnt = _SCRATCH.get(device, (None, None))
    if ws is None or ws.numel() < ws_numel:
        ws = torch.empty(max(ws_numel, 1 << 20), dtype=torch.float32, device=device)
    if cnt is None or cnt.numel() < num_tiles:
        cnt = torch.zeros(max(num_tiles, 4096), dtype=torch.int32, device=device)
    _SCRATCH[device] = (ws, cnt)
    return ws, cnt


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_plan(cfg: KernelConfig, num_tiles: int, num_groups: int, device) -> tuple[int, int, int]:
    # -> (unroll, splits, groups per split); every split gets a multiple of `unroll` groups
    unroll = cfg.unroll if num_groups % cfg.unroll == 0 else 1
    splits = cfg.split_k or max(1, 4 * _num_sms(device) // num_tiles)
    splits = max(1, min(splits, num_groups // unroll, 64))
    per_split = -(-num_groups // splits)
    per_split = -(-per_split // unroll) * unroll
    return unroll, -(-num_groups // per_split), per_split


def _check_weights(qweight, scales, zeros, group_size) -> tuple[int, int]:
    n, k = qweight.shape[0], qweight.shape[1] * 8
    assert qweight.dtype == torch.int32 and qweight.is_contiguous(), "qweight: contiguous int32"
    assert k % group_size == 0, f"K={k} is not a multiple of group_size={group_size}"
    assert scales.shape == (n, k // group_size) and scales.is_contiguous(), scales.shape
    assert zeros is None or (zeros.shape == scales.shape and zeros.dtype == torch.uint8)
    assert zeros is None or zeros.is_contiguous()
    return n, k


def _launch(cfg: KernelConfig, x, w, group_size, y, fused: bool) -> None:
    # x [T, K] (None for dequant), w = (qweight, scales, zeros), y [T, N] or [N, K] (dequant)
    kernels = _kernels()
    qweight, scales, zeros = w
    n_rows, k = qweight.shape[0], qweight.shape[1] * 8
    n_out, num_groups = (n_rows // 2 if fused else n_rows), k // group_size
    z = zeros if zeros is not None else scales  # never read when HAS_ZEROS is False
    meta = dict(HAS_ZEROS=zeros is not None, GROUP=group_size, BN=cfg.block_n)
    meta.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    grid_n = -(-n_out // cfg.block_n)
    if cfg.kernel == "dequant":
        unroll = cfg.unroll if num_groups % cfg.unroll == 0 else 1
        grid = (grid_n, num_groups // unroll)
        kernels.dequant[grid](
            qweight, scales, z, y, n_rows, k, kernels.MAGIC, UNROLL=unroll, **meta
        )
        return
    t = x.shape[0]
    if cfg.kernel == "gemv":
        block_t = cfg.block_t or 1 << (t - 1).bit_length()
        assert t <= block_t <= 8, f"the gemv kernel takes at most 8 tokens, got {t}"
        meta.update(PREFETCH=cfg.prefetch)
    else:
        block_t = cfg.block_t or 16
        meta.update(DOT_FP32=_interpreting())
    grid_t = -(-t // block_t)
    unroll, splits, per_split = _split_plan(cfg, grid_n * grid_t, num_groups, y.device)
    ws, cnt = _split_scratch(y.device, splits * 2 * grid_t * block_t * n_out, grid_n * grid_t)
    kernel = kernels.gemv if cfg.kernel == "gemv" else kernels.mma
    kernel[(grid_n, grid_t, splits)](
        x, qweight, scales, z, y, ws, cnt, t, n_out, k, n_out, x.stride(0), y.stride(0),
        per_split, kernels.MAGIC, FUSED=fused, BT=block_t, UNROLL=unroll, **meta,
    )  # fmt: skip


SPLIT_CHOICES = (1, 2, 3, 4, 6, 8, 12, 16)


def sweep_configs(kind: str, time_fn) -> list[tuple[KernelConfig, float]]:
    """Time every candidate block config (automatic split), then the fastest one with each of
    SPLIT_CHOICES (gemv/mma; the split is a grid dimension, no recompilation).

    time_fn(config) -> milliseconds; an exception skips that config. Returns (config, ms),
    fastest first.
    """
    timed = []
    for cfg in candidate_configs(kind):
        try:
            timed.append((cfg, time_fn(cfg)))
        except Exception:  # a config that fails to compile or run is skipped
            continue
    if timed and kind != "dequant":
        best = min(timed, key=lambda item: item[1])[0]
        for split in SPLIT_CHOICES:
            cfg = dataclasses.replace(best, split_k=split)
            try:
                timed.append((cfg, time_fn(cfg)))
            except Exception:
                continue
    return sorted(timed, key=lambda item: item[1])


def _pick_config(kind, x, w, group_size, y, fused) -> KernelConfig:
    candidates = candidate_configs(kind)
    if not (_AUTOTUNE and y.is_cuda) or _interpreting():
        return candidates[0]
    t_bucket = 0 if x is None else 1 << (x.shape[0] - 1).bit_length()  # 1, 2, 4, 8, 16, ...
    key = (kind, fused, tuple(w[0].shape), group_size, w[2] is not None, t_bucket, y.dtype)
    if key not in _TUNED:
        from triton.testing import do_bench

        def time_fn(cfg: KernelConfig) -> float:
            fn = functools.partial(_launch, cfg, x, w, group_size, y, fused)
            return do_bench(fn, warmup=5, rep=20, return_mode="median")

        timed = sweep_configs(kind, time_fn)
        _TUNED[key] = timed[0][0] if timed else candidates[0]
    return _TUNED[key]


def _use_triton(x: torch.Tensor, backend: str) -> bool:
    assert backend in ("auto", "triton", "torch"), f"unknown backend {backend!r}"
    if backend == "auto":
        return x.is_cuda and triton_available()
    return backend == "triton"


def _int4_matmul(x, w, group_size, fused, out, backend, config) -> torch.Tensor:
    # T tokens, K in, N weight rows (fused: 2I rows -> I outputs)
    n_rows, k = _check_weights(*w, group_size)
    assert x.dim() == 2 and x.shape[1] == k, f"x {tuple(x.shape)} does not match K={k}"
    n_out = n_rows // 2 if fused else n_rows
    if out is None:
        out = torch.empty(x.shape[0], n_out, dtype=x.dtype, device=x.device)
    if not _use_triton(x, backend):
        y = x.float() @ dequantize_int4(*w, group_size, torch.bfloat16).float().T  # [T, N]
        if fused:
            gate, up = y.chunk(2, dim=1)
            y = F.silu(gate) * up
        return out.copy_(y)
    x = x.contiguous()
    assert out.is_contiguous(), "out must be contiguous"
    if config is None:
        kind = "gemv" if x.shape[0] <= GEMV_MAX_TOKENS else "mma"
        config = _pick_config(kind, x, w, group_size, out, fused)
    _launch(config, x, w, group_size, out, fused)
    return out


def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    *,
    out: torch.Tensor | None = None,
    backend: str = "auto",
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """y [T, N] = x [T, K] @ dequant(W [N, K])^T, fp32 accumulation, y in x's dtype.

    backend "auto": Triton on CUDA tensors (when importable), else the torch reference
    (dequantize to bf16 + fp32 matmul); "triton" forces Triton (CPU needs TRITON_INTERPRET=1).
    """
    w = (qweight, scales, zeros)
    return _int4_matmul(x, w, group_size, False, out, backend, config)


def int4_gate_up_silu(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    *,
    out: torch.Tensor | None = None,
    backend: str = "auto",
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """silu(x @ gate^T) * (x @ up^T) [T, I] from the stacked int4 gate/up matrix [2I, H]."""
    w = (qweight, scales, zeros)
    return _int4_matmul(x, w, group_size, True, out, backend, config)


def dequantize_int4_into(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    out: torch.Tensor,
    *,
    backend: str = "auto",
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Dequantize W [N, K] into the caller's contiguous `out` [N, K] (bf16 scratch) and return it.

    Bit-identical to `dequantize_int4(..., dtype=out.dtype)`.
    """
    n, k = _check_weights(qweight, scales, zeros, group_size)
    assert out.shape == (n, k) and out.is_contiguous(), f"out must be contiguous [{n}, {k}]"
    if not _use_triton(out, backend):
        return out.copy_(dequantize_int4(qweight, scales, zeros, group_size, out.dtype))
    w = (qweight, scales, zeros)
    config = config or _pick_config("dequant", None, w, group_size, out, False)
    _launch(config, None, w, group_size, out, False)
    return out


def prefill_scratch_numel(layout: Int4ExpertLayout) -> int:
    """Elements of bf16 scratch `expert_forward_int4` needs for prefill (3 * H * I)."""
    return 3 * layout.hidden_size * layout.intermediate_size


def expert_forward_int4(
    x: torch.Tensor,
    buffer: torch.Tensor,
    layout: Int4ExpertLayout,
    *,
    scratch: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """down(silu(gate x) * up x) [T, H] for one int4 expert buffer.

    T <= MAX_DECODE_TOKENS: fused dequant kernels (weights read once). Larger T with Triton:
    dequantize into `scratch` (bf16, >= prefill_scratch_numel elements) and use matmul.
    """
    # T tokens, H hidden, I intermediate
    h, i, g = layout.hidden_size, layout.intermediate_size, layout.group_size
    gate_up, down = layout.gate_up_views(buffer), layout.down_views(buffer)
    perm = layout.hidden_perm_view(buffer)
    x_in = x if perm is None else x.index_select(1, perm)
    if x.shape[0] <= MAX_DECODE_TOKENS or not _use_triton(x, backend):
        act = int4_gate_up_silu(x_in, *gate_up, g, backend=backend)  # [T, I]
        return int4_linear(act, *down, g, backend=backend)  # [T, H]
    if scratch is None:
        scratch = torch.empty(prefill_scratch_numel(layout), dtype=x.dtype, device=x.device)
    w_gate_up = scratch[: 2 * i * h].view(2 * i, h)
    dequantize_int4_into(*gate_up, g, w_gate_up, backend=backend)
    w_down = scratch[2 * i * h : 3 * i * h].view(h, i)
    dequantize_int4_into(*down, g, w_down, backend=backend)
    gate_out, up_out = (x_in @ w_gate_up.T).chunk(2, dim=1)  # [T, I] each
    return (F.silu(gate_out) * up_out) @ w_down.T
