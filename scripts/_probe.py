"""Shared parts of the GPU probe scripts (scripts/*_probe.py): the bench's Mixtral expert, and
the whole expert through expert_forward_int4 with given configs pinned."""

from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from duoserve.bench.int4_kernels import (
    SHAPES,
    _bench_cold,
    _copies,
    _expert,
    _nbytes,
    _read_ceiling_us,
    _rel,
    measure_hbm_gbps,
)
from duoserve.quant import triton_kernels as tk
from duoserve.quant.int4 import dequantize_int4


def setup():
    """Autotuning off, the measured HBM bandwidth (printed) and the bench's Mixtral expert:
    (GB/s, H, I, buffer, layout)."""
    tk.set_autotune(False)
    bw = measure_hbm_gbps(torch.device("cuda"))
    print(f"HBM {bw:.0f} GB/s")
    h, i = SHAPES["mixtral"]
    buf, lay, *_ = _expert("mixtral", torch.device("cuda"))
    return bw, h, i, buf, lay


def op_setup(bw, buf, lay, op: str):
    """One matrix of the expert ("gate_up" fused, or "down"), printed with its roofline and
    plain-read ceiling: (weights, fp32 weights, cold copies, roofline us, kernel entry)."""
    fused = op == "gate_up"
    w = lay.gate_up_views(buf) if fused else lay.down_views(buf)
    w_ref = dequantize_int4(*w, 128, dtype=torch.float32)
    copies = _copies(w)
    roof = _nbytes(*w) / bw / 1e3
    read = _read_ceiling_us(copies)
    print(f"== {op}: roofline {roof:.1f} us, plain read {read:.1f} us ({100 * roof / read:.1f}%)")
    fn = tk.int4_gate_up_silu if fused else tk.int4_linear
    return w, w_ref, copies, roof, fn


def expert_rows(bw, buf, lay, best: dict, tokens, labels, name: Callable) -> None:
    """Per token count: the cold whole expert with PINNED ("pinned") or with best[(op, t)][0]
    pinned for both ops ("probe best"), each label in turn; PINNED is restored afterwards."""
    h, i = lay.hidden_size, lay.intermediate_size
    ecopies = _copies((buf,))
    roof = _nbytes(buf) / bw / 1e3
    pinned = dict(tk.PINNED)
    for t in tokens:
        x = torch.randn(t, h, device="cuda").bfloat16()
        ref = tk.expert_forward_int4(x, buf, lay)
        keys = {
            "gate_up": (2 * i, h, True, tk.token_bucket(t)),
            "down": (h, i, False, tk.token_bucket(t)),
        }
        for label in labels:
            for op, key in keys.items():
                tk.PINNED[key] = best[(op, t)][0] if label == "probe best" else pinned[key]
            us = 1e3 * _bench_cold(lambda b, x=x: tk.expert_forward_int4(x, b, lay), ecopies)
            err = _rel(tk.expert_forward_int4(x, buf, lay), ref)
            cfgs = " + ".join(name(tk.PINNED[k]) for k in keys.values())
            print(
                f"expert T={t} ({label}: {cfgs}): {us:.1f} us = {100 * roof / us:.1f}% of"
                f" {roof:.1f} us; vs pinned rel {err:.1e}"
            )
    tk.PINNED.clear()
    tk.PINNED.update(pinned)


def bench_loop(fn, n: int = 20) -> float:
    """Microseconds per call of fn, n calls queued back to back (the host runs ahead of the
    GPU unless its per-call work is longer than the GPU's)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / n


def kernel_us(f, cps, names) -> str:
    """Median device duration of each named kernel over 24 cold calls."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for j in range(24):
            f(*cps[j % len(cps)])
        torch.cuda.synchronize()
    out = []
    for nm in names:
        d = sorted(
            e.time_range.elapsed_us()
            for e in prof.events()
            if e.device_type == DeviceType.CUDA and e.name == nm
        )
        out.append(f"{nm} {d[len(d) // 2]:.1f} us (x{len(d) // 24})" if d else f"{nm} -")
    return ", ".join(out)
