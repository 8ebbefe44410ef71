"""GPU: the warp-specialized Gluon prefill kernel (`quant/int4_wgs.py`) at the Mixtral expert
shape: correctness of every config first (512 and 100 tokens, outputs pre-filled with NaN),
then do_bench medians of each config per op next to bf16 cuBLAS on the same (dequantized)
weights and dequant + cuBLAS (the engine's prefill path), and the whole expert with the
fastest config of each op.

    PYTHONPATH=$PWD python3 scripts/wgs_probe.py
"""

import torch
import torch.nn.functional as F
from _probe import bench_loop

from duoserve.bench.int4_kernels import _bench, _bf16_expert, _expert, _rel
from duoserve.quant import triton_kernels as tk
from duoserve.quant.int4_wgs import WgsConfig, expert_forward_wgs, wgs_matmul

CONFIGS = [
    WgsConfig(bm=256, bn=128, stages=4, ahead=3),
    WgsConfig(bm=256, bn=128, stages=4, ahead=3, swap=True),
    WgsConfig(bm=256, bn=128, stages=4, ahead=3, split_k=2),
    WgsConfig(bm=256, bn=128, stages=4, ahead=3, split_k=2, swap=True),
    WgsConfig(bm=256, bn=128, stages=4, ahead=2, swap=True),
]  # fmt: skip


def _name(cfg: WgsConfig) -> str:
    return (
        f"bm{cfg.bm} bn{cfg.bn} s{cfg.stages} hs{cfg.halves_per_stage} a{cfg.ahead}"
        f" pw{cfg.producer_warps} split{cfg.split_k} f{cfg.inflight} tail{int(cfg.tail_split)}"
        f" swap{int(cfg.swap)}"
    )


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
    for cfg in CONFIGS:
        act = torch.full((t, i), float("nan"), device=dev, dtype=torch.bfloat16)
        wgs_matmul(x, gate_up, 128, act, True, cfg)
        y = torch.full((t, h), float("nan"), device=dev, dtype=torch.bfloat16)
        wgs_matmul(a, down, 128, y, False, cfg)
        torch.cuda.synchronize()
        print(
            f"T={t} {_name(cfg)}: gate/up rel err"
            f" {_rel(act, act_ref):.1e}, down {_rel(y, y_ref):.1e}",
            flush=True,
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
for cfg in CONFIGS:
    t_gu = _bench(lambda c=cfg: wgs_matmul(x, gate_up, 128, act, True, c)) * 1e3
    t_d = _bench(lambda c=cfg: wgs_matmul(a, down, 128, y, False, c)) * 1e3
    print(f"  {_name(cfg)}: gate/up + silu {t_gu:.1f} us, down {t_d:.1f} us", flush=True)
    for op, ms in (("gate_up", t_gu), ("down", t_d)):
        if op not in best or ms < best[op][0]:
            best[op] = (ms, cfg)
gu_cfg, d_cfg = best["gate_up"][1], best["down"][1]
e = _rel(expert_forward_wgs(x, buf, lay, gu_cfg, d_cfg), bf16(wgu16, wd16))
t_wgs = _bench(lambda: expert_forward_wgs(x, buf, lay, gu_cfg, d_cfg)) * 1e3


q_bf16 = bench_loop(lambda: bf16(wgu16, wd16))
q_wgs = bench_loop(lambda: expert_forward_wgs(x, buf, lay, gu_cfg, d_cfg))
print(f"T=512 back to back: bf16 expert {q_bf16:.1f} us, wgs expert {q_wgs:.1f} us"
      f" = {100 * (q_wgs / q_bf16 - 1):+.1f}%")  # fmt: skip
print(
    f"T=512 wgs expert {t_wgs:.1f} us = {100 * (t_wgs / t_bf16 - 1):+.1f}% vs bf16"
    f" (gate/up {gu_cfg}, down {d_cfg}); rel err vs bf16 cuBLAS expert {e:.1e}"
)
