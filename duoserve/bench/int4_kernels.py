"""Int4 expert kernels on the GPU: correctness vs the torch reference, speed vs the HBM roofline.

    python -m duoserve.bench.int4_kernels --out int4_kernels.json

For the Mixtral (H=4096, I=14336) and Qwen3-30B-A3B (H=2048, I=768) expert shapes, with
triton.testing.do_bench (median, L2 flushed): decode (T = 1, 2, 4, 8, 16) sweeps every candidate
config of the applicable kernels (stream, round-1 gemv and mma) for gate/up + silu and for down,
next to the roofline (bytes read / measured HBM bandwidth) and cuBLAS on the bf16 weights;
prefill (T = 512) reports the int4 expert (dequant-to-bf16 + cuBLAS, the fused mma kernel, and
OVERLAP_EXPERTS experts with the dequant of the next on a side stream) against the bf16 cuBLAS
expert: the overhead ratio. Outputs are poisoned with NaN and checked against fp32 references.
A failing configuration is reported and skipped. Ends with a PINNED table to paste into
duoserve/quant/triton_kernels.py.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import time
import traceback

import torch
import torch.nn.functional as F

from duoserve.quant import triton_kernels
from duoserve.quant.int4 import dequantize_int4, quantize_expert_int4
from duoserve.quant.int4_gemm import expert_forward_w4a16
from duoserve.quant.int4_prefill import experts_prefill_overlapped
from duoserve.quant.int4_tc import expert_forward_tc
from duoserve.quant.triton_kernels import (
    GROUPED_PINNED,
    PINNED,
    KernelConfig,
    candidate_configs,
    dequantize_int4_into,
    expert_forward_int4,
    experts_forward_int4_grouped,
    group_offsets,
    int4_gate_up_silu,
    int4_linear,
    kinds_for_tokens,
    stream_grouped_launch,
    sweep_configs,
    token_bucket,
)

SHAPES = {"mixtral": (4096, 14336), "qwen3-30b-a3b": (2048, 768)}
DECODE_TOKENS = (1, 2, 4, 8, 16)
PREFILL_TOKENS = 512
MAX_REL_ERR = 1e-2
GROUP = 128
OVERLAP_EXPERTS = 4
# experts per grouped decode launch, 1 token each: a token's top-k (Mixtral 2, Qwen3 8) and all 8
# of a Mixtral layer (a batch that routes to every expert)
GROUPED_EXPERTS = {"mixtral": (2, 8), "qwen3-30b-a3b": (8,), "tiny": (2,)}
_HS = dict(prefetch=True, half=True)
# configs timed for each op of the grouped launch of the first count above (with the
# GROUPED_PINNED / this run's best single-expert config): the fastest is the entry's
GROUPED_SWEEP = {
    "gate_up": [
        KernelConfig("stream", 1, 1024, 1, 1, one_pass=True, ahead=2, **_HS),
        KernelConfig("stream", 1, 1024, 1, 1, one_pass=True, **_HS),
        KernelConfig("stream", 2, 1024, 1, 1, one_pass=True, **_HS),
    ],
    "down": [
        KernelConfig("stream", 2, 2048, 1, 2, **_HS),
        KernelConfig("stream", 4, 1024, 1, 1, **_HS),
        KernelConfig("stream", 4, 2048, 1, 2, **_HS),
        KernelConfig("stream", 8, 1024, 1, 1, **_HS),
        KernelConfig("stream", 4, 1024, 1, 1, ahead=2, **_HS),
    ],
}
KINDS: set[str] | None = None  # --kinds: only these candidate kinds (None: all)


SMOKE = os.environ.get("SMOKE", "0") == "1"  # CPU smoke test: interpreter, tiny shapes
if SMOKE:
    SHAPES = {"tiny": (128, 256)}  # group 128: the tc kernels need >= 128
    DECODE_TOKENS = (1, 3)
    PREFILL_TOKENS = 40
    GROUP = 128


def _bench(fn) -> float:
    """Median milliseconds of fn (triton.testing.do_bench flushes L2 between calls)."""
    if SMOKE:  # one timed call on the CPU
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=25, return_mode="median")


ROTATE_BYTES = 256 << 20  # cold timing: distinct weight copies totalling >= 5x the L2
COLD_REPS = 30
SEQ_CALLS = 8  # back-to-back timing (_bench_cold_seq): calls queued in a row


def _copies(w: tuple, total_bytes: int = ROTATE_BYTES) -> list[tuple]:
    """Enough distinct copies of the tensors `w` (None kept) that cycling through them reads
    every byte from HBM: the L2 (50 MB on an H100) never holds the next copy."""
    num = max(2, -(-total_bytes // _nbytes(*w)))
    return [tuple(None if t is None else t.clone() for t in w) for _ in range(num)]


def _bench_cold(fn, copies: list[tuple]) -> float:
    """Median milliseconds of fn(*copies[i % n]) per call, with cold but clean L2.

    do_bench zeroes 256 MB before each call to flush the L2; the zeroes stay in the L2 as dirty
    lines, and a kernel that reads less than the L2 holds then pays for writing them back
    (up to its own size again). Here each call reads a copy no recent call touched, so the
    L2 evicts only clean lines. The calls are queued behind a sleep kernel so that each event
    pair brackets GPU work only, not the host's launch time (see _queued_ms)."""
    if SMOKE:
        return _bench(lambda: fn(*copies[0]))
    return _queued_ms(fn, copies, 1)


def _bench_cold_seq(fn, copies: list[tuple], n: int = 8) -> float:
    """Median milliseconds per call of fn over n calls queued back to back, each on a copy
    the previous len(copies) - 1 calls did not touch (cold L2, as _bench_cold): how a decode
    step runs its experts' launches one after another, so a launch's fixed cost (front end,
    grid start, drain) overlaps the kernels before it instead of being timed alone."""
    n = max(1, min(n, len(copies) - 1))
    if SMOKE:
        return _bench(lambda: [fn(*copies[j]) for j in range(n)]) / n
    return _queued_ms(fn, copies, n) / n


def _queued_ms(fn, copies: list[tuple], n: int) -> float:
    # COLD_REPS event pairs around n calls each, each pair queued behind its own sleep kernel
    # sized from the host's time per call (one pair at a time: the launch queue holds about a
    # thousand launches, and a call may be several). If the sleep ended before the host had
    # queued the pair's calls, the pair timed the host too: that pair again, sleeping 4x longer
    i = 0
    for args in copies[:2]:
        start = time.perf_counter()
        fn(*args)
        host_s = time.perf_counter() - start
    torch.cuda.synchronize()
    sleep_cycles = int(2e9 * (1e-3 + 2 * n * host_s))  # clocks below 2 GHz: longer sleeps
    times = []
    while len(times) < COLD_REPS:
        start, end, slept = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        torch.cuda._sleep(sleep_cycles)
        slept.record()
        start.record()
        for _ in range(n):
            fn(*copies[i % len(copies)])
            i += 1
        end.record()
        host_bound = slept.query()  # True: the GPU had finished sleeping already
        torch.cuda.synchronize()
        if not host_bound:
            times.append(start.elapsed_time(end))
            continue
        assert sleep_cycles < 2_000_000_000, "launches are queued slower than a 1 s sleep"
        sleep_cycles *= 4
    return sorted(times)[COLD_REPS // 2]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def measure_hbm_gbps(device: torch.device) -> float:
    """Device-to-device copy of 2 GiB: (read + write bytes) / time."""
    src = torch.empty(1 << 30, dtype=torch.int16, device=device)
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def measure_h2d_gbps(device: torch.device) -> float:
    """Pinned host -> device copy of 256 MiB (the PCIe link the experts cross)."""
    host = torch.empty(128 << 20, dtype=torch.int16, pin_memory=True)
    dev = torch.empty(host.shape, dtype=host.dtype, device=device)
    ms = _bench(lambda: dev.copy_(host, non_blocking=True))
    return host.numel() * host.element_size() / ms / 1e6


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _check_and_time(cfg, x, w, group, ref, fused, n_out, rows, base, copies=None) -> float:
    # one config: poisoned output, correctness vs ref, then the median time; recorded in rows.
    # With weight copies (decode): also the cold-L2 time, which then ranks the configs
    fn = int4_gate_up_silu if fused else int4_linear
    row = dict(base, kernel=cfg.kernel, config=dataclasses.asdict(cfg))
    rows.append(row)
    try:
        out = torch.full((x.shape[0], n_out), float("nan"), dtype=x.dtype, device=x.device)
        fn(x, *w, group, out=out, config=cfg, backend="triton")
        _sync()
        err = _rel(out, ref) if not out.isnan().any() else float("nan")
        ms = _bench(lambda: fn(x, *w, group, out=out, config=cfg, backend="triton"))
    except Exception as e:  # one failing config must not stop the run
        row["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc(limit=2)
        raise
    row.update(rel_err=err, ok=bool(err < MAX_REL_ERR), time_us=ms * 1e3)
    row["pct_roofline"] = 100 * row["roofline_us"] / row["time_us"]
    if not row["ok"]:
        raise ValueError(f"{cfg}: relative error {err:.2e}")  # not eligible as the best
    if copies is not None:

        def call(*wc):
            fn(x, *wc, group, out=out, config=cfg, backend="triton")

        cold = _bench_cold(call, copies)
        row.update(cold_us=cold * 1e3, cold_pct_roofline=100 * row["roofline_us"] / cold / 1e3)
        return cold
    return ms


def _read_ceiling_us(copies: list[tuple]) -> float:
    """Cold-L2 time of the fastest plain read of the packed weights (a Triton sum of the int32
    words, 16-byte loads, full occupancy): what any kernel reading these bytes once can reach
    at this size, ramp-up and tail included."""
    from duoserve.quant._int4_triton import read_words

    n = copies[0][0].numel()
    best = float("inf")
    for block, warps in ((2048, 4), (4096, 8)):
        grid = -(-n // block)
        sink = torch.empty(grid, dtype=torch.int32, device=copies[0][0].device)

        def read(q, *_, grid=grid, sink=sink, block=block, warps=warps):
            read_words[(grid,)](q, sink, n, BLOCK=block, num_warps=warps)

        best = min(best, _bench_cold(read, copies))
    return best * 1e3


def bench_decode_op(op, x, w, group, w_bf16, ref, bw_gbps) -> list[dict]:
    """Every candidate config of every applicable kernel (then split sweeps) for one op."""
    # T tokens; op "gate_up" (fused silu * up, w [2I, H]) or "down" (w [H, I])
    fused, t = op == "gate_up", x.shape[0]
    n_out = w[0].shape[0] // 2 if fused else w[0].shape[0]
    roof_us = (_nbytes(*w) + _nbytes(x) + t * n_out * 2) / bw_gbps / 1e3
    pin_key = (w[0].shape[0], w[0].shape[1] * 8, fused, token_bucket(t))  # PINNED's key
    base = dict(op=op, tokens=t, roofline_us=roof_us, pin_key=pin_key)
    rows = []
    copies = _copies(w) if t <= triton_kernels.MAX_DECODE_TOKENS else None
    sweep_configs(
        [k for k in kinds_for_tokens(t) if KINDS is None or k in KINDS],
        lambda cfg: _check_and_time(cfg, x, w, group, ref, fused, n_out, rows, base, copies),
    )
    if copies is not None and not SMOKE:
        read_us = _read_ceiling_us(copies)
        base_extra = dict(read_ceiling_us=read_us, read_ceiling_pct=100 * roof_us / read_us)
        for row in rows:
            row.update(base_extra)
        best = _best(rows)
        if best is not None:  # the fastest config again, SEQ_CALLS launches back to back
            fn, cfg = int4_gate_up_silu if fused else int4_linear, KernelConfig(**best["config"])
            out = torch.empty(t, n_out, dtype=x.dtype, device=x.device)
            seq = _bench_cold_seq(
                lambda *wc: fn(x, *wc, group, out=out, config=cfg, backend="triton"),
                copies,
                SEQ_CALLS,
            )
            best.update(seq_us=seq * 1e3, seq_pct_roofline=100 * roof_us / seq / 1e3)
    cublas_us = _bench(lambda: x @ w_bf16.T) * 1e3
    bf16_roof_us = (_nbytes(w_bf16) + _nbytes(x)) / bw_gbps / 1e3
    extra = {}
    if copies is not None:
        del copies
        bf16_copies = _copies((w_bf16,))
        cold_us = _bench_cold(lambda wb: x @ wb.T, bf16_copies) * 1e3
        extra = dict(cublas_bf16_cold_us=cold_us, cublas_bf16_cold_pct=100 * bf16_roof_us / cold_us)
        del bf16_copies
    for row in rows:
        row.update(
            cublas_bf16_us=cublas_us, cublas_bf16_pct_roofline=100 * bf16_roof_us / cublas_us,
            **extra,
        )  # fmt: skip
    return rows


def _expert(name: str, device: torch.device):
    # bf16 expert -> int4 buffer (RTN) + fp32 dequantized weights for references
    h, i = SHAPES[name]
    gen = torch.Generator(device=device).manual_seed(0)
    mats = [
        torch.randn(r, c, generator=gen, device=device) * 0.02 for r, c in ((i, h), (i, h), (h, i))
    ]
    buffer, layout = quantize_expert_int4(*[m.bfloat16() for m in mats], group_size=GROUP)
    gate_up, down = layout.gate_up_views(buffer), layout.down_views(buffer)
    w_gu = dequantize_int4(*gate_up, GROUP, dtype=torch.float32)  # [2I, H]
    w_d = dequantize_int4(*down, GROUP, dtype=torch.float32)  # [H, I]
    return buffer, layout, gate_up, down, w_gu, w_d


def _op_rows(name, layout, gate_up, down, w_gu, w_d, t, bw_gbps) -> list[dict]:
    # both ops of one token count: gate/up + silu on x, down on the activation
    x = torch.randn(t, layout.hidden_size, device=w_gu.device).bfloat16()
    gate, up = (x.float() @ w_gu.T).chunk(2, dim=1)
    act = (F.silu(gate) * up).bfloat16()  # [T, I]
    rows = []
    for op, inp, w, w_ref in (("gate_up", x, gate_up, w_gu), ("down", act, down, w_d)):
        ref = F.silu(gate) * up if op == "gate_up" else act.float() @ w_d.T
        for row in bench_decode_op(op, inp, w, GROUP, w_ref.bfloat16(), ref, bw_gbps):
            rows.append(dict(shape=name, **row))
    return rows


def bench_shape(name: str, device: torch.device, bw_gbps: float) -> tuple[list, dict]:
    """Decode rows for every token count, prefill rows and summary, for one expert shape."""
    buffer, layout, gate_up, down, w_gu, w_d = _expert(name, device)
    rows = []
    for t in (*DECODE_TOKENS, PREFILL_TOKENS):
        print(f"{name}: T={t}", flush=True)
        rows += _op_rows(name, layout, gate_up, down, w_gu, w_d, t, bw_gbps)
    print(f"{name}: prefill summary T={PREFILL_TOKENS}", flush=True)
    prefill = bench_prefill(layout, buffer, w_gu, w_d, rows, bw_gbps)
    return rows, dict(
        shape=name, **prefill, **_bench_tc_experts(layout, buffer, w_gu, w_d, rows),
        **_bench_entry_experts(layout, buffer, w_gu, w_d, rows, bw_gbps),
        **_bench_grouped_experts(name, layout, buffer, w_gu, w_d, rows, bw_gbps),
    )  # fmt: skip


def _bf16_expert(x: torch.Tensor):
    """(w_gate_up [2I, H], w_down [H, I]) -> the bf16 expert on x through cuBLAS."""

    def expert(w_gu: torch.Tensor, w_d: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ w_gu.T).chunk(2, dim=1)
        return (F.silu(gate) * up) @ w_d.T

    return expert


def _bench_tc_experts(layout, buffer, w_gu, w_d, rows) -> dict:
    """The whole expert (permute + gate/up + silu + down, int4_tc.expert_forward_tc) with the
    fastest tc configs of each op, at every token count, next to the bf16 cuBLAS expert."""
    out = {}
    wgu_bf16, wd_bf16 = w_gu.bfloat16(), w_d.bfloat16()
    for t in (*DECODE_TOKENS, PREFILL_TOKENS):
        best = [_best(rows, tokens=t, op=op, kernel_prefix="tc") for op in ("gate_up", "down")]
        if None in best:
            continue
        cfgs = [KernelConfig(**b["config"]) for b in best]
        x = torch.randn(t, layout.hidden_size, device=w_gu.device).bfloat16()

        def expert_bf16(x=x):
            return _bf16_expert(x)(wgu_bf16, wd_bf16)

        def expert_tc(x=x, cfgs=cfgs):
            return expert_forward_tc(x, buffer, layout, *cfgs)

        try:
            err = _rel(expert_tc(), expert_bf16())
            us = _bench(expert_tc) * 1e3
            cold = {}
            if t <= triton_kernels.MAX_DECODE_TOKENS:  # weights cold in the L2, as in decode
                bufs = _copies((buffer,))
                cold["tc_cold_us"] = 1e3 * _bench_cold(
                    lambda b, x=x, cfgs=cfgs: expert_forward_tc(x, b, layout, *cfgs), bufs
                )
                del bufs
                mats = _copies((wgu_bf16, wd_bf16))
                cold["bf16_cold_us"] = 1e3 * _bench_cold(_bf16_expert(x), mats)
                del mats
        except Exception as e:
            traceback.print_exc(limit=3)
            out[f"tc_expert_t{t}_error"] = f"{type(e).__name__}: {e}"
            continue
        out[f"tc_expert_t{t}"] = dict(
            tc_us=us, rel_err=err, bf16_cublas_us=_bench(expert_bf16) * 1e3,
            sum_of_ops_us=best[0]["time_us"] + best[1]["time_us"], **cold,
            configs=[dataclasses.asdict(c) for c in cfgs],
        )  # fmt: skip
    return out


@contextlib.contextmanager
def _pin_best(rows: list[dict], layout, t: int):
    """PINNED holds this run's fastest config of each op at t's token bucket while inside
    (restored after); yields the two best rows (gate/up, down), or None without both."""
    best = [_best(rows, tokens=t, op=op) for op in ("gate_up", "down")]
    if None in best:
        yield None
        return
    h, i = layout.hidden_size, layout.intermediate_size
    keys = [(2 * i, h, True, token_bucket(t)), (h, i, False, token_bucket(t))]
    saved = {k: PINNED.get(k) for k in keys}
    for k, b in zip(keys, best):
        PINNED[k] = KernelConfig(**b["config"])
    try:
        yield best
    finally:
        _restore(PINNED, saved)


def _restore(table: dict, saved: dict) -> None:
    # put back the entries `saved` held (None: there was none)
    for k, c in saved.items():
        if c is None:
            table.pop(k, None)
        else:
            table[k] = c


def _bench_entry_experts(layout, buffer, w_gu, w_d, rows, bw_gbps) -> dict:
    """The whole decode expert through the engine's entry point (expert_forward_int4: every
    launch, with this run's fastest config of each op pinned), weights cold in the L2, against
    the expert's roofline (its int4 bytes / HBM bandwidth) and the cold bf16 cuBLAS expert."""
    out = {}
    roof_us = _nbytes(buffer) / bw_gbps / 1e3
    wgu_bf16, wd_bf16 = w_gu.bfloat16(), w_d.bfloat16()
    bufs, mats = _copies((buffer,)), _copies((wgu_bf16, wd_bf16))  # cold weights, all T
    for t in DECODE_TOKENS:
        x = torch.randn(t, layout.hidden_size, device=w_gu.device).bfloat16()
        with _pin_best(rows, layout, t) as best:
            if best is None:
                continue
            try:
                ref = _bf16_expert(x)(wgu_bf16, wd_bf16)
                err = _rel(expert_forward_int4(x, buffer, layout), ref)
                us = 1e3 * _bench_cold(lambda b, x=x: expert_forward_int4(x, b, layout), bufs)
                seq_us = 1e3 * _bench_cold_seq(
                    lambda b, x=x: expert_forward_int4(x, b, layout), bufs, SEQ_CALLS
                )
                bf16_us = 1e3 * _bench_cold(_bf16_expert(x), mats)
            except Exception as e:
                traceback.print_exc(limit=3)
                out[f"entry_expert_t{t}_error"] = f"{type(e).__name__}: {e}"
                continue
        out[f"entry_expert_t{t}"] = dict(
            cold_us=us, roofline_us=roof_us, pct_roofline=100 * roof_us / us, rel_err=err,
            seq_us=seq_us, seq_pct_roofline=100 * roof_us / seq_us,
            bf16_cold_us=bf16_us, kernels=[b["kernel"] for b in best],
        )  # fmt: skip
    return out


def _timed(fn, copies: list[tuple], roof_us: float) -> dict:
    # cold L2: alone and SEQ_CALLS in a row, next to the roofline
    alone, seq = 1e3 * _bench_cold(fn, copies), 1e3 * _bench_cold_seq(fn, copies, SEQ_CALLS)
    return dict(
        cold_us=alone, pct_roofline=100 * roof_us / alone, seq_us=seq,
        seq_pct_roofline=100 * roof_us / seq, roofline_us=roof_us,
    )  # fmt: skip


def _bench_grouped_experts(name, layout, buffer, w_gu, w_d, rows, bw_gbps) -> dict:
    """Decode of n experts, 1 token each, through experts_forward_int4_grouped (gate/up prep
    and stream, down prep and stream: one launch each for all n). For the first n, each op's
    GROUPED_SWEEP configs (and the current one) are timed and the fastest pinned in
    GROUPED_PINNED (restored after), then for every n: the whole (against n x the expert's
    roofline), each op's two launches (n x that matrix's roofline), and the same experts one
    by one through expert_forward_int4 (four launches each, this run's best single-expert
    configs); cold L2, alone and in a row. The n experts are n copies of one expert in one
    pool (distinct bytes: every byte is read)."""
    out: dict = {}
    h, i = layout.hidden_size, layout.intermediate_size
    keys = {"gate_up": (2 * i, h, True, 1), "down": (h, i, False, 1)}
    saved = {k: GROUPED_PINNED.get(k) for k in keys.values()}
    with _pin_best(rows, layout, 1) as best:
        try:
            for j, n in enumerate(GROUPED_EXPERTS.get(name, ()) if best else ()):
                key = f"grouped_t1_e{n}"
                try:
                    out[key] = _grouped_entry(n, layout, buffer, w_gu, w_d, keys, j == 0, bw_gbps)
                except Exception as e:
                    traceback.print_exc(limit=3)
                    out[key + "_error"] = f"{type(e).__name__}: {e}"
        finally:
            _restore(GROUPED_PINNED, saved)
    return out


def _grouped_entry(n, layout, buffer, w_gu, w_d, keys, sweep, bw_gbps) -> dict:
    # one entry of _bench_grouped_experts: n experts, 1 token each
    g, h = layout.group_size, layout.hidden_size
    pool = buffer.expand(n, -1).contiguous()
    reps = 2 if SMOKE else max(ROTATE_BYTES // _nbytes(pool) + 1, SEQ_CALLS + 1)
    views = [list(p.unbind(0)) for p in [pool] + [pool.clone() for _ in range(reps - 1)]]
    offs = [group_offsets(v) for v in views]
    x = torch.randn(n, h, device=buffer.device).bfloat16()
    spans = [(e, 1) for e in range(n)]
    y = torch.full_like(x, float("nan"))
    act = torch.empty(n, layout.intermediate_size, dtype=x.dtype, device=x.device)
    ops = {
        "gate_up": ([(layout.gate_up_views(o[0]), o[1], o[2]) for o in offs], x, act, True),
        "down": ([(layout.down_views(o[0]), o[1], o[2]) for o in offs], act, y, False),
    }
    result = dict(experts=n, tokens=1)
    for op, (ws, inp, o, fused) in ops.items():
        roof = n * _nbytes(*ws[0][0]) / bw_gbps / 1e3
        current = GROUPED_PINNED.get(keys[op]) or PINNED[keys[op]]
        cands = [current] + [c for c in GROUPED_SWEEP[op] if c != current] if sweep else [current]
        timed = []
        for cfg in cands:

            def launch(w, cfg=cfg, inp=inp, o=o, fused=fused):
                stream_grouped_launch(cfg, inp, spans, *w, g, o, fused)

            timed.append(
                dict(config=dataclasses.asdict(cfg), **_timed(launch, [(w,) for w in ws], roof))
            )
        fastest = min(timed, key=lambda r: r["cold_us"])
        GROUPED_PINNED[keys[op]] = KernelConfig(**fastest["config"])
        result[op] = dict(fastest, candidates=timed)
    experts_forward_int4_grouped(x, spans, views[0], layout, y)
    alone = torch.cat(
        [expert_forward_int4(x[e : e + 1], b, layout) for e, b in enumerate(views[0])]
    )
    roof = n * _nbytes(buffer) / bw_gbps / 1e3

    def whole(v):
        experts_forward_int4_grouped(x, spans, v, layout, y)

    def one_by_one(v):
        for e, b in enumerate(v):
            expert_forward_int4(x[e : e + 1], b, layout)

    ref = _bf16_expert(x[:1])(w_gu.bfloat16(), w_d.bfloat16())
    return dict(
        result, rel_err=_rel(y[:1], ref), max_diff_one_by_one=(y - alone).abs().max().item(),
        grouped=_timed(whole, [(v,) for v in views], roof),
        one_by_one=_timed(one_by_one, [(v,) for v in views], roof),
    )  # fmt: skip


def _best(rows: list[dict], kernel_prefix: str = "", **match) -> dict | None:
    ok = [r for r in rows if r.get("ok") and all(r[k] == v for k, v in match.items())]
    ok = [r for r in ok if r["kernel"].startswith(kernel_prefix)]
    return min(ok, key=lambda r: r.get("cold_us", r["time_us"])) if ok else None


def bench_prefill(layout, buffer, w_gu, w_d, rows, bw_gbps) -> dict:
    """The int4 expert at PREFILL_TOKENS: the best gemm configs end to end (gate/up + silu, then
    down), and dequant-to-bf16 (best config) + cuBLAS, against the bf16 cuBLAS expert."""
    h, i = layout.hidden_size, layout.intermediate_size
    gate_up, down = layout.gate_up_views(buffer), layout.down_views(buffer)
    x = torch.randn(PREFILL_TOKENS, h, device=w_gu.device).bfloat16()
    wgu_bf16, wd_bf16 = w_gu.bfloat16(), w_d.bfloat16()

    def expert_bf16():
        return _bf16_expert(x)(wgu_bf16, wd_bf16)

    ref = expert_bf16()
    compute_ms = _bench(expert_bf16)
    best_gu = _best(rows, tokens=PREFILL_TOKENS, op="gate_up")
    best_d = _best(rows, tokens=PREFILL_TOKENS, op="down")
    fused_us = fused_err = None
    if best_gu and best_d:
        cfg_gu, cfg_d = (KernelConfig(**b["config"]) for b in (best_gu, best_d))

        def expert_int4():
            act = int4_gate_up_silu(x, *gate_up, GROUP, config=cfg_gu, backend="triton")
            return int4_linear(act, *down, GROUP, config=cfg_d, backend="triton")

        fused_err = _rel(expert_int4(), ref)
        fused_us = _bench(expert_int4) * 1e3
    w4a16 = _bench_w4a16(x, layout, buffer, rows, ref)
    deq_us, configs, deq_cfg = _bench_dequant(gate_up, down, wgu_bf16, wd_bf16)
    overlap = _bench_overlap(x, layout, buffer, deq_cfg, ref, compute_us=compute_ms * 1e3)
    wgs = _bench_wgs(x, layout, buffer, ref, compute_us=compute_ms * 1e3)
    int4_bytes = _nbytes(*gate_up, *down)
    roof_us = (int4_bytes + 2 * 3 * h * i) / bw_gbps / 1e3  # read int4, write bf16
    compute_us = compute_ms * 1e3
    return dict(
        tokens=PREFILL_TOKENS,
        expert_bf16_compute_us=compute_us,
        fused_expert_us=fused_us,
        fused_rel_err=fused_err,
        fused_overhead_pct=None if fused_us is None else 100 * (fused_us / compute_us - 1),
        dequant_best_us=deq_us,
        dequant_roofline_us=roof_us,
        dequant_pct_of_compute=None if deq_us is None else 100 * deq_us / compute_us,
        expert_int4_bytes=int4_bytes,
        dequant_cublas_expert_us=None if deq_us is None else deq_us + compute_us,
        **{k: v for k, v in w4a16.items()},
        w4a16_overhead_pct=(
            None
            if w4a16.get("w4a16_expert_us") is None
            else 100 * (w4a16["w4a16_expert_us"] / compute_us - 1)
        ),
        dequant_configs=configs,
        dequant_pin=None if deq_cfg is None else dataclasses.asdict(deq_cfg),
        dequant_keys=[(w[0].shape[0], w[0].shape[1] * 8, False, 0) for w in (gate_up, down)],
        **overlap,
        **wgs,
    )


def _bench_wgs(x, layout, buffer, ref, compute_us) -> dict:
    """The wgs expert as the engine calls it (int4_wgs.expert_forward_wgs, taken by
    expert_forward_int4 where int4_wgs.takes), and its two launches by hand on preallocated
    outputs (less host work per call)."""
    from duoserve.quant import int4_wgs

    if not (int4_wgs.available(x.device) and int4_wgs.supports(GROUP, layout.scale_torch_dtype)):
        return {}
    gu_cfg, d_cfg = int4_wgs.configs_for(x.shape[0], layout, x.device)
    act = torch.empty(x.shape[0], layout.intermediate_size, dtype=x.dtype, device=x.device)
    y = torch.empty(x.shape[0], layout.hidden_size, dtype=x.dtype, device=x.device)

    def by_hand():
        int4_wgs.wgs_matmul(x, layout.gate_up_views(buffer), GROUP, act, True, gu_cfg)
        int4_wgs.wgs_matmul(act, layout.down_views(buffer), GROUP, y, False, d_cfg)

    taken = int4_wgs.takes(x.shape[0], layout, x.device)
    err = _rel(int4_wgs.expert_forward_wgs(x, buffer, layout), ref)
    engine_us = _bench(lambda: int4_wgs.expert_forward_wgs(x, buffer, layout)) * 1e3
    hand_us = _bench(by_hand) * 1e3
    return dict(
        wgs_taken_by_engine=taken,
        wgs_expert_us=engine_us,
        wgs_overhead_pct=100 * (engine_us / compute_us - 1),
        wgs_launches_us=hand_us,
        wgs_launches_overhead_pct=100 * (hand_us / compute_us - 1),
        wgs_rel_err=err,
        wgs_configs=[dataclasses.asdict(c) for c in (gu_cfg, d_cfg)],
    )


def _bench_w4a16(x, layout, buffer, rows, ref) -> dict:
    """The fused W4A16 expert (prep + gate/up + silu + down, int4_gemm.expert_forward_w4a16)
    with the fastest w4a16 config of each op from the sweep rows."""
    best_gu = _best(rows, tokens=PREFILL_TOKENS, op="gate_up", kernel_prefix="w4a16")
    best_d = _best(rows, tokens=PREFILL_TOKENS, op="down", kernel_prefix="w4a16")
    if not (best_gu and best_d):
        return dict(w4a16_expert_us=None)
    cfgs = [KernelConfig(**b["config"]) for b in (best_gu, best_d)]
    try:
        err = _rel(expert_forward_w4a16(x, buffer, layout, *cfgs), ref)
        us = _bench(lambda: expert_forward_w4a16(x, buffer, layout, *cfgs)) * 1e3
    except Exception as e:
        traceback.print_exc(limit=3)
        return dict(w4a16_expert_us=None, w4a16_error=f"{type(e).__name__}: {e}")
    return dict(
        w4a16_expert_us=us,
        w4a16_rel_err=err,
        w4a16_gate_up_us=best_gu["time_us"],
        w4a16_down_us=best_d["time_us"],
        w4a16_configs=[dataclasses.asdict(c) for c in cfgs],
    )


def _bench_overlap(x, layout, buffer, deq_cfg, ref, compute_us) -> dict:
    """OVERLAP_EXPERTS experts (one buffer, read each time: 92 MB > L2 for Mixtral) through
    dequant + cuBLAS one after the other, and with the dequant of expert e+1 on a side stream
    during expert e's GEMMs (experts_prefill_overlapped); per expert, vs the bf16 expert."""
    if SMOKE or deq_cfg is None or KINDS is not None:
        return {}
    gate_up, down = layout.gate_up_views(buffer), layout.down_views(buffer)
    for w in (gate_up, down):  # the best dequant config for both matrices, as PINNED would
        PINNED[(w[0].shape[0], w[0].shape[1] * 8, False, 0)] = deq_cfg
    mode, triton_kernels.PREFILL_MODE = triton_kernels.PREFILL_MODE, "dequant"
    scratches = tuple(torch.empty(3 * layout.hidden_size * layout.intermediate_size,
                                  dtype=x.dtype, device=x.device) for _ in range(2))  # fmt: skip
    side = torch.cuda.Stream()
    xs, bufs = [x] * OVERLAP_EXPERTS, [buffer] * OVERLAP_EXPERTS

    def serial() -> list[torch.Tensor]:
        return [expert_forward_int4(x, b, layout, scratch=scratches[0]) for b in bufs]

    def overlapped() -> list[torch.Tensor]:
        return experts_prefill_overlapped(xs, bufs, layout, scratches, side)

    try:
        same = all(torch.equal(a, b) for a, b in zip(serial(), overlapped(), strict=True))
        serial_us = _bench(serial) * 1e3 / OVERLAP_EXPERTS
        overlap_us = _bench(overlapped) * 1e3 / OVERLAP_EXPERTS
        err = _rel(overlapped()[0], ref)
    except Exception as e:  # the experiment must not cost the rest of the prefill summary
        traceback.print_exc(limit=3)
        return dict(overlap_error=f"{type(e).__name__}: {e}")
    finally:
        triton_kernels.PREFILL_MODE = mode
        for w in (gate_up, down):
            PINNED.pop((w[0].shape[0], w[0].shape[1] * 8, False, 0), None)
    return dict(
        overlap_experts=OVERLAP_EXPERTS,
        serial_dequant_expert_us=serial_us,
        overlapped_expert_us=overlap_us,
        overlapped_equal_serial=same,
        overlapped_rel_err=err,
        overlapped_overhead_pct=100 * (overlap_us / compute_us - 1),
        serial_overhead_pct=100 * (serial_us / compute_us - 1),
    )


def _bench_dequant(gate_up, down, wgu_bf16, wd_bf16) -> tuple[float | None, list, KernelConfig]:
    # best bit-exact dequant config for both matrices (the scratch + cuBLAS prefill path)
    scratch_gu, scratch_d = torch.empty_like(wgu_bf16), torch.empty_like(wd_bf16)
    best, configs, best_cfg = None, [], None
    for cfg in candidate_configs("dequant"):
        row = dict(config=dataclasses.asdict(cfg))

        def run(cfg=cfg):
            dequantize_int4_into(*gate_up, GROUP, scratch_gu, config=cfg, backend="triton")
            dequantize_int4_into(*down, GROUP, scratch_d, config=cfg, backend="triton")

        try:
            scratch_gu.fill_(float("nan"))
            scratch_d.fill_(float("nan"))
            run()
            exact = torch.equal(scratch_gu, wgu_bf16) and torch.equal(scratch_d, wd_bf16)
            ms = _bench(run)
            row.update(time_us=ms * 1e3, bit_exact=exact)
            if exact and (best is None or ms < best):
                best, best_cfg = ms, cfg
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc(limit=2)
        configs.append(row)
    return (None if best is None else best * 1e3), configs, best_cfg


def _config_name(c: dict) -> str:
    if c["kernel"] == "stream":
        cfg = f"n{c['block_n']} k{c['block_k']} t{c['block_t']} w{c['num_warps']}"
        return (
            f"stream {cfg} s{c['num_stages']}"
            + (f" p{c.get('ahead', 1)}" if c["prefetch"] else "")
            + (" 1p" if c.get("one_pass") else "")
            + (" h" if c.get("half") else "")
        )
    return (
        f"{c['kernel']} n{c['block_n']} t{c['block_t']} w{c['num_warps']} s{c['num_stages']} "
        f"u{c['unroll']} x{c['split_k']}"
        + (" p" if c["prefetch"] else "")
        + (" w" if c.get("wide_sz") else "")
    )


def _prefill_pin(rows, key, prefill) -> dict | None:
    # PREFILL_MODE "auto" serves w4a16 where it is pinned: pin it only if the fused expert beat
    # dequant + cuBLAS in this run, else the best other kernel (mma, "fused" mode only)
    p = next((p for p in prefill if p["shape"] == key[0]), {})
    w4a16_us = p.get("w4a16_expert_us")
    deq_us = p.get("serial_dequant_expert_us") or p.get("dequant_cublas_expert_us")
    if w4a16_us is not None and deq_us is not None and w4a16_us < deq_us:
        return _best(rows, shape=key[0], tokens=key[1], op=key[2])
    others = [r for r in rows if (r["shape"], r["tokens"], r["op"]) == key and r.get("ok")]
    others = [r for r in others if not r["kernel"].startswith("w4a16")]
    return min(others, key=lambda r: r["time_us"]) if others else None


def _expert_entries(p: dict, prefix: str, label: str):
    # (tokens, entry) of the whole-expert results under prefix; failures are printed
    for key in sorted((k for k in p if k.startswith(prefix)), key=len):
        if isinstance(p[key], str):
            print(f"  {label} {key[len(prefix) :]}: FAILED {p[key]}")
            continue
        yield key[len(prefix) :], p[key]


def measure_empty_launch_us() -> float:
    """_bench_cold of an empty one-program triton launch: the fixed cost in every time that
    the bench takes of one call alone (launch, start, drain, the events)."""
    import triton

    @triton.jit
    def _empty(p):
        pass

    sink = torch.empty(1, device="cuda")
    return 1e3 * _bench_cold(lambda *_: _empty[(1,)](sink, num_warps=1), [(), ()])


def print_tables(
    rows: list[dict], prefill: list[dict], bw: float, h2d: float, empty_us: float = 0.0
) -> None:
    """Best config per (shape, tokens, op), the prefill summary, then the PINNED table."""
    print(f"\nHBM (d2d copy) {bw:.0f} GB/s, pinned H2D {h2d:.1f} GB/s")
    print(
        f"cold L2: one call alone between two events (an empty launch takes {empty_us:.1f} us"
        f" so); '{SEQ_CALLS} in a row': per call of {SEQ_CALLS} queued back to back, each on"
        " its own cold copy (a decode step queues its experts so)"
    )
    hdr = f"{'shape':14s} {'T':>3s} {'op':8s} {'best':>34s} {'us':>8s} {'roof us':>8s}"
    print(hdr + f" {'%roof':>6s} {'bf16 us':>8s} {'x bf16':>7s} {'rel err':>8s}")
    order = {name: i for i, name in enumerate(SHAPES)}
    keys = sorted(
        {(r["shape"], r["tokens"], r["op"]) for r in rows}, key=lambda k: (order[k[0]], k[1:])
    )
    pinned = []
    for key in keys:
        bad = sum(1 for r in rows if (r["shape"], r["tokens"], r["op"]) == key and not r.get("ok"))
        b = _best(rows, shape=key[0], tokens=key[1], op=key[2])
        if b is None:
            print(f"{key[0]:14s} {key[1]:3d} {key[2]:8s} no passing config ({bad} failed)")
            continue
        cold = (
            f"  cold L2: {b['cold_us']:.1f} us = {b['cold_pct_roofline']:.1f}% of roofline"
            f" (bf16 cuBLAS {b['cublas_bf16_cold_us']:.1f} us = {b['cublas_bf16_cold_pct']:.1f}%"
            + (
                f"; plain read of the int4 words {b['read_ceiling_us']:.1f} us ="
                f" {b['read_ceiling_pct']:.1f}%)"
                if "read_ceiling_us" in b
                else ")"
            )
            + (
                f"; {SEQ_CALLS} in a row {b['seq_us']:.1f} us = {b['seq_pct_roofline']:.1f}%"
                if "seq_us" in b
                else ""
            )
            if "cold_us" in b
            else ""
        )
        print(
            f"{key[0]:14s} {key[1]:3d} {key[2]:8s} {_config_name(b['config']):>34s} "
            f"{b['time_us']:8.1f} {b['roofline_us']:8.1f} {b['pct_roofline']:6.1f} "
            f"{b['cublas_bf16_us']:8.1f} {b['cublas_bf16_us'] / b['time_us']:7.2f} "
            f"{b['rel_err']:8.1e}" + (f"  ({bad} configs failed)" if bad else "") + cold
        )
        if key[1] == PREFILL_TOKENS and b["kernel"].startswith("w4a16"):
            b = _prefill_pin(rows, key, prefill)
            if b is None:
                continue
        pinned.append((b["pin_key"], b["config"]))
    for p in prefill:  # the dequant config of the prefill path, both matrices
        if p.get("dequant_pin"):
            pinned += [(key, p["dequant_pin"]) for key in p["dequant_keys"]]
    for p in prefill:
        fused, deq = p["fused_expert_us"], p["dequant_best_us"]
        print(
            f"prefill {p['shape']} T={p['tokens']}: bf16 cuBLAS expert "
            f"{p['expert_bf16_compute_us']:.1f} us; int4 fused gemm expert "
            + ("FAILED" if fused is None else f"{fused:.1f} us = +{p['fused_overhead_pct']:.1f}%")
            + "; dequant "
            + ("FAILED" if deq is None else f"{deq:.1f} us = {p['dequant_pct_of_compute']:.1f}%")
            + f" of compute (dequant roofline {p['dequant_roofline_us']:.1f} us)"
        )
        w4 = p.get("w4a16_expert_us")
        deq_expert = p.get("serial_dequant_expert_us") or p.get("dequant_cublas_expert_us")
        print(
            "  fused W4A16 (nibble planes) expert "
            + ("FAILED" if w4 is None else f"{w4:.1f} us = {p['w4a16_overhead_pct']:+.1f}% vs bf16")
            + (
                f" (gate/up {p['w4a16_gate_up_us']:.1f} us, down {p['w4a16_down_us']:.1f} us)"
                if w4 is not None
                else ""
            )
            + (
                ""
                if deq_expert is None
                else f"; dequant + cuBLAS expert {deq_expert:.1f} us = "
                f"{100 * (deq_expert / p['expert_bf16_compute_us'] - 1):+.1f}% vs bf16"
            )
        )
        if "overlapped_expert_us" in p:
            print(
                f"  {p['overlap_experts']} experts, per expert: dequant + cuBLAS one after the "
                f"other {p['serial_dequant_expert_us']:.1f} us (+{p['serial_overhead_pct']:.1f}%"
                f"), next expert's dequant on a side stream {p['overlapped_expert_us']:.1f} us "
                f"(+{p['overlapped_overhead_pct']:.1f}% over bf16; equal outputs: "
                f"{p['overlapped_equal_serial']})"
            )
        if "wgs_expert_us" in p:
            print(
                f"  wgs (warp-specialized) expert (expert_forward_wgs; the engine takes it: "
                f"{p['wgs_taken_by_engine']}) "
                f"{p['wgs_expert_us']:.1f} us = {p['wgs_overhead_pct']:+.1f}% vs bf16; its two "
                f"launches by hand {p['wgs_launches_us']:.1f} us = "
                f"{p['wgs_launches_overhead_pct']:+.1f}%; rel err {p['wgs_rel_err']:.1e}"
            )
        for t, e in _expert_entries(p, "tc_expert_t", "tc expert"):
            print(
                f"  tc expert T={t}: {e['tc_us']:.1f} us (its two ops timed alone "
                f"{e['sum_of_ops_us']:.1f} us) vs bf16 cuBLAS expert {e['bf16_cublas_us']:.1f} us"
                f" = {e['tc_us'] / e['bf16_cublas_us']:.2f}x; rel err {e['rel_err']:.1e}"
                + (
                    f"; cold L2 {e['tc_cold_us']:.1f} us vs bf16 {e['bf16_cold_us']:.1f} us"
                    if "tc_cold_us" in e
                    else ""
                )
            )
        for t, e in _expert_entries(p, "entry_expert_t", "decode expert"):
            print(
                f"  decode expert T={t} (expert_forward_int4, {'+'.join(e['kernels'])}):"
                f" cold L2 {e['cold_us']:.1f} us = {e['pct_roofline']:.1f}% of its roofline"
                f" ({e['roofline_us']:.1f} us), {SEQ_CALLS} in a row {e['seq_us']:.1f} us ="
                f" {e['seq_pct_roofline']:.1f}%; vs bf16 cuBLAS {e['bf16_cold_us']:.1f} us;"
                f" rel err {e['rel_err']:.1e}"
            )
        for _, e in _expert_entries(p, "grouped_t", "grouped decode"):
            cells = ", ".join(
                f"{label} {e[k]['cold_us']:.1f} us = {e[k]['pct_roofline']:.1f}% alone, "
                f"{e[k]['seq_us']:.1f} us = {e[k]['seq_pct_roofline']:.1f}% {SEQ_CALLS} in a row"
                f" (roofline {e[k]['roofline_us']:.1f} us)"
                for label, k in (
                    ("whole", "grouped"), ("gate/up", "gate_up"), ("down", "down"),
                    ("one expert per launch", "one_by_one"),
                )
            )  # fmt: skip
            print(
                f"  grouped decode, {e['experts']} experts x {e['tokens']} token: {cells}; max"
                f" |difference| to one by one {e['max_diff_one_by_one']:.1e}; rel err"
                f" {e['rel_err']:.1e}; configs: gate/up {_config_name(e['gate_up']['config'])},"
                f" down {_config_name(e['down']['config'])}"
            )
            for op in ("gate_up", "down"):
                for c in e[op]["candidates"][1:] if len(e[op]["candidates"]) > 1 else ():
                    print(
                        f"    {op} candidate {_config_name(c['config'])}: alone"
                        f" {c['cold_us']:.1f} us = {c['pct_roofline']:.1f}%, {SEQ_CALLS} in a"
                        f" row {c['seq_us']:.1f} us = {c['seq_pct_roofline']:.1f}%"
                    )
    print("\n# paste into duoserve/quant/triton_kernels.py (group 128, asymmetric, bf16)")
    print("PINNED = {")
    for key, c in pinned:
        args = ", ".join(f"{k}={v!r}" for k, v in c.items())
        print(f"    {tuple(key)!r}: KernelConfig({args}),")
    print("}")


def main() -> None:
    """Run every shape, print tables, write JSON to --out."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="int4_kernels.json", help="JSON results path")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated shape names")
    parser.add_argument("--kinds", default="", help="only these candidate kinds (e.g. tc,gemv)")
    parser.add_argument("--tokens", default="", help="only these decode token counts (e.g. 1,16)")
    args = parser.parse_args()
    global KINDS, DECODE_TOKENS
    if args.kinds:
        KINDS = set(args.kinds.split(","))
    if args.tokens:
        DECODE_TOKENS = tuple(int(t) for t in args.tokens.split(","))
    import triton

    device = torch.device("cpu" if SMOKE else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references stay fp32
    start = time.time()
    bw, h2d = (1.0, 0.0) if SMOKE else (measure_hbm_gbps(device), measure_h2d_gbps(device))
    rows, prefill, failures = [], [], []
    for name in args.shapes.split(","):
        try:
            shape_rows, shape_prefill = bench_shape(name, device, bw)
            rows += shape_rows
            prefill.append(shape_prefill)
        except Exception as e:
            failures.append(dict(shape=name, error=f"{type(e).__name__}: {e}"))
            traceback.print_exc()
        if not SMOKE:
            torch.cuda.empty_cache()
    empty_us = 0.0 if SMOKE else measure_empty_launch_us()
    print_tables(rows, prefill, bw, h2d, empty_us)
    result = dict(
        device="cpu (SMOKE)" if SMOKE else torch.cuda.get_device_name(device),
        torch=torch.__version__,
        triton=triton.__version__,
        python=platform.python_version(),
        hbm_gbps=bw,
        h2d_pinned_gbps=h2d,
        empty_launch_us=empty_us,
        rows=rows,
        prefill=prefill,
        failures=failures,
        seconds=time.time() - start,
    )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
