"""Triton kernels for int4 experts (format: duoserve/quant/int4.py), with torch fallbacks.

- ``stream`` (1..4 tokens, FMA units): a program owns `block_n` rows (gate and up rows when
  fused) and streams their whole K in [groups, rows, words] int32 tiles of `block_k` inputs,
  `num_stages` tiles in flight; x is first permuted by a small `prep_x` launch (see
  _int4_triton.py). No split-K.
- ``gemv`` / ``mma`` (round 1, kept as candidates): one group per step, split-K; mma (tensor
  cores) for 2..16 tokens and the fused prefill alternative.
- ``dequant``: int4 -> bf16 into a caller-given scratch, then cuBLAS: the prefill path
  (PREFILL_MODE "dequant"; "fused" uses mma with large token tiles instead).
- ``w4a16`` / ``w4a16_b`` (prefill): the nibble-plane W4A16 GEMM (int4_gemm.py), weights on
  tensor cores without a bf16 copy; PREFILL_MODE "auto" takes it where PINNED says so.
- ``wgs`` (prefill, sm_90): the warp-specialized Gluon GEMM (int4_wgs.py): producer warps
  dequantize into shared memory for two wgmma warpgroups; PREFILL_MODE "auto" takes it on
  sm_90 for group 128 and bf16 scales.

Config choice per shape: the `PINNED` table (filled from the GPU bench), else timing the
candidates on first use (CUDA, `set_autotune`), else the first candidate. triton is imported
lazily: the package imports and the torch paths run without it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import os
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from duoserve.quant.int4 import Int4ExpertLayout, dequantize_int4

MAX_DECODE_TOKENS = 16  # above this expert_forward_int4 takes the prefill path
# More than MAX_DECODE_TOKENS tokens: "auto": wgs where int4_wgs.takes (sm_90, group 128, bf16
# scales, a gate/up launch that fills the SMs), else the
# fused w4a16 GEMM where PINNED holds w4a16 configs for both matrices (the GPU bench pins them
# only where they beat dequant + cuBLAS), else dequant; "wgs": wgs or an error; "dequant":
# dequantize to scratch + cuBLAS; "fused": the picked mma/w4a16 config
PREFILL_MODE = "auto"
STREAM_MAX_TOKENS = 4  # the stream kernel's largest token tile


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of one kernel. block_k: K inputs per loop step (stream only; the other
    kernels step one group); block_t: tokens per program; split_k: K splits (gemv/mma/tc; 0:
    about 4 programs per SM); unroll: groups per step (gemv/mma/dequant); prefetch: gemv and
    stream load the next step while computing this one, tc the next group's scales; wide_sz:
    tc loads scales and zero points several groups wide, so they pipeline with the weights;
    one_pass: fused stream walks the gate and up rows together, interleaved, in one pass;
    ahead: stream with prefetch loads this many steps (1 or 2) ahead; half: stream sums its
    products in fp16x2 on x rescaled per token by a power of two (prep_xh; ~1e-3 relative
    error against ~1e-6 for the fp32 path)."""

    kernel: str  # stream gemv mma dequant w4a16 w4a16_b tc tc_s tcg
    block_n: int
    block_k: int = 0
    block_t: int = 1
    num_warps: int = 4
    num_stages: int = 1
    split_k: int = 0
    unroll: int = 1
    prefetch: bool = False
    wide_sz: bool = False
    one_pass: bool = False
    ahead: int = 1
    half: bool = False


# kind -> configs; the first is the untuned default. stream tiles keep every warp on K (block_k
# >= 1024 x num_warps inputs at group 128; see _int4_triton.py): rows per program x K per step.
_S = "stream"
_CANDIDATES: dict[str, list[KernelConfig]] = {
    "stream1": [  # block_n <= 8: 16 rows spill (255 registers on sm_90)
        KernelConfig(_S, 8, 4096, 1, 4, 1),
        KernelConfig(_S, 8, 4096, 1, 4, 2),
        KernelConfig(_S, 4, 4096, 1, 4, 1),
        KernelConfig(_S, 4, 4096, 1, 4, 3),
        KernelConfig(_S, 8, 8192, 1, 8, 1),
        KernelConfig(_S, 8, 8192, 1, 8, 2),
        KernelConfig(_S, 8, 2048, 1, 2, 1),
        KernelConfig(_S, 8, 2048, 1, 2, 3),
        KernelConfig(_S, 4, 8192, 1, 8, 1),
        KernelConfig(_S, 4, 2048, 1, 2, 1),
        KernelConfig(_S, 2, 4096, 1, 4, 1),
        KernelConfig(_S, 4, 1024, 1, 1, 1),
        KernelConfig(_S, 8, 1024, 1, 1, 1),
        KernelConfig(_S, 4, 1024, 1, 1, 1, prefetch=True),
        KernelConfig(_S, 4, 2048, 1, 2, 1, prefetch=True),
        KernelConfig(_S, 4, 4096, 1, 4, 1, prefetch=True),
        KernelConfig(_S, 2, 1024, 1, 1, 1, prefetch=True),
        KernelConfig(_S, 2, 1024, 1, 1, 1),
        KernelConfig(_S, 1, 1024, 1, 1, 1, prefetch=True, one_pass=True, ahead=2),
        KernelConfig(_S, 4, 1024, 1, 1, 1, prefetch=True, ahead=2),
        # fp16x2 products (half-probe-h100-session10.log)
        KernelConfig(_S, 1, 1024, 1, 1, 1, prefetch=True, one_pass=True, ahead=2, half=True),
        KernelConfig(_S, 1, 1024, 1, 1, 1, prefetch=True, one_pass=True, half=True),
        KernelConfig(_S, 2, 1024, 1, 1, 1, prefetch=True, one_pass=True, half=True),
        KernelConfig(_S, 2, 1024, 1, 1, 1, prefetch=True, half=True),
        KernelConfig(_S, 4, 1024, 1, 1, 1, prefetch=True, half=True),
        KernelConfig(_S, 4, 1024, 1, 1, 1, prefetch=True, ahead=2, half=True),
        KernelConfig(_S, 4, 2048, 1, 2, 1, prefetch=True, half=True),
        KernelConfig(_S, 2, 2048, 1, 2, 1, prefetch=True, half=True),
        KernelConfig(_S, 8, 2048, 1, 2, 1, prefetch=True, half=True),
    ],
    "stream2": [
        KernelConfig(_S, 4, 4096, 2, 4, 1),
        KernelConfig(_S, 4, 4096, 2, 4, 2),
        KernelConfig(_S, 4, 2048, 2, 2, 1),
        KernelConfig(_S, 2, 4096, 2, 4, 1),
        KernelConfig(_S, 4, 2048, 2, 2, 1, prefetch=True),
        KernelConfig(_S, 4, 1024, 2, 1, 1, prefetch=True),
        KernelConfig(_S, 2, 1024, 2, 1, 1),
        KernelConfig(_S, 2, 2048, 2, 2, 1),
        KernelConfig(_S, 2, 1024, 2, 1, 1, prefetch=True),
        KernelConfig(_S, 1, 1024, 2, 1, 1, prefetch=True, one_pass=True, ahead=2),
        KernelConfig(_S, 2, 2048, 2, 2, 1, prefetch=True, ahead=2),
        KernelConfig(_S, 1, 1024, 2, 1, 1, prefetch=True, one_pass=True, half=True),
        KernelConfig(_S, 2, 1024, 2, 1, 1, prefetch=True, one_pass=True, half=True),
        KernelConfig(_S, 4, 1024, 2, 1, 1, prefetch=True, half=True),
        KernelConfig(_S, 4, 1024, 2, 1, 1, prefetch=True, ahead=2, half=True),
        KernelConfig(_S, 4, 2048, 2, 2, 1, prefetch=True, half=True),
        KernelConfig(_S, 2, 2048, 2, 2, 1, prefetch=True, ahead=2, half=True),
    ],
    "stream4": [
        KernelConfig(_S, 2, 4096, 4, 4, 1),
        KernelConfig(_S, 2, 2048, 4, 2, 1),
        KernelConfig(_S, 1, 4096, 4, 4, 1),
        KernelConfig(_S, 1, 1024, 4, 1, 1, prefetch=True, one_pass=True, half=True),
        KernelConfig(_S, 2, 1024, 4, 1, 1, prefetch=True, one_pass=True, half=True),
        KernelConfig(_S, 2, 1024, 4, 1, 1, prefetch=True, half=True),
        KernelConfig(_S, 4, 1024, 4, 1, 1, prefetch=True, half=True),
        KernelConfig(_S, 2, 2048, 4, 2, 1, prefetch=True, half=True),
    ],
    "gemv": [  # round 1: the best three of bench/results/int4-kernels-h100.json
        KernelConfig("gemv", 64, num_warps=4, prefetch=True),
        KernelConfig("gemv", 128, num_warps=4, prefetch=True),
        KernelConfig("gemv", 64, num_warps=2, prefetch=True),
    ],
    "mma": [  # round 1, 16-token tiles
        KernelConfig("mma", 64, block_t=16, num_warps=4, num_stages=3),
        KernelConfig("mma", 64, block_t=16, num_warps=4, num_stages=2, unroll=2),
        KernelConfig("mma", 128, block_t=16, num_warps=8, num_stages=3),
    ],
    "mma_prefill": [  # PREFILL_MODE "fused"
        KernelConfig("mma", 128, block_t=64, num_warps=8, num_stages=3),
        KernelConfig("mma", 64, block_t=128, num_warps=4, num_stages=3),
    ],
    "w4a16": [  # prefill, nibble-plane W4A16 GEMM (int4_gemm.py); block_t: tokens per tile
        KernelConfig("w4a16", 64, block_t=128, num_warps=8, num_stages=3),
        KernelConfig("w4a16", 64, block_t=64, num_warps=4, num_stages=3),
        KernelConfig("w4a16", 128, block_t=64, num_warps=8, num_stages=3),
        KernelConfig("w4a16", 128, block_t=128, num_warps=8, num_stages=3),
        KernelConfig("w4a16", 64, block_t=128, num_warps=8, num_stages=4),
        KernelConfig("w4a16", 64, block_t=128, num_warps=4, num_stages=3),
        KernelConfig("w4a16_b", 64, block_t=128, num_warps=8, num_stages=3),
        KernelConfig("w4a16_b", 128, block_t=128, num_warps=8, num_stages=3),
    ],
    "tc": [  # tensor cores (wgmma, sm_90), inline-asm planes (int4_tc.py); 16-token tiles
        KernelConfig("tc", 64, block_t=16, num_warps=4, num_stages=4),
        KernelConfig("tc", 128, block_t=16, num_warps=4, num_stages=3),
        KernelConfig("tc", 128, block_t=16, num_warps=4, num_stages=3, wide_sz=True),
        KernelConfig("tc", 128, block_t=16, num_warps=4, num_stages=4, wide_sz=True),
        KernelConfig("tc", 64, block_t=16, num_warps=4, num_stages=4, wide_sz=True),
        KernelConfig("tc", 128, block_t=16, num_warps=4, num_stages=3, prefetch=True),
        KernelConfig("tc_s", 128, block_t=16, num_warps=4, num_stages=3, wide_sz=True),
    ],
    "tcg": [  # mma.sync in Gluon (int4_tcg.py), 1..8 tokens; measured slower than stream
        # (docs/int4.md, round 7), so no token count's kinds include it: explicit configs only
        KernelConfig("tcg", 32, block_t=8, num_warps=2, split_k=4),
        KernelConfig("tcg", 16, block_t=8, num_warps=1, split_k=8, prefetch=True),
    ],
    "tc_prefill": [  # tc_s: one accumulator over K (256-token tiles spill: 5x slower)
        KernelConfig("tc_s", 64, block_t=128, num_warps=4, num_stages=3),
        KernelConfig("tc_s", 128, block_t=128, num_warps=8, num_stages=3),
        KernelConfig("tc_s", 128, block_t=128, num_warps=8, num_stages=4),
        KernelConfig("tc_s", 64, block_t=128, num_warps=4, num_stages=3, wide_sz=True),
        KernelConfig("tc_s", 128, block_t=128, num_warps=8, num_stages=3, wide_sz=True),
    ],
    "dequant": [
        KernelConfig("dequant", 64, num_warps=4),
        KernelConfig("dequant", 32, num_warps=4, unroll=2),
        KernelConfig("dequant", 16, num_warps=4, unroll=4),
        KernelConfig("dequant", 64, num_warps=8, unroll=2),
    ],
}

# (weight rows N, K, fused gate/up, token bucket) -> config; paste the GPU bench's "PINNED"
# output here. Buckets: 1, 2, 4, 8, 16 (decode), 32..512 (fused prefill), 0 (dequant).
# Decode buckets 1, 2, 4 and dequant (0): bench/results/int4-kernels-h100-v8.log (H100, round 8,
# decode ranked by cold-L2 time, see docs/int4.md); 8, 16: round 5's (...-v5.log); 512
# (PREFILL_MODE "fused" only): round 3's.
# Positional: KernelConfig(kernel, block_n, block_k, block_t, num_warps, num_stages, split_k,
# unroll, prefetch[, wide_sz]).
PINNED: dict[tuple[int, int, bool, int], KernelConfig] = {
    (4096, 14336, False, 1): KernelConfig(_S, 2, 2048, 1, 2, 1, prefetch=True, half=True),
    (28672, 4096, True, 1): KernelConfig(
        _S, 1, 1024, 1, 1, 1, prefetch=True, one_pass=True, ahead=2, half=True
    ),
    (4096, 14336, False, 2): KernelConfig(_S, 4, 1024, 2, 1, 1, prefetch=True, half=True),
    (28672, 4096, True, 2): KernelConfig(
        _S, 2, 1024, 2, 1, 1, prefetch=True, one_pass=True, half=True
    ),
    (4096, 14336, False, 4): KernelConfig(_S, 4, 1024, 4, 1, 1, prefetch=True, half=True),
    (28672, 4096, True, 4): KernelConfig(
        _S, 2, 1024, 4, 1, 1, prefetch=True, one_pass=True, half=True
    ),
    (4096, 14336, False, 8): KernelConfig("tc", 64, 0, 16, 4, 4, 4, 1, False),
    (28672, 4096, True, 8): KernelConfig("tc", 128, 0, 16, 4, 3, 1, 1, False, True),
    (4096, 14336, False, 16): KernelConfig("tc", 64, 0, 16, 4, 4, 4, 1, False),
    (28672, 4096, True, 16): KernelConfig("tc", 128, 0, 16, 4, 3, 1, 1, True),
    (2048, 768, False, 1): KernelConfig(_S, 4, 1024, 1, 1, 1, prefetch=True),
    (1536, 2048, True, 1): KernelConfig(
        _S, 2, 1024, 1, 1, 1, prefetch=True, one_pass=True, half=True
    ),
    (2048, 768, False, 2): KernelConfig(_S, 4, 1024, 2, 1, 1, prefetch=True, half=True),
    (1536, 2048, True, 2): KernelConfig(
        _S, 1, 1024, 2, 1, 1, prefetch=True, one_pass=True, ahead=2
    ),
    (2048, 768, False, 4): KernelConfig(_S, 4, 1024, 4, 1, 1, prefetch=True, half=True),
    (1536, 2048, True, 4): KernelConfig(
        _S, 2, 1024, 4, 1, 1, prefetch=True, one_pass=True, half=True
    ),
    (2048, 768, False, 8): KernelConfig("mma", 64, 0, 16, 4, 3, 12, 1, False),
    (1536, 2048, True, 8): KernelConfig("mma", 64, 0, 16, 4, 2, 0, 2, False),
    (2048, 768, False, 16): KernelConfig("mma", 64, 0, 16, 4, 2, 0, 2, False),
    (1536, 2048, True, 16): KernelConfig("mma", 64, 0, 16, 4, 2, 12, 2, False),
    (4096, 14336, False, 512): KernelConfig("mma", 64, 0, 128, 4, 3, 1, 1, False),
    (28672, 4096, True, 512): KernelConfig("mma", 128, 0, 64, 8, 3, 1, 1, False),
    (2048, 768, False, 512): KernelConfig("mma", 64, 0, 128, 4, 3, 1, 1, False),
    (1536, 2048, True, 512): KernelConfig("mma", 128, 0, 64, 8, 3, 2, 1, False),
    (28672, 4096, False, 0): KernelConfig("dequant", 64, 0, 1, 4, 1, 0, 1, False),
    (4096, 14336, False, 0): KernelConfig("dequant", 64, 0, 1, 4, 1, 0, 1, False),
    (1536, 2048, False, 0): KernelConfig("dequant", 32, 0, 1, 4, 1, 0, 2, False),
    (2048, 768, False, 0): KernelConfig("dequant", 32, 0, 1, 4, 1, 0, 2, False),
}


# Grouped decode launches (experts_forward_int4_grouped), same keys as PINNED; absent keys take
# PINNED's / the tuning cache's config. The bench's grouped sweep (bench/results/
# int4-kernels-h100-v11.log, H100): the fastest of its candidates for Mixtral's top-2 launch and
# Qwen3's top-8 launch, 1 token per expert.
GROUPED_PINNED: dict[tuple[int, int, bool, int], KernelConfig] = {
    (28672, 4096, True, 1): KernelConfig(
        _S, 2, 1024, 1, 1, 1, prefetch=True, one_pass=True, half=True
    ),
    (4096, 14336, False, 1): KernelConfig(_S, 4, 1024, 1, 1, 1, prefetch=True, half=True),
    (1536, 2048, True, 1): KernelConfig(
        _S, 2, 1024, 1, 1, 1, prefetch=True, one_pass=True, half=True
    ),
    (2048, 768, False, 1): KernelConfig(_S, 4, 1024, 1, 1, 1, prefetch=True, half=True),
}


def candidate_configs(kind: str) -> list[KernelConfig]:
    """Configurations worth timing for `kind` (a key of _CANDIDATES)."""
    return list(_CANDIDATES[kind])


def token_bucket(num_tokens: int) -> int:
    """Power of two >= num_tokens, capped at 512 (the key of PINNED and of the tuning cache)."""
    return min(512, 1 << max(0, num_tokens - 1).bit_length())


def kinds_for_tokens(num_tokens: int) -> list[str]:
    """Candidate kinds for a token count, the default's kind first."""
    if num_tokens == 1:
        return ["stream1", "gemv", "mma", "tc"]
    if num_tokens <= STREAM_MAX_TOKENS:
        return ["stream2" if num_tokens == 2 else "stream4", "mma", "tc"]
    if num_tokens <= MAX_DECODE_TOKENS:
        return ["mma", "tc"]
    return ["mma_prefill", "w4a16", "tc_prefill"]


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
def _pdl(device: torch.device) -> bool:
    # programmatic dependent launch (sm_90+): a kernel starts while its predecessor finishes
    # and waits (griddepcontrol.wait) before reading what the predecessor wrote
    if device.type != "cuda" or _interpreting() or os.environ.get("DUOSERVE_NO_PDL") == "1":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


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


def _half(cfg: KernelConfig, group_size: int, step: int) -> bool:
    # fp16x2 products sum 4 consecutive words of one group and row per asm instance (pack=4):
    # groups of >= 4 words, and >= 4 words of a step per thread (with fewer, triton gives the
    # tile 2 words per thread and the 4 packed elements span two rows: H100 sweep, Qwen3 down
    # at K = 768 with 2 warps). Else, or with DUOSERVE_INT4_FP32=1, the fp32 path runs. The
    # interpreter's emulation (no asm, no layouts) runs at any step
    ok = group_size >= 32 and (_interpreting() or step >= 4 * 32 * cfg.num_warps)
    return cfg.half and ok and os.environ.get("DUOSERVE_INT4_FP32") != "1"


@dataclass(frozen=True)
class StreamInput:
    """x prepared for the stream kernel: xp [block_t, 10 or 5, sx] (prep_x fp32 or, with half,
    prep_xh int32) for t tokens of kw words, `groups` groups per step."""

    xp: torch.Tensor
    t: int
    kw: int
    sx: int
    groups: int
    half: bool


def _stream_steps(cfg: KernelConfig, k: int, group_size: int) -> tuple[int, int]:
    # (groups per step, x row stride in words: K / 8 rounded up to whole steps)
    kw, num_groups = k // 8, k // group_size
    groups = min(max(1, cfg.block_k // group_size), 1 << (num_groups - 1).bit_length())
    step = groups * group_size // 8  # words per step
    return groups, -(-kw // step) * step


def stream_input(cfg: KernelConfig, x: torch.Tensor, group_size: int) -> StreamInput:
    """Launch prep_x (or prep_xh) for `cfg`: x [T, K] -> StreamInput, zero-padded to whole
    steps (the stream kernel reads it without masks)."""
    kernels = _kernels()
    t, k = x.shape
    assert t <= cfg.block_t <= STREAM_MAX_TOKENS, f"stream tile {cfg.block_t} < {t} tokens"
    kw = k // 8
    groups, sx = _stream_steps(cfg, k, group_size)
    pdl = _pdl(x.device)
    half = _half(cfg, group_size, groups * group_size // 8)
    xp = _prepared_x(cfg.block_t, sx, half, x.device)
    prep = kernels.prep_xh if half else kernels.prep_x
    prep[(cfg.block_t, -(-sx // 32))](
        x, xp, t, kw, x.stride(0), SX=sx, BW=32, PDL=pdl, num_warps=1, launch_pdl=pdl
    )
    return StreamInput(xp, t, kw, sx, groups, half)


def _prepared_x(num_blocks: int, sx: int, half: bool, device) -> torch.Tensor:
    # prep_x's fp32 [rows, 10, sx] or prep_xh's int32 [rows, 5, sx]
    if half:
        return torch.empty(num_blocks, 5, sx, dtype=torch.int32, device=device)
    return torch.empty(num_blocks, 10, sx, dtype=torch.float32, device=device)


def _stream_meta(cfg: KernelConfig, groups, sx, kw, half, group_size, fused, zeros, pdl) -> dict:
    # the constexprs and launch options stream and stream_grouped share
    step = groups * group_size // 8
    return dict(
        HAS_ZEROS=zeros is not None, FUSED=fused, GROUP=group_size, BN=cfg.block_n, G=groups,
        BT=cfg.block_t, NS=cfg.num_stages, PREFETCH=cfg.prefetch, SX=sx, EVEN=kw % step == 0,
        PDL=pdl, ONE_PASS=cfg.one_pass, AHEAD=cfg.ahead,
        HALF=(2 if _interpreting() else 1) if half else 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=pdl,
    )  # fmt: skip


def stream_launch(cfg: KernelConfig, xin: StreamInput, w, group_size, y, fused: bool) -> None:
    """The stream kernel over the row blocks of w = (qweight, scales, zeros) from a prepared
    input (stream_input with the same cfg): y [T, N] (fused: silu(gate) * up, [T, N / 2])."""
    kernels = _kernels()
    qweight, scales, zeros = w
    n_rows = qweight.shape[0]
    n_out = n_rows // 2 if fused else n_rows
    meta = _stream_meta(
        cfg, xin.groups, xin.sx, xin.kw, xin.half, group_size, fused, zeros, _pdl(y.device)
    )
    z = zeros if zeros is not None else scales  # never read when HAS_ZEROS is False
    kernels.stream[(-(-n_out // cfg.block_n),)](
        xin.xp, qweight, scales, z, y, xin.t, n_out, xin.kw, n_out, y.stride(0),
        qweight.stride(0), scales.stride(0), kernels.STREAM_MAGIC, **meta,
    )  # fmt: skip


_SLOTS = 8  # per-expert scalar arguments of the grouped kernels
MAX_GROUP = _SLOTS  # experts per grouped launch (<= _SLOTS)


def group_offsets(buffers: list[torch.Tensor]) -> tuple[torch.Tensor, int, list[int]] | None:
    """(base, unit, d): buffer e starts d[e] * unit bytes past `base` (the lowest of them), for
    the grouped kernels; None when the buffers are not that (unit not a multiple of 4, an index
    past int32)."""
    ptrs = [b.data_ptr() for b in buffers]
    lowest = min(range(len(ptrs)), key=ptrs.__getitem__)
    deltas = [p - ptrs[lowest] for p in ptrs]
    unit = functools.reduce(math.gcd, deltas, 0) or 4
    if unit % 4 or unit >= 1 << 31 or max(deltas) // unit >= 1 << 31:
        return None
    return buffers[lowest], unit, [d // unit for d in deltas]


def stream_grouped_launch(
    cfg: KernelConfig,
    x: torch.Tensor,
    spans: list[tuple[int, int]],
    w,
    unit: int,
    index: list[int],
    group_size: int,
    y: torch.Tensor,
    fused: bool,
) -> None:
    """prep and stream for up to MAX_GROUP experts in two launches: expert e's tokens are the
    rows lo .. lo + n - 1 of x (spans[e] = (lo, n), n <= cfg.block_t), its weights the views
    w = (qweight, scales, zeros) moved index[e] * unit bytes, its outputs y's rows lo .. lo + n
    - 1 (fused: silu(gate) * up)."""
    kernels = _kernels()
    num, t = len(spans), cfg.block_t
    assert 0 < num <= _SLOTS and len(index) == num, f"{num} experts (1..{_SLOTS})"
    assert all(0 < n <= t for _, n in spans), f"spans {spans} exceed the tile of {t} tokens"
    assert x.stride(1) == 1 and y.stride(1) == 1, "x and y need unit column strides"
    qweight, scales, zeros = w
    n_rows, kw = qweight.shape[0], x.shape[1] // 8
    n_out = n_rows // 2 if fused else n_rows
    groups, sx = _stream_steps(cfg, x.shape[1], group_size)
    half = _half(cfg, group_size, groups * group_size // 8)
    pdl = _pdl(y.device)
    xp = _prepared_x(num * t, sx, half, x.device)
    r = [lo << 8 | n for lo, n in spans] + [0] * (_SLOTS - num)
    kernels.prep_grouped[(num * t, -(-sx // 32))](
        x, xp, kw, x.stride(0), *r, SX=sx, BW=32, BT=t, HALF=half, PDL=pdl, num_warps=1,
        launch_pdl=pdl,
    )  # fmt: skip
    z = zeros if zeros is not None else scales  # never read when HAS_ZEROS is False
    kernels.stream_grouped[(-(-n_out // cfg.block_n), num)](
        xp, qweight, scales, z, y, n_out, kw, n_out, y.stride(0), qweight.stride(0),
        scales.stride(0), kernels.STREAM_MAGIC, unit, *index, *[0] * (_SLOTS - num), *r,
        **_stream_meta(cfg, groups, sx, kw, half, group_size, fused, zeros, pdl),
    )  # fmt: skip


def _launch_stream(cfg: KernelConfig, x, w, group_size, y, fused: bool) -> None:
    # prep_x: x [T, K] -> xp [block_t, 10, K / 8 rounded up to whole steps] fp32, zero-padded
    # (half: prep_xh, xp [block_t, 5, ...] int32); then stream over the row blocks
    stream_launch(cfg, stream_input(cfg, x, group_size), w, group_size, y, fused)


def _launch(cfg: KernelConfig, x, w, group_size, y, fused: bool) -> None:
    # x [T, K] (None for dequant), w = (qweight, scales, zeros), y [T, N] or [N, K] (dequant)
    if cfg.kernel == "stream":
        _launch_stream(cfg, x, w, group_size, y, fused)
        return
    if cfg.kernel in ("tc", "tc_s"):
        from duoserve.quant.int4_tc import tc_matmul

        tc_matmul(cfg, x, w, group_size, y, fused)
        return
    if cfg.kernel == "tcg":
        from duoserve.quant.int4_tcg import tcg_matmul

        tcg_matmul(cfg, x, w, group_size, y, fused)
        return
    if cfg.kernel.startswith("w4a16"):
        from duoserve.quant.int4_gemm import w4a16_matmul

        w4a16_matmul(cfg, x, w, group_size, y, fused)
        return
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
    assert cfg.kernel in ("gemv", "mma"), f"unknown kernel {cfg.kernel!r}"
    if cfg.kernel == "gemv":
        assert t <= cfg.block_t <= 8, f"the gemv kernel takes at most {cfg.block_t} tokens, got {t}"
        meta.update(PREFETCH=cfg.prefetch)
    else:
        meta.update(DOT_FP32=_interpreting())
    grid_t = -(-t // cfg.block_t)
    unroll, splits, per_split = _split_plan(cfg, grid_n * grid_t, num_groups, y.device)
    ws, cnt = _split_scratch(y.device, splits * 2 * grid_t * cfg.block_t * n_out, grid_n * grid_t)
    kernel = kernels.gemv if cfg.kernel == "gemv" else kernels.mma
    kernel[(grid_n, grid_t, splits)](
        x, qweight, scales, z, y, ws, cnt, t, n_out, k, n_out, x.stride(0), y.stride(0),
        per_split, kernels.MAGIC, FUSED=fused, BT=cfg.block_t, UNROLL=unroll, **meta,
    )  # fmt: skip


SPLIT_CHOICES = (1, 2, 3, 4, 6, 8, 12, 16)


def sweep_configs(kinds: list[str], time_fn) -> list[tuple[KernelConfig, float]]:
    """Time every candidate config of `kinds`, then the fastest split-K kernel (gemv/mma) with
    each of SPLIT_CHOICES (the split is a grid dimension: no recompilation).

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
    splittable = [item for item in timed if item[0].kernel in ("gemv", "mma", "tc", "tc_s", "tcg")]
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
    # PINNED, then the tuning cache / a sweep (CUDA), then the first candidate of the kind
    kinds = ["dequant"] if x is None else kinds_for_tokens(x.shape[0])
    key = (w[0].shape[0], w[0].shape[1] * 8, fused, 0 if x is None else token_bucket(x.shape[0]))
    pinned = _pinned_for(PINNED.get(key), 0 if x is None else x.shape[0])
    if pinned is not None:
        return pinned
    default = candidate_configs(kinds[0])[0]
    if not (_AUTOTUNE and y.is_cuda) or _interpreting():
        return default
    key = (*key, group_size, w[2] is not None, y.dtype)
    if key not in _TUNED:

        def time_fn(cfg: KernelConfig) -> float:
            return _median_ms(functools.partial(_launch, cfg, x, w, group_size, y, fused))

        timed = sweep_configs(kinds, time_fn)
        _TUNED[key] = timed[0][0] if timed else default
    return _TUNED[key]


def _pinned_for(pinned: KernelConfig | None, num_tokens: int) -> KernelConfig | None:
    # a PINNED entry, unless a stream tile too small for the tokens
    if pinned is not None and (pinned.kernel != "stream" or num_tokens <= pinned.block_t):
        return pinned
    return None


def _median_ms(fn, warmup: int = 5, rep: int = 20) -> float:
    """Median CUDA-event time of `fn` in ms. Allocates nothing: triton's do_bench flushes the
    L2 with a fresh 256 MB buffer per call, which does not fit under an engine's memory
    budget (a sweep on first use runs inside one)."""
    for _ in range(warmup):
        fn()
    new_event = functools.partial(torch.cuda.Event, enable_timing=True)
    events = [(new_event(), new_event()) for _ in range(rep)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return sorted(start.elapsed_time(end) for start, end in events)[rep // 2]


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
    PREFILL_MODE is "dequant"."""
    return 3 * layout.hidden_size * layout.intermediate_size


def _dequant_expert(buffer, layout, scratch, backend) -> tuple[torch.Tensor, torch.Tensor]:
    # the expert's bf16 weights in `scratch`: gate/up [2I, H], down [H, I]
    h, i, g = layout.hidden_size, layout.intermediate_size, layout.group_size
    w_gate_up = scratch[: 2 * i * h].view(2 * i, h)
    dequantize_int4_into(*layout.gate_up_views(buffer), g, w_gate_up, backend=backend)
    w_down = scratch[2 * i * h : 3 * i * h].view(h, i)
    dequantize_int4_into(*layout.down_views(buffer), g, w_down, backend=backend)
    return w_gate_up, w_down


def _dense_expert(x_in, w_gate_up, w_down) -> torch.Tensor:
    gate_out, up_out = (x_in @ w_gate_up.T).chunk(2, dim=1)  # [T, I] each
    return (F.silu(gate_out) * up_out) @ w_down.T


def _permuted_input(x, buffer, layout) -> torch.Tensor:
    perm = layout.hidden_perm_view(buffer)  # GPTQ act-order
    return x if perm is None else x.index_select(1, perm)


def _prefill_w4a16_configs(num_tokens: int, layout: Int4ExpertLayout):
    # (gate/up, down) w4a16 configs when PREFILL_MODE picks the fused GEMM, else None. "auto":
    # PINNED at the token bucket (else at 512) must hold w4a16 configs for both matrices
    from duoserve.quant.int4_gemm import supports

    if PREFILL_MODE not in ("auto", "w4a16") or not supports(layout.group_size):
        return None
    h, i = layout.hidden_size, layout.intermediate_size
    configs = []
    for key in ((2 * i, h, True), (h, i, False)):
        cfg = PINNED.get((*key, token_bucket(num_tokens))) or PINNED.get((*key, 512))
        if cfg is None or not cfg.kernel.startswith("w4a16"):
            if PREFILL_MODE == "auto":
                return None
            cfg = candidate_configs("w4a16")[0]
        configs.append(cfg)
    return tuple(configs)


def _decode_tc_configs(num_tokens: int, layout: Int4ExpertLayout):
    # (gate/up, down) when PINNED names the tc kernel for both matrices at this token bucket
    h, i = layout.hidden_size, layout.intermediate_size
    bucket = token_bucket(num_tokens)
    configs = tuple(PINNED.get((*key, bucket)) for key in ((2 * i, h, True), (h, i, False)))
    if any(c is None or c.kernel not in ("tc", "tc_s") for c in configs):
        return None
    from duoserve.quant.int4_tc import supports

    scale_dtype = layout.scale_torch_dtype
    return (
        configs
        if all(supports(layout.group_size, scale_dtype, c.kernel) for c in configs)
        else None
    )


def expert_forward_int4(
    x: torch.Tensor,
    buffer: torch.Tensor,
    layout: Int4ExpertLayout,
    *,
    scratch: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """down(silu(gate x) * up x) [T, H] for one int4 expert buffer.

    Triton, T <= MAX_DECODE_TOKENS: the fused kernels (no bf16 copy of the weights; where
    PINNED names tc for both matrices, int4_tc.expert_forward_tc: one permute); more
    tokens: see PREFILL_MODE ("auto" on sm_90: int4_wgs.expert_forward_wgs; "dequant"
    dequantizes into `scratch`, bf16, >= prefill_scratch_numel elements, allocated when None,
    and uses cuBLAS). Torch: the reference.
    """
    g = layout.group_size
    small = x.shape[0] <= MAX_DECODE_TOKENS
    if small and _use_triton(x, backend):
        tc = _decode_tc_configs(x.shape[0], layout)
        if tc is not None:  # one permute; gate/up writes down's input order directly
            from duoserve.quant.int4_tc import expert_forward_tc

            return expert_forward_tc(x, buffer, layout, *tc)
    if not small and _use_triton(x, backend) and PREFILL_MODE in ("auto", "wgs"):
        from duoserve.quant import int4_wgs

        if PREFILL_MODE == "wgs" or int4_wgs.takes(x.shape[0], layout, x.device):
            assert int4_wgs.available(x.device) and int4_wgs.supports(
                g, layout.scale_torch_dtype
            ), "PREFILL_MODE 'wgs' needs sm_90, group 128 and bf16 scales"
            return int4_wgs.expert_forward_wgs(x, buffer, layout)
    if not small and _use_triton(x, backend):
        w4a16 = _prefill_w4a16_configs(x.shape[0], layout)
        if w4a16 is not None:
            from duoserve.quant.int4_gemm import expert_forward_w4a16

            return expert_forward_w4a16(x, buffer, layout, *w4a16)
    x_in = _permuted_input(x, buffer, layout)
    if small or PREFILL_MODE == "fused" or not _use_triton(x, backend):
        act = int4_gate_up_silu(x_in, *layout.gate_up_views(buffer), g, backend=backend)
        return int4_linear(act, *layout.down_views(buffer), g, backend=backend)  # [T, H]
    if scratch is None:
        scratch = torch.empty(prefill_scratch_numel(layout), dtype=x.dtype, device=x.device)
    return _dense_expert(x_in, *_dequant_expert(buffer, layout, scratch, backend))


def grouped_decode_configs(
    x: torch.Tensor, buffer: torch.Tensor, layout: Int4ExpertLayout, act: torch.Tensor,
    out: torch.Tensor,
) -> tuple[KernelConfig, KernelConfig] | None:  # fmt: skip
    """(gate/up, down) configs of a grouped launch over experts with x's tokens: GROUPED_PINNED,
    else the ones expert_forward_int4 would pick (PINNED, the tuning cache, a sweep on first
    use); None unless both are stream configs (more than STREAM_MAX_TOKENS tokens, tc pinned)
    or with GPTQ act-order (every expert permutes x its own way). act [T, I] and out [T, H]
    are written when a sweep runs."""
    if not 1 <= x.shape[0] <= STREAM_MAX_TOKENS or layout.has_act_order:
        return None
    if _decode_tc_configs(x.shape[0], layout) is not None:
        return None
    g, h, i, t = layout.group_size, layout.hidden_size, layout.intermediate_size, x.shape[0]
    keys = ((2 * i, h, True, token_bucket(t)), (h, i, False, token_bucket(t)))
    # GROUPED_PINNED, else PINNED as _pick_config reads it (no views made), else _pick_config
    cfg_gu, cfg_d = (
        GROUPED_PINNED.get(k) or _pinned_for(PINNED.get(k), t) for k in keys
    )  # fmt: skip
    if cfg_gu is None:
        cfg_gu = _pick_config(x, layout.gate_up_views(buffer), g, act, True)
    if cfg_d is None:
        cfg_d = _pick_config(act, layout.down_views(buffer), g, out, False)
    if cfg_gu.kernel != "stream" or cfg_d.kernel != "stream":
        return None
    return cfg_gu, cfg_d


def experts_forward_int4_grouped(
    x_rows: torch.Tensor,
    spans: list[tuple[int, int]],
    buffers: list[torch.Tensor],
    layout: Int4ExpertLayout,
    out: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Decode for several int4 experts of one layout: out[lo : lo + n] = expert e on
    x_rows[lo : lo + n] for spans[e] = (lo, n), buffers[e] its buffer. Triton: the experts of
    one token bucket in four launches per MAX_GROUP of them (gate/up prep and stream, down
    prep and stream) with grouped_decode_configs' configs, so the values depend on the token
    bucket only, not on which experts share a launch (and equal expert_forward_int4's bit for
    bit where it picks the same configs); experts where grouped_decode_configs says None,
    buffers that group_offsets cannot place, and the torch backend: expert_forward_int4 per
    expert."""
    assert len(spans) == len(buffers), f"{len(spans)} spans for {len(buffers)} buffers"
    assert out.dim() == 2 and out.stride(1) == 1, "out: [rows, H] with unit column stride"
    by_bucket: dict[int, list[int]] = {}
    for e, (_, n) in enumerate(spans):
        by_bucket.setdefault(token_bucket(n), []).append(e)
    alone = []
    if _use_triton(x_rows, backend) and any(b <= STREAM_MAX_TOKENS for b in by_bucket):
        x_rows = x_rows.contiguous()
        act = torch.empty(
            x_rows.shape[0], layout.intermediate_size, dtype=x_rows.dtype, device=x_rows.device
        )
    else:
        alone, by_bucket = list(range(len(spans))), {}
    g = layout.group_size
    for members in by_bucket.values():
        lo, n = spans[members[0]]
        cfgs = grouped_decode_configs(
            x_rows[lo : lo + n], buffers[members[0]], layout, act[lo : lo + n], out[lo : lo + n]
        )
        if cfgs is None:
            alone += members
            continue
        for c in range(0, len(members), MAX_GROUP):
            chunk = members[c : c + MAX_GROUP]
            offs = group_offsets([buffers[e] for e in chunk])
            if offs is None:
                alone += chunk
                continue
            base, unit, index = offs
            sp = [spans[e] for e in chunk]
            gu, dn = layout.gate_up_views(base), layout.down_views(base)
            stream_grouped_launch(cfgs[0], x_rows, sp, gu, unit, index, g, act, True)
            stream_grouped_launch(cfgs[1], act, sp, dn, unit, index, g, out, False)
    for e in alone:
        lo, n = spans[e]
        out[lo : lo + n] = expert_forward_int4(
            x_rows[lo : lo + n], buffers[e], layout, backend=backend
        )
    return out
