"""Triton kernels for int4 experts (format: duoserve/quant/int4.py), with torch fallbacks.

- ``gemv``: one token, FMA units. A program owns `block_n` output rows (gate and up rows when
  fused) and streams their K range in [block_n, block_k / 8] int32 tiles (16-byte loads,
  software-pipelined `num_stages` deep); per-word partial dots are reduced once at the end.
- ``gemm``: tensor cores, any token count: decode tiles of 16 tokens (2..16 tokens, split-K) and
  prefill tiles of 32..256 tokens. The weight tile, dequantized to bf16 in registers, is the A
  operand of tl.dot and x^T the B operand: W4A16 without a bf16 scratch round trip.
- ``dequant``: int4 -> bf16 into a caller-given scratch (the old prefill path, PREFILL_MODE
  "dequant", kept for comparison).

gemv/gemm read each weight tile once per token tile, optionally fuse gate/up (rows n and n + I
of the stacked [2I, H] matrix) into silu(gate) * up, and split K across programs when there are
too few row blocks to fill the GPU (the last program of a tile sums the fp32 partials: one
launch). Config choice per shape: the `PINNED` table (filled from the GPU bench), else timing
the candidates on first use (CUDA, `set_autotune`), else the first candidate. triton is
imported lazily: the package imports and the torch paths run without it.
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

MAX_DECODE_TOKENS = 16  # above this expert_forward_int4 uses the prefill configs
PREFILL_MODE = "fused"  # "fused": gemm kernel; "dequant": dequantize to scratch + cuBLAS


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of one kernel. block_k is capped at the group size (a K tile never
    straddles a group); block_t: tokens per program (gemm; gemv takes 1); split_k: K splits
    (0: about 4 programs per SM)."""

    kernel: str  # "gemv" | "gemm" | "dequant"
    block_n: int
    block_k: int = 128
    block_t: int = 1
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 0


# kind -> (block_n, block_k, block_t, num_warps, num_stages); the first is the untuned default.
# gemv: rows x 64 B tiles, deep pipelines; gemm_decode: 16-token swap-AB tiles (MMA M = rows);
# gemm_prefill: large token tiles so each weight tile is dequantized once per 64-256 tokens.
_CANDIDATES = {
    "gemv": [
        (128, 128, 1, 4, 3),
        (256, 128, 1, 8, 3),
        (64, 128, 1, 4, 4),
        (128, 128, 1, 8, 4),
        (256, 128, 1, 4, 2),
        (512, 128, 1, 8, 3),
        (128, 64, 1, 4, 4),
        (64, 128, 1, 2, 3),
    ],
    "gemm_decode": [
        (64, 128, 16, 4, 3),
        (128, 128, 16, 4, 3),
        (64, 64, 16, 4, 4),
        (128, 64, 16, 8, 4),
        (128, 128, 16, 8, 2),
        (256, 64, 16, 8, 3),
        (64, 128, 16, 4, 5),
    ],
    "gemm_prefill": [
        (128, 64, 128, 8, 3),
        (128, 64, 64, 4, 4),
        (128, 128, 128, 8, 3),
        (64, 64, 128, 4, 4),
        (128, 64, 256, 8, 3),
        (256, 64, 128, 8, 3),
        (128, 32, 128, 8, 4),
        (64, 128, 64, 4, 3),
    ],
    "dequant": [
        (64, 128, 1, 4, 1),
        (32, 128, 1, 4, 1),
        (128, 128, 1, 8, 1),
        (16, 128, 1, 4, 1),
    ],
}
_KERNEL_OF = {"gemv": "gemv", "gemm_decode": "gemm", "gemm_prefill": "gemm", "dequant": "dequant"}

# (weight rows N, K, fused gate/up, token bucket) -> config; paste the GPU bench's "PINNED"
# output here. Buckets: 1, 2, 4, 8, 16 (decode), 32, 64, 128, 256, 512 (prefill, 512 = more).
PINNED: dict[tuple[int, int, bool, int], KernelConfig] = {}


def candidate_configs(kind: str) -> list[KernelConfig]:
    """Configurations worth timing for `kind` (gemv, gemm_decode, gemm_prefill, dequant)."""
    return [KernelConfig(_KERNEL_OF[kind], n, k, t, w, s) for n, k, t, w, s in _CANDIDATES[kind]]


def token_bucket(num_tokens: int) -> int:
    """Power of two >= num_tokens, capped at 512 (the key of PINNED and of the tuning cache)."""
    return min(512, 1 << max(0, num_tokens - 1).bit_length())


def kinds_for_tokens(num_tokens: int) -> list[str]:
    """Candidate kinds for a token count: gemv competes with the 16-token gemm at one token."""
    if num_tokens == 1:
        return ["gemv", "gemm_decode"]
    return ["gemm_decode"] if num_tokens <= MAX_DECODE_TOKENS else ["gemm_prefill"]


def triton_available() -> bool:
    """True when triton can be imported."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _patch_interpreter_for_numpy2() -> None:
    # NOTE: triton 3.6's interpreter calls int() on 1-element arrays, which numpy >= 2.3
    # rejects, so loops with runtime bounds fail; index the single element instead.
    import triton.runtime.interpreter as interp

    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched


def _kernels() -> ModuleType:
    # triton decides at decoration time whether to interpret: reload when the mode changed
    from duoserve.quant import _int4_triton

    if _interpreting() != _int4_triton.INTERPRETED:
        importlib.reload(_int4_triton)
    if _interpreting():
        _patch_interpreter_for_numpy2()
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


def _split_plan(cfg: KernelConfig, num_tiles: int, k: int, block_k: int, device) -> tuple:
    # -> (splits, K elements per split); every split gets a whole number of K tiles
    k_tiles = k // block_k
    splits = cfg.split_k or max(1, 4 * _num_sms(device) // num_tiles)
    splits = max(1, min(splits, k_tiles, 64))
    per_split = -(-k_tiles // splits) * block_k
    return -(-k // per_split), per_split


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
    n_out = n_rows // 2 if fused else n_rows
    block_k = min(cfg.block_k, group_size)  # powers of two: divides the group, hence K
    z = zeros if zeros is not None else scales  # never read when HAS_ZEROS is False
    strides = (qweight.stride(0), scales.stride(0))
    meta = dict(HAS_ZEROS=zeros is not None, GROUP=group_size, BN=cfg.block_n, BK=block_k)
    meta.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    grid_n = -(-n_out // cfg.block_n)
    if cfg.kernel == "dequant":
        grid = (grid_n, k // block_k)
        kernels.dequant[grid](qweight, scales, z, y, n_rows, k, *strides, kernels.MAGIC, **meta)
        return
    t = x.shape[0]
    assert x.stride(1) == 1, "x rows must be contiguous"
    if cfg.kernel == "gemv":
        assert t == 1, f"the gemv kernel takes one token, got {t}"
        splits, per_split = _split_plan(cfg, grid_n, k, block_k, y.device)
        ws, cnt = _split_scratch(y.device, splits * 2 * n_out, grid_n)
        kernels.gemv[(grid_n, 1, splits)](
            x, qweight, scales, z, y, ws, cnt, n_out, k, n_out, *strides, per_split,
            kernels.MAGIC, FUSED=fused, **meta,
        )  # fmt: skip
        return
    assert cfg.kernel == "gemm", f"unknown kernel {cfg.kernel!r}"
    grid_t = -(-t // cfg.block_t)
    splits, per_split = _split_plan(cfg, grid_n * grid_t, k, block_k, y.device)
    ws, cnt = _split_scratch(y.device, splits * 2 * grid_t * cfg.block_t * n_out, grid_n * grid_t)
    kernels.gemm[(grid_n * grid_t, 1, splits)](
        x, qweight, scales, z, y, ws, cnt, t, n_out, k, n_out, x.stride(0), y.stride(0),
        *strides, per_split, kernels.MAGIC, FUSED=fused, BT=cfg.block_t,
        DOT_FP32=_interpreting(), **meta,
    )  # fmt: skip


SPLIT_CHOICES = (1, 2, 4, 6, 8, 12, 16, 24, 32)


def sweep_configs(kinds: list[str], time_fn) -> list[tuple[KernelConfig, float]]:
    """Time every candidate config of `kinds` (automatic split), then the fastest gemv/gemm
    one with each of SPLIT_CHOICES (the split is a grid dimension: no recompilation).

    time_fn(config) -> milliseconds; an exception skips that config. Returns (config, ms),
    fastest first.
    """
    timed = []
    for kind in kinds:
        for cfg in candidate_configs(kind):
            try:
                timed.append((cfg, time_fn(cfg)))
            except Exception:  # a config that fails to compile or run is skipped
                continue
    splittable = [item for item in timed if item[0].kernel != "dequant"]
    if splittable:
        best = min(splittable, key=lambda item: item[1])[0]
        prefill = best.block_t > MAX_DECODE_TOKENS  # enough token tiles: few splits matter
        for split in (1, 2, 4) if prefill else SPLIT_CHOICES:
            cfg = dataclasses.replace(best, split_k=split)
            try:
                timed.append((cfg, time_fn(cfg)))
            except Exception:
                continue
    return sorted(timed, key=lambda item: item[1])


def _pick_config(x, w, group_size, y, fused) -> KernelConfig:
    # dequant when x is None; else PINNED, then the tuning cache / a sweep, then the default
    kinds = ["dequant"] if x is None else kinds_for_tokens(x.shape[0])
    t_bucket = 0 if x is None else token_bucket(x.shape[0])
    key = (w[0].shape[0], w[0].shape[1] * 8, fused, t_bucket)
    if x is not None and key in PINNED:
        return PINNED[key]
    default = candidate_configs(kinds[0])[0]
    if not (_AUTOTUNE and y.is_cuda) or _interpreting():
        return default
    key = (*key, group_size, w[2] is not None, y.dtype)
    if key not in _TUNED:
        from triton.testing import do_bench

        def time_fn(cfg: KernelConfig) -> float:
            fn = functools.partial(_launch, cfg, x, w, group_size, y, fused)
            return do_bench(fn, warmup=5, rep=20, return_mode="median")

        timed = sweep_configs(kinds, time_fn)
        _TUNED[key] = timed[0][0] if timed else default
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
        config = _pick_config(x, w, group_size, out, fused)
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
    config = config or _pick_config(None, w, group_size, out, False)
    _launch(config, None, w, group_size, out, False)
    return out


def prefill_scratch_numel(layout: Int4ExpertLayout) -> int:
    """Elements of bf16 scratch `expert_forward_int4` needs for prefill (3 * H * I) when
    PREFILL_MODE is "dequant" (the fused gemm needs none; callers still allocate it)."""
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

    Triton: the fused kernels (weights read once per token tile, no bf16 copy of the weights);
    with PREFILL_MODE "dequant" and T > MAX_DECODE_TOKENS, dequantize into `scratch` (bf16,
    >= prefill_scratch_numel elements) and use matmul. Torch: the reference path.
    """
    # T tokens, H hidden, I intermediate
    h, i, g = layout.hidden_size, layout.intermediate_size, layout.group_size
    gate_up, down = layout.gate_up_views(buffer), layout.down_views(buffer)
    perm = layout.hidden_perm_view(buffer)
    x_in = x if perm is None else x.index_select(1, perm)
    small = x.shape[0] <= MAX_DECODE_TOKENS
    if small or PREFILL_MODE == "fused" or not _use_triton(x, backend):
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
