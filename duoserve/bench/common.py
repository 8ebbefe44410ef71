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


def measure_link_bandwidth(
    device: torch.device, expert_bytes: int, repeats: int = 5, max_pinned_bytes: int = 2**31
) -> dict:
    """Host->device bandwidth (GB/s) from pinned memory: 1 GiB copies and up to 64 expert-size
    copies (fewer for big experts: at most `max_pinned_bytes` of them, at least 8)."""
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
    n = max(8, min(64, max_pinned_bytes // expert_bytes))
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
    # NOTE: the key keeps its historical name; `expert_copies` says how many were timed
    return {"copy_1gib_gbps": big_gbps, "copy_64_experts_gbps": experts_gbps, "expert_copies": n}


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
            out = subprocess.run(git, capture_output=True, text=True).stdout.strip()
            info["commit"] = out or None
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


# ---------------------------------------------------------------- batches, access groups, bounds


def run_batch(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """Generate greedily for several requests submitted together; timings and phase stats.

    The prefill phase ends when every request has its first token; expert stats are split
    there. `kv_slots` are the KV slots the requests ran in (trace replay keys routing on them).
    """
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    stats_of = getattr(engine.experts, "stats", None)
    before = stats_of() if stats_of else {}
    reqs = [engine.add_request(p, params) for p in prompts]
    slots: list[int | None] = [None] * len(reqs)
    prefill_stats: dict[str, float] | None = None
    prefill_end = None
    while engine.has_unfinished_requests():
        engine.step()
        slots = [s if s is not None else r.slot for s, r in zip(slots, reqs)]
        if prefill_end is None and all(r.output_token_ids for r in reqs):
            prefill_end = time.monotonic()
            prefill_stats = _diff(stats_of(), before) if stats_of else {}
    after = stats_of() if stats_of else {}
    prefill_stats = prefill_stats or {}
    start = min(r.arrival_time for r in reqs)
    tpots = [
        (r.last_token_time - r.first_token_time) / max(r.num_output_tokens - 1, 1) for r in reqs
    ]
    decode_s = max(r.finished_time for r in reqs) - (prefill_end or start)
    n_decode = sum(r.num_output_tokens - 1 for r in reqs)
    return {
        "requests": len(reqs),
        "prompt_tokens": len(prompts[0]),
        "output_tokens": min(r.num_output_tokens for r in reqs),
        "ttft_s": sum(r.first_token_time - r.arrival_time for r in reqs) / len(reqs),
        "ttft_max_s": max(r.first_token_time - r.arrival_time for r in reqs),
        "prefill_s": (prefill_end or start) - start,
        "tpot_s": sum(tpots) / len(tpots),
        "decode_s": decode_s,
        "decode_tok_s": n_decode / decode_s if decode_s > 0 else float("nan"),
        "e2e_s": max(r.finished_time for r in reqs) - start,
        "kv_slots": slots,
        "output_token_ids": [list(r.output_token_ids) for r in reqs],
        "prefill": prefill_stats,
        "decode": _diff(after, _add(before, prefill_stats)) if stats_of else {},
    }


def case_prompts(vocab_size: int, batch: int, prompt_len: int) -> list[list[int]]:
    """The prompts of a benchmark case: the same for every policy and for the HF baseline."""
    return [
        random_prompt(vocab_size, prompt_len, seed=1000 + 31 * b + prompt_len) for b in range(batch)
    ]


def available_ram_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
