"""GPU: why the wgs expert is slower than its two ops timed alone (scripts/wgs_probe.py): each
op back to back, the two ops composed by hand, and the expert, with and without do_bench's
L2 flush, for the swap configs.

    PYTHONPATH=$PWD python3 scripts/wgs_expert_probe.py
"""

import torch
from _probe import bench_loop

from duoserve.bench.int4_kernels import _bench, _bf16_expert, _expert
from duoserve.quant.int4_wgs import WgsConfig, expert_forward_wgs, wgs_matmul

GU = WgsConfig(bm=256, bn=128, stages=4, ahead=3, swap=True)
DOWN = WgsConfig(bm=256, bn=128, stages=4, ahead=3, split_k=2, swap=True)


dev = torch.device("cuda")
buf, lay, gate_up, down, w_gu, w_d = _expert("mixtral", dev)
wgu16, wd16 = w_gu.bfloat16(), w_d.bfloat16()
h, i = lay.hidden_size, lay.intermediate_size
x = torch.randn(512, h, device=dev).bfloat16()
act = torch.empty(512, i, device=dev, dtype=torch.bfloat16)
a = torch.randn(512, i, device=dev).bfloat16()
y = torch.empty(512, h, device=dev, dtype=torch.bfloat16)
bf16 = _bf16_expert(x)
wgs_matmul(x, gate_up, 128, act, True, GU)
rows = {
    "bf16 cuBLAS expert": lambda: bf16(wgu16, wd16),
    "gate/up": lambda: wgs_matmul(x, gate_up, 128, act, True, GU),
    "down on random a": lambda: wgs_matmul(a, down, 128, y, False, DOWN),
    "down on act": lambda: wgs_matmul(act, down, 128, y, False, DOWN),
    "down split 1 on act": lambda: wgs_matmul(act, down, 128, y, False, GU),
    "gate/up + down by hand": lambda: (
        wgs_matmul(x, gate_up, 128, act, True, GU),
        wgs_matmul(act, down, 128, y, False, DOWN),
    ),
    "expert_forward_wgs": lambda: expert_forward_wgs(x, buf, lay, GU, DOWN),
}
for name, fn in rows.items():
    print(f"{name:24s} do_bench {_bench(fn) * 1e3:7.1f} us   back to back {bench_loop(fn):7.1f} us",
          flush=True)  # fmt: skip
