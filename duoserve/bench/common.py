"""Shared pieces of the GPU benchmarks: link bandwidth, one timed generation, environment, JSON."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from duoserve.engine.llm_engine import LLMEngine
from duoserve.layers.sampler import SamplingParams


def measure_link_bandwidth(device: torch.device, expert_bytes: int, repeats: int = 5) -> dict:
    """Host->device bandwidth (GB/s) from pinned memory: 1 GiB copies and 64 expert-size copies."""
    big = torch.empty(2**30, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(big, device=device)
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(big, non_blocking=True)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    big_gbps = big.numel() / sorted(times[1:])[len(times[1:]) // 2] / 1e9
    n = 64
    src = torch.empty(n, expert_bytes, dtype=torch.uint8, pin_memory=True)
    dst_small = torch.empty(2, expert_bytes, dtype=torch.uint8, device=device)
    dst_small.copy_(src[:2])
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for i in range(n):
        dst_small[i % 2].copy_(src[i], non_blocking=True)
    torch.cuda.synchronize(device)
    experts_gbps = n * expert_bytes / (time.perf_counter() - t0) / 1e9
    del big, dst, src, dst_small
    torch.cuda.empty_cache()
    return {"copy_1gib_gbps": big_gbps, "copy_64_experts_gbps": experts_gbps}


def random_prompt(vocab_size: int, num_tokens: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_tokens,), generator=gen).tolist()


def run_generation(engine: LLMEngine, prompt_ids: list[int], max_tokens: int) -> dict[str, Any]:
    """Generate greedily for one request; TTFT, TPOT and expert stats split by phase."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    stats_of = getattr(engine.experts, "stats", None)
    before = stats_of() if stats_of else {}
    req = engine.add_request(prompt_ids, params)
    prefill_stats: dict[str, float] = {}
    while engine.has_unfinished_requests():
        engine.step()
        if not prefill_stats and req.output_token_ids and stats_of:
            prefill_stats = _diff(stats_of(), before)
    after = stats_of() if stats_of else {}
    n = req.num_output_tokens
    ttft = req.first_token_time - req.arrival_time
    decode_s = req.last_token_time - req.first_token_time
    return {
        "prompt_tokens": len(prompt_ids),
        "output_tokens": n,
        "ttft_s": ttft,
        "tpot_s": decode_s / max(n - 1, 1),
        "decode_tok_s": (n - 1) / decode_s if decode_s > 0 else float("nan"),
        "e2e_s": req.finished_time - req.arrival_time,
        "output_token_ids": list(req.output_token_ids),
        "prefill": prefill_stats,
        "decode": _diff(after, _add(before, prefill_stats)) if stats_of else {},
    }


def _diff(a: dict, b: dict) -> dict:
    return {k: a[k] - b.get(k, 0) for k in a if isinstance(a[k], (int, float)) and k != "hit_rate"}


def _add(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + b.get(k, 0) for k in set(a) | set(b)}


def environment() -> dict[str, Any]:
    """GPU, driver, torch, commit and date: stamped on every result file."""
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    try:
        info["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["driver"] = None
    info["commit"] = os.environ.get("DUOSERVE_COMMIT")  # the device copy has no .git
    if info["commit"] is None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            git = ["git", "rev-parse", "--short", "HEAD"]
            info["commit"] = subprocess.run(git, capture_output=True, text=True).stdout.strip()
    return info


def write_json(path: str | Path, obj: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2, default=str))


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec)."""
    widths = [max(len(h), 10) for _, h, _ in columns]
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths)))
    for row in rows:
        cells = []
        for (key, _, fmt), w in zip(columns, widths):
            value = row.get(key)
            cells.append(("-" if value is None else format(value, fmt)).rjust(w))
        print("  ".join(cells))
