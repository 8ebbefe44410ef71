"""Prefill of several int4 experts with the dequant hidden behind the GEMMs (issue 7).

In prefill the experts of a layer are independent: expert e+1's dequant (memory-bound, int4 ->
bf16 scratch) can run on a side stream while expert e's GEMMs (compute-bound, cuBLAS) run on the
current stream. `python -m duoserve.bench.int4_kernels` measures what this overlap buys on the
GPU (the SMs are shared, so it is not free); the engine does not call it yet.
"""

from __future__ import annotations

import torch

from duoserve.quant.int4 import Int4ExpertLayout
from duoserve.quant.triton_kernels import _dense_expert, _dequant_expert, _permuted_input


def experts_prefill_overlapped(
    xs: list[torch.Tensor],
    buffers: list[torch.Tensor],
    layout: Int4ExpertLayout,
    scratches: tuple[torch.Tensor, torch.Tensor],
    side_stream: torch.cuda.Stream,
) -> list[torch.Tensor]:
    """Prefill of several int4 experts (x_e [T_e, H] through buffer e) with expert e+1's
    dequant on `side_stream` while expert e's GEMMs run on the current stream; two bf16
    scratches (each >= prefill_scratch_numel) alternate. Same values as expert_forward_int4
    with PREFILL_MODE "dequant". The buffers and xs must be ready on the current stream."""
    assert len(xs) == len(buffers) and len(scratches) == 2, "one buffer per x, two scratches"
    main = torch.cuda.current_stream()
    start = torch.cuda.Event()
    start.record(main)
    side_stream.wait_event(start)
    freed = [None, None]  # event: the GEMMs that last read scratch s are done
    outs = []

    def dequant(e: int) -> torch.cuda.Event:
        with torch.cuda.stream(side_stream):
            if freed[e % 2] is not None:
                side_stream.wait_event(freed[e % 2])
            weights = _dequant_expert(buffers[e], layout, scratches[e % 2], "auto")
            ready = torch.cuda.Event()
            ready.record(side_stream)
        return weights, ready

    pending = dequant(0) if xs else None
    for e in range(len(xs)):
        (w_gate_up, w_down), ready = pending
        if e + 1 < len(xs):
            pending = dequant(e + 1)  # queued before expert e's GEMMs: it overlaps them
        main.wait_event(ready)
        outs.append(_dense_expert(_permuted_input(xs[e], buffers[e], layout), w_gate_up, w_down))
        freed[e % 2] = torch.cuda.Event()
        freed[e % 2].record(main)
    return outs
