"""GPU: the Gluon wgmma prefill kernel (`quant/int4_wgp.py`) at the Mixtral expert shape against
the bf16 cuBLAS expert on the same (dequantized) weights and against dequant + cuBLAS (the
engine's prefill path): correctness first (512 and 100 tokens), then do_bench medians.

    PYTHONPATH=$PWD python3 scripts/wgp_probe.py
"""

import torch
import torch.nn.functional as F

from duoserve.bench.int4_kernels import _bench, _bf16_expert, _expert, _rel
from duoserve.quant import triton_kernels as tk
from duoserve.quant.int4_wgp import expert_forward_wgp, wgp_matmul

dev = torch.device("cuda")
buf, lay, gate_up, down, w_gu, w_d = _expert("mixtral", dev)
wgu16, wd16 = w_gu.bfloat16(), w_d.bfloat16()
h, i = lay.hidden_size, lay.intermediate_size
for t in (512, 100):
    x = torch.randn(t, h, device=dev).bfloat16()
    g, u = (x.float() @ w_gu.T).chunk(2, dim=1)
    act_ref = F.silu(g) * u
    a = act_ref.bfloat16()
    y_ref = a.float() @ w_d.T
    for bt in (0, 128, 256):  # 0: wgp; else wgr with bt tokens per CTA
        act = torch.full((t, i), float("nan"), device=dev, dtype=torch.bfloat16)
        wgp_matmul(x, gate_up, 128, act, True, bt)
        y = torch.full((t, h), float("nan"), device=dev, dtype=torch.bfloat16)
        wgp_matmul(a, down, 128, y, False, bt)
        e = _rel(expert_forward_wgp(x, buf, lay, bt, bt), _bf16_expert(x)(wgu16, wd16))
        print(
            f"T={t} bt={bt}: gate/up rel err {_rel(act, act_ref):.1e}, down {_rel(y, y_ref):.1e},"
            f" expert vs bf16 cuBLAS expert {e:.1e}"
        )
x = torch.randn(512, h, device=dev).bfloat16()
act = torch.empty(512, i, device=dev, dtype=torch.bfloat16)
a = torch.randn(512, i, device=dev).bfloat16()
y = torch.empty(512, h, device=dev, dtype=torch.bfloat16)
bf16 = _bf16_expert(x)
t_bf16 = _bench(lambda: bf16(wgu16, wd16)) * 1e3
t_gu16 = _bench(lambda: x @ wgu16.T) * 1e3
t_d16 = _bench(lambda: a @ wd16.T) * 1e3
t_deq = _bench(lambda: tk.expert_forward_int4(x, buf, lay)) * 1e3
print(f"T=512 bf16 cuBLAS: expert {t_bf16:.1f} us (gate/up GEMM {t_gu16:.1f}, down {t_d16:.1f})")
print(f"T=512 dequant + cuBLAS (engine path): {t_deq:.1f} us = {100 * (t_deq / t_bf16 - 1):+.1f}%")
best = {}
for bt in (0, 128, 256):
    t_gu = _bench(lambda bt=bt: wgp_matmul(x, gate_up, 128, act, True, bt)) * 1e3
    t_d = _bench(lambda bt=bt: wgp_matmul(a, down, 128, y, False, bt)) * 1e3
    best["gu"] = min(best.get("gu", (1e9, 0)), (t_gu, bt))
    best["d"] = min(best.get("d", (1e9, 0)), (t_d, bt))
    label = f"wgr bt={bt}" if bt else "wgp"
    print(f"T=512 {label}: gate/up + silu {t_gu:.1f} us, down {t_d:.1f} us")
bg, bd = best["gu"][1], best["d"][1]
t_e = _bench(lambda: expert_forward_wgp(x, buf, lay, bg, bd)) * 1e3
print(
    f"T=512 expert (gate/up bt={bg}, down bt={bd}): {t_e:.1f} us ="
    f" {100 * (t_e / t_bf16 - 1):+.1f}% vs bf16 cuBLAS"
)
