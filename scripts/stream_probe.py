"""GPU: stream-kernel variants at the Mixtral decode shape (1 and 2 tokens), cold L2 (the
bench's method), each checked against an fp32 reference, next to the read ceiling; then the
1-token expert through expert_forward_int4 with the fastest config of each op pinned.

    PYTHONPATH=$PWD python3 scripts/stream_probe.py
"""

import torch
import torch.nn.functional as F
from _probe import expert_rows, op_setup, setup

from duoserve.bench.int4_kernels import _bench_cold, _rel
from duoserve.quant.triton_kernels import KernelConfig

bw, h, i, buf, lay = setup()


def S(bn, bk, warps, **kw):
    return KernelConfig("stream", bn, bk, 1, warps, 1, prefetch=True, **kw)


def G(warps, split, prefetch=False):
    return KernelConfig(
        "tcg", 16 * warps, block_t=1, num_warps=warps, split_k=split, prefetch=prefetch
    )


CFGS = {
    "gate_up": [
        G(2, 4),
        G(1, 4, prefetch=True),
        G(1, 8, prefetch=True),
        G(2, 2, prefetch=True),
        G(2, 4, prefetch=True),
        G(4, 4, prefetch=True),
        S(2, 1024, 1),
        S(1, 1024, 1, one_pass=True, ahead=2),
    ],
    "down": [
        G(1, 8),
        G(1, 4, prefetch=True),
        G(1, 8, prefetch=True),
        G(2, 4, prefetch=True),
        G(2, 8, prefetch=True),
        G(4, 8, prefetch=True),
        S(4, 2048, 2),
        S(4, 1024, 1, ahead=2),
    ],
}


def name(c: KernelConfig) -> str:
    if c.kernel == "tcg":
        return f"tcg w{c.num_warps} split{c.split_k} t{c.block_t}" + (" d3" if c.prefetch else "")
    return (
        f"n{c.block_n} k{c.block_k} t{c.block_t} w{c.num_warps}"
        + (f" a{c.ahead}" if c.prefetch else "")
        + (" 1p" if c.one_pass else "")
    )


best = {}
for op, fused in (("gate_up", True), ("down", False)):
    w, w_ref, copies, roof, fn = op_setup(bw, buf, lay, op)
    for t in (1, 2, 4, 8):
        x = torch.randn(t, w_ref.shape[1], device="cuda").bfloat16()
        ref = x.float() @ w_ref.T
        if fused:
            g, u = ref.chunk(2, dim=1)
            ref = F.silu(g) * u
        for cfg in CFGS[op]:
            if cfg.kernel == "stream" and t > 2:
                continue
            cfg = KernelConfig(**{**cfg.__dict__, "block_t": t})
            try:
                err = _rel(fn(x, *w, 128, config=cfg, backend="triton"), ref)
                us = 1e3 * _bench_cold(
                    lambda *ww, cfg=cfg, x=x, fn=fn: fn(x, *ww, 128, config=cfg, backend="triton"),
                    copies,
                )
            except Exception as e:  # a variant that does not compile is reported, not fatal
                print(f"  T={t} {name(cfg):28s} FAILED {type(e).__name__}: {str(e)[:120]}")
                continue
            print(f"  T={t} {name(cfg):28s} {us:6.1f} us {100 * roof / us:5.1f}%  err {err:.1e}")
            if err < 1e-2 and ((op, t) not in best or us < best[(op, t)][1]):
                best[(op, t)] = (cfg, us)
    del copies
expert_rows(bw, buf, lay, best, (1, 2, 4, 8), ("pinned", "probe best"), name)
