"""GPU: grouped int4 decode (experts_forward_int4_grouped) at the Mixtral shape, 1 token per
expert, for 2 and 8 experts: host time per call and whether a call synchronizes; then each of
the whole, gate/up (prep + stream) and down (prep + stream) alone, 8 in a row and per kernel
(CUPTI), next to the same experts one by one (expert_forward_int4) and n x the roofline.
"sweep": down configs for 2 experts; "host": where the host's time per call goes (cProfile).

    PYTHONPATH=$PWD python3 scripts/grouped_probe.py [probe] [sweep] [host]
"""

import cProfile
import dataclasses
import io
import pstats
import sys
import time

import torch
from _probe import kernel_us, setup

from duoserve.bench.int4_kernels import _bench_cold, _bench_cold_seq, _nbytes
from duoserve.quant import triton_kernels as tk


def host_us(fn, args, n: int = 50) -> float:
    fn(*args)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn(*args)
    host = (time.perf_counter() - start) * 1e6 / n
    torch.cuda.synchronize()
    return host


def row(label, fn, copies, roof_us, names=()) -> None:
    torch.cuda.set_sync_debug_mode("error")  # a call that synchronizes raises here
    try:
        fn(*copies[0])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    host = host_us(fn, copies[0])
    try:
        alone = 1e3 * _bench_cold(fn, copies)
        seq = 1e3 * _bench_cold_seq(fn, copies, 8)
        timed = (
            f"alone {alone:.1f} us ({100 * roof_us / alone:.1f}%), 8 in a row {seq:.1f} us"
            f" ({100 * roof_us / seq:.1f}%)"
        )
    except AssertionError as e:
        timed = f"not timed: {e}"
    dur = kernel_us(fn, copies, names) if names else ""
    print(f"{label}: host {host:.1f} us per call; {timed}; kernels: {dur}", flush=True)


def probe(n: int, bw, h, i, buf, lay) -> None:
    pool = buf.expand(n, -1).contiguous()
    views = [list(p.unbind(0)) for p in [pool] + [pool.clone() for _ in range(8)]]
    offs = [tk.group_offsets(v) for v in views]
    gu = [(lay.gate_up_views(o[0]), o[1], o[2]) for o in offs]
    dn = [(lay.down_views(o[0]), o[1], o[2]) for o in offs]
    x = torch.randn(n, h, device="cuda").bfloat16()
    y = torch.empty_like(x)
    act = torch.empty(n, i, dtype=x.dtype, device="cuda")
    spans = [(e, 1) for e in range(n)]
    cfg_gu, cfg_d = tk.PINNED[(2 * i, h, True, 1)], tk.PINNED[(h, i, False, 1)]
    roof = n * _nbytes(buf) / bw / 1e3
    roof_gu, roof_d = (n * _nbytes(*w) / bw / 1e3 for w in (gu[0][0], dn[0][0]))
    print(f"== {n} experts: roofline whole {roof:.1f} us, gate/up {roof_gu:.1f}, down {roof_d:.1f}")
    names = ("prep_grouped", "stream_grouped")
    whole = [(v,) for v in views]
    row("whole, grouped", lambda v: tk.experts_forward_int4_grouped(x, spans, v, lay, y), whole,
        roof, names)  # fmt: skip
    row("gate/up, grouped", lambda w: tk.stream_grouped_launch(cfg_gu, x, spans, *w, 128, act,
        True), [(w,) for w in gu], roof_gu, names)  # fmt: skip
    row("down, grouped", lambda w: tk.stream_grouped_launch(cfg_d, act, spans, *w, 128, y,
        False), [(w,) for w in dn], roof_d, names)  # fmt: skip
    row("whole, one expert per call", lambda v: [tk.expert_forward_int4(x[e : e + 1], b, lay)
        for e, b in enumerate(v)], whole, roof, ("prep_xh", "stream"))  # fmt: skip


def sweep(bw, h, i, buf, lay) -> None:
    n = 2
    pool = buf.expand(n, -1).contiguous()
    views = [list(p.unbind(0)) for p in [pool] + [pool.clone() for _ in range(8)]]
    dn = []
    for v in views:
        base, unit, index = tk.group_offsets(v)
        dn.append((lay.down_views(base), unit, index))
    act = torch.randn(n, i, device="cuda").bfloat16()
    y = torch.empty(n, h, dtype=act.dtype, device="cuda")
    spans = [(e, 1) for e in range(n)]
    roof = n * _nbytes(*dn[0][0]) / bw / 1e3
    ref = None
    print(f"== down configs, {n} experts grouped (roofline {roof:.1f} us)")
    pinned = tk.PINNED[(h, i, False, 1)]
    for bn in (1, 2, 4, 8):
        for bk, warps in ((1024, 1), (2048, 2), (4096, 4)):
            for ahead in (1, 2):
                cfg = dataclasses.replace(pinned, block_n=bn, block_k=bk, num_warps=warps,
                                          ahead=ahead)  # fmt: skip
                try:
                    tk.stream_grouped_launch(cfg, act, spans, *dn[0], 128, y, False)
                    if ref is None:
                        ref = y.clone()
                    ok = (y - ref).abs().max().item() <= 1e-2 * ref.abs().max().item()
                    row(f"down n{bn} k{bk} w{warps} a{ahead} (equal: {ok})",
                        lambda w, cfg=cfg: tk.stream_grouped_launch(cfg, act, spans, *w, 128, y,
                        False), [(w,) for w in dn], roof)  # fmt: skip
                except Exception as e:  # a config that does not compile
                    print(f"down n{bn} k{bk} w{warps} a{ahead}: {type(e).__name__}: {e}"[:200])


def host(bw, h, i, buf, lay) -> None:
    pool = buf.expand(2, -1).contiguous()
    v = list(pool.unbind(0))
    x = torch.randn(2, h, device="cuda").bfloat16()
    y = torch.empty_like(x)
    spans = [(0, 1), (1, 1)]
    calls = {
        "expert_forward_int4": lambda: tk.expert_forward_int4(x[:1], buf, lay),
        "experts_forward_int4_grouped (2)": lambda: tk.experts_forward_int4_grouped(
            x, spans, v, lay, y
        ),
    }
    for label, fn in calls.items():
        fn()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(18)
        print(f"== host profile, {label}, 200 calls\n" + text.getvalue()[-4000:])


args = setup()
modes = sys.argv[1:] or ["probe"]
if "host" in modes:
    host(*args)
if "sweep" in modes:
    sweep(*args)
if "probe" in modes:
    for n in (2, 8):
        probe(n, *args)
        torch.cuda.empty_cache()
