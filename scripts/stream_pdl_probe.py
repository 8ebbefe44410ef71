"""GPU: the Mixtral stream ops and the 1-token expert with and without programmatic dependent
launch (prep_x -> stream), cold L2 (bench.int4_kernels' method).

    PYTHONPATH=$PWD python3 scripts/stream_pdl_probe.py
"""

import torch

from duoserve.bench.int4_kernels import _bench_cold, _copies, _nbytes, measure_hbm_gbps
from duoserve.quant import triton_kernels as tk
from duoserve.quant.int4 import quantize_expert_int4
from duoserve.quant.triton_kernels import KernelConfig

tk.set_autotune(False)
bw = measure_hbm_gbps(torch.device("cuda"))
print(f"HBM {bw:.0f} GB/s")
h, i = 4096, 14336
gen = torch.Generator(device="cuda").manual_seed(0)
mats = [torch.randn(r, c, generator=gen, device="cuda") * 0.02 for r, c in ((i, h), (i, h), (h, i))]
buf, lay = quantize_expert_int4(*[m.bfloat16() for m in mats], group_size=128)
pdl_on = tk._pdl


def pdl_off(device):
    return False


def S(*a, **k):
    return KernelConfig("stream", *a, **k)


cfgs = {
    "gate_up": [
        S(4, 1024, 1, 1, 1),
        S(2, 1024, 1, 1, 1),
        S(2, 1024, 1, 1, 1, prefetch=True),
        S(4, 1024, 1, 1, 1, prefetch=True),
        S(4, 2048, 1, 2, 1),
        S(2, 2048, 1, 2, 1, prefetch=True),
    ],
    "down": [
        S(4, 2048, 1, 2, 1, prefetch=True),
        S(1, 1024, 1, 1, 1),
        S(1, 1024, 1, 1, 1, prefetch=True),
        S(2, 2048, 1, 2, 1, prefetch=True),
        S(1, 2048, 1, 2, 1, prefetch=True),
        S(2, 1024, 1, 1, 1, prefetch=True),
    ],
}
for op, fused in (("gate_up", True), ("down", False)):
    w = lay.gate_up_views(buf) if fused else lay.down_views(buf)
    copies = _copies(w)
    roof = _nbytes(*w) / bw / 1e3
    k = w[0].shape[1] * 8
    x = torch.randn(1, k, device="cuda").bfloat16()
    fn = tk.int4_gate_up_silu if fused else tk.int4_linear
    print(f"== {op} roofline {roof:.1f} us")
    for cfg in cfgs[op]:
        res = []
        for name, p in (("pdl", pdl_on), ("plain", pdl_off)):
            tk._pdl = p
            t = _bench_cold(
                lambda *ww, fn=fn, x=x, cfg=cfg: fn(x, *ww, 128, config=cfg, backend="triton"),
                copies,
            )
            t *= 1e3
            res.append(f"{name} {t:.1f} us ({100 * roof / t:.1f}%)")
        tk._pdl = pdl_on
        print(
            f"  n{cfg.block_n} k{cfg.block_k} w{cfg.num_warps} p{int(cfg.prefetch)}: "
            + ", ".join(res)
        )
    del copies
# whole expert, 1 token, through the engine entry (PINNED configs)
ecopies = _copies((buf,))
roof = _nbytes(buf) / bw / 1e3
x = torch.randn(1, h, device="cuda").bfloat16()
for name, p in (("pdl", pdl_on), ("plain", pdl_off)):
    tk._pdl = p
    t = _bench_cold(lambda b: tk.expert_forward_int4(x, b, lay), ecopies) * 1e3
    print(
        f"expert T=1 via expert_forward_int4 ({name}): {t:.1f} us,"
        f" roofline {roof:.1f} us = {100 * roof / t:.1f}%"
    )
