"""GPU: the 1-token Mixtral down matrix and whole expert (cold L2), three ways: alone (the
bench's method: one call between two events), n calls queued back to back on distinct cold
copies (how a decode step runs its experts), and each kernel's own duration (CUPTI, through
torch.profiler); next to an empty launch and a plain read of the same words.

The expert's four launches by hand, and the same without the prep_xh(h) launch (down then
reads an x~ of an earlier h: timing only). The session-12 runs c and d also timed a down that
read bf16 pair rows written by gate/up and rescaled them itself (commit 827bee5, removed).

    PYTHONPATH=$PWD python3 scripts/down_probe.py
"""

import torch
import triton
from _probe import kernel_us, op_setup, setup

from duoserve.bench.int4_kernels import _bench_cold, _bench_cold_seq, _copies, _nbytes
from duoserve.quant import triton_kernels as tk
from duoserve.quant._int4_triton import read_words
from duoserve.quant.triton_kernels import KernelConfig


@triton.jit
def _noop(p):
    pass


def name(c: KernelConfig) -> str:
    return (
        f"n{c.block_n} k{c.block_k} w{c.num_warps}"
        f"{' pf' if c.prefetch else ''}{f' a{c.ahead}' if c.ahead > 1 else ''}"
        f"{' half' if c.half else ''}"
    )


def row(label, f, cps, roof_us, names=()):
    iso = 1e3 * _bench_cold(f, cps)
    seq = {n: 1e3 * _bench_cold_seq(f, cps, n) for n in (2, 8)}
    dur = kernel_us(f, cps, names) if names else ""
    seqs = ", ".join(
        f"{n} in a row {us:.1f} us ({100 * roof_us / us:.1f}%)" for n, us in seq.items()
    )
    print(f"{label}: alone {iso:.1f} us ({100 * roof_us / iso:.1f}%); {seqs}; kernels: {dur}")


bw, h, i, buf, lay = setup()
w, _, copies, roof, _ = op_setup(bw, buf, lay, "down")
_, _, gcopies, groof, _ = op_setup(bw, buf, lay, "gate_up")
ecopies = _copies((buf,))
eroof = _nbytes(buf) / bw / 1e3
print(f"== roofline: down {roof:.1f} us, gate/up {groof:.1f} us, expert {eroof:.1f} us")

sink = torch.empty(1, device="cuda")
for grid, warps in ((1, 1), (2048, 2)):
    row(
        f"empty launch {grid} x {warps} warps",
        lambda *_, g=grid, n=warps: _noop[(g,)](sink, num_warps=n),
        copies,
        roof,
    )
nw = copies[0][0].numel()
rsink = torch.empty(-(-nw // 2048), dtype=torch.int32, device="cuda")
row(
    "plain read of down's words (2048 x 4 warps; % of the words' roofline)",
    lambda q, *_: read_words[(-(-nw // 2048),)](q, rsink, nw, BLOCK=2048, num_warps=4),
    copies,
    roof * nw * 4 / _nbytes(*w),
    ("read_words",),
)

x = torch.randn(1, i, device="cuda").bfloat16()
y = torch.empty(1, h, dtype=torch.bfloat16, device="cuda")
d_pin = tk.PINNED[(h, i, False, 1)]
row(
    f"down {name(d_pin)} from prep_xh",
    lambda q, s, z: tk.int4_linear(x, q, s, z, 128, out=y, config=d_pin),
    copies,
    roof,
    ("prep_xh", "stream"),
)
xg = torch.randn(1, h, device="cuda").bfloat16()
yg = torch.empty(1, i, dtype=torch.bfloat16, device="cuda")
g_pin = tk.PINNED[(2 * i, h, True, 1)]
row(
    "gate/up pinned",
    lambda q, s, z: tk.int4_gate_up_silu(xg, q, s, z, 128, out=yg),
    gcopies,
    groof,
    ("prep_xh", "stream"),
)
xe = torch.randn(1, h, device="cuda").bfloat16()
row(
    "expert_forward_int4",
    lambda b: tk.expert_forward_int4(xe, b, lay),
    ecopies,
    eroof,
    ("prep_xh", "stream"),
)

# the expert's launches by hand: gate/up then down from prep_xh(h) (4 launches), against
# down straight after gate/up on an x~ of an earlier h (3 launches; timing only): what
# removing the prep_xh(h) hop from the chain could gain
act = torch.empty(1, i, dtype=torch.bfloat16, device="cuda")
out = torch.empty(1, h, dtype=torch.bfloat16, device="cuda")
stale = tk.stream_input(d_pin, act, 128)


def chain(b, prep_h: bool):
    gu, d = lay.gate_up_views(b), lay.down_views(b)
    tk.stream_launch(g_pin, tk.stream_input(g_pin, xe, 128), gu, 128, act, True)
    tk.stream_launch(
        d_pin, tk.stream_input(d_pin, act, 128) if prep_h else stale, d, 128, out, False
    )


for label, ph in (("4 launches", True), ("3 launches (stale x~ of h)", False)):
    row(
        f"expert by hand, {label}",
        lambda b, ph=ph: chain(b, ph),
        ecopies,
        eroof,
        ("prep_xh", "stream"),
    )
