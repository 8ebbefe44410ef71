"""GPU: the stream kernel with fp16x2 products (`KernelConfig.half`) against its fp32 path at
the Mixtral decode shape (1 and 2 tokens), cold L2 (the bench's method), each checked against
an fp32 reference (plain and with 1% outliers of 100x), next to the read ceiling; then the
1-token and 2-token expert through expert_forward_int4 with the fastest config of each op.

    PYTHONPATH=$PWD python3 scripts/half_probe.py
"""

import torch
import torch.nn.functional as F
from _probe import expert_rows, op_setup, setup

from duoserve.bench.int4_kernels import _bench_cold, _rel
from duoserve.quant import triton_kernels as tk
from duoserve.quant.int4 import dequantize_int4
from duoserve.quant.triton_kernels import KernelConfig

bw, h, i, buf, lay = setup()


def S(bn, bk, warps, **kw):
    return KernelConfig("stream", bn, bk, 1, warps, 1, prefetch=True, **kw)


def H(bn, bk, warps, **kw):
    return S(bn, bk, warps, half=True, **kw)


BASE = {
    "gate_up": [S(2, 1024, 1), S(1, 1024, 1, one_pass=True, ahead=2)],
    "down": [S(4, 2048, 2), S(4, 1024, 1, ahead=2)],
}
HALF = {
    "gate_up": [
        H(1, 1024, 1, one_pass=True),
        H(1, 1024, 1, one_pass=True, ahead=2),
        H(2, 1024, 1, one_pass=True),
        H(2, 1024, 1),
        H(4, 1024, 1),
        H(2, 2048, 2, one_pass=True),
        H(4, 2048, 2),
        H(4, 4096, 4),
        H(8, 2048, 2),
        H(2, 1024, 1, one_pass=True, ahead=2),
        H(4, 1024, 1, one_pass=True),
        H(1, 2048, 1, one_pass=True),
        H(2, 2048, 1),
        H(1, 2048, 1, one_pass=True, ahead=2),
    ],
    "down": [
        H(2, 1024, 1),
        H(4, 1024, 1),
        H(4, 1024, 1, ahead=2),
        H(4, 2048, 2),
        H(8, 2048, 2),
        H(4, 4096, 4),
        H(8, 1024, 1),
        H(2, 2048, 2),
        H(2, 2048, 2, ahead=2),
        H(1, 2048, 2),
        H(2, 4096, 4),
        H(2, 2048, 1),
        H(4, 2048, 1),
        H(2, 4096, 2),
        H(1, 2048, 1),
        H(2, 2048, 1, ahead=2),
    ],
}


def name(c: KernelConfig) -> str:
    return (
        f"n{c.block_n} k{c.block_k} t{c.block_t} w{c.num_warps}"
        + (f" a{c.ahead}" if c.prefetch else "")
        + (" 1p" if c.one_pass else "")
        + (" half" if c.half else "")
    )


gen = torch.Generator(device="cuda").manual_seed(3)
# precision: fp32 outputs against fp64 references, 1 token, the fp32 and the fp16x2 path
for op, fused in (("gate_up", True), ("down", False)):
    w = lay.gate_up_views(buf) if fused else lay.down_views(buf)
    w64 = dequantize_int4(*w, 128, dtype=torch.float32).double()
    k = w64.shape[1]
    fn = tk.int4_gate_up_silu if fused else tk.int4_linear
    x = torch.randn(8, k, device="cuda", generator=gen)
    outl = x * (1 + 99 * (torch.rand(8, k, device="cuda", generator=gen) < 0.01))
    wide = 10.0 ** (torch.rand(8, k, device="cuda", generator=gen) * 12 - 6)
    wide *= torch.randint(0, 2, (8, k), device="cuda", generator=gen) * 2 - 1
    for label, xx in (("plain", x), ("outliers", outl), ("wide 1e-6..1e6", wide)):
        xx = xx.bfloat16()
        ref = xx.double() @ w64.T
        if fused:
            g, u = ref.chunk(2, dim=1)
            ref = F.silu(g) * u
        errs = []
        for half in (False, True):
            cfg = S(2, 2048, 2, half=half) if not fused else S(2, 1024, 1, half=half)
            out = torch.stack(
                [fn(xx[r : r + 1], *w, 128, config=cfg, backend="triton",
                    out=torch.empty(1, ref.shape[1], device="cuda"))[0] for r in range(8)]
            )  # fmt: skip
            errs.append(((out.double() - ref).norm(dim=1) / ref.norm(dim=1)).max().item())
        print(
            f"precision {op} {label}: max over 8 tokens of the relative L2 error, fp32 path"
            f" {errs[0]:.1e}, fp16x2 path {errs[1]:.1e}"
        )

best = {}
for op, fused in (("gate_up", True), ("down", False)):
    w, w_ref, copies, roof, fn = op_setup(bw, buf, lay, op)
    for t in (1, 2):
        x = torch.randn(t, w_ref.shape[1], device="cuda", generator=gen).bfloat16()
        out = torch.rand(t, w_ref.shape[1], device="cuda", generator=gen) < 0.01
        xo = (x.float() * torch.where(out, 100.0, 1.0)).bfloat16()
        refs = []
        for xx in (x, xo):
            ref = xx.float() @ w_ref.T
            if fused:
                g, u = ref.chunk(2, dim=1)
                ref = F.silu(g) * u
            refs.append(ref)
        for cfg in BASE[op] + HALF[op]:
            cfg = KernelConfig(**{**cfg.__dict__, "block_t": t})
            try:
                err = _rel(fn(x, *w, 128, config=cfg, backend="triton").float(), refs[0])
                err_o = _rel(fn(xo, *w, 128, config=cfg, backend="triton").float(), refs[1])
                us = 1e3 * _bench_cold(
                    lambda *ww, cfg=cfg, x=x, fn=fn: fn(x, *ww, 128, config=cfg, backend="triton"),
                    copies,
                )
            except Exception as e:  # a variant that does not compile is reported, not fatal
                print(f"  T={t} {name(cfg):32s} FAILED {type(e).__name__}: {str(e)[:300]}")
                continue
            print(
                f"  T={t} {name(cfg):32s} {us:6.1f} us {100 * roof / us:5.1f}%"
                f"  err {err:.1e} outliers {err_o:.1e}"
            )
            if err < 1e-2 and ((op, t) not in best or us < best[(op, t)][1]):
                best[(op, t)] = (cfg, us)
    del copies
expert_rows(bw, buf, lay, best, (1, 2), ("pinned", "probe best", "pinned", "probe best"), name)
