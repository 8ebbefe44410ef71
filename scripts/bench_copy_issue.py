"""Host cost of issuing one expert copy (GPU machine; a diagnostic for the decode host path).

    PYTHONPATH=. python3 scripts/bench_copy_issue.py

Issues N copies of 9.4 MB (a Qwen3-30B-A3B expert) from pinned host memory into device
slots on a side stream, three ways, and prints the host microseconds per issued copy (the
copies themselves run at the link's speed and are waited for outside the timing):
  torch:  dst.copy_(src, non_blocking=True), src from torch's pinned allocator;
  torch (registered): the same, src in memory pinned by cudaHostRegister instead (torch's
          pinned allocator records an event per copy of its own blocks);
  cudart: cudaMemcpyAsync called directly through ctypes (transfer.raw_memcpy, what
          the engine uses).
"""

from __future__ import annotations

import time

import torch

from duoserve.offload.transfer import H2D, raw_memcpy

N, NUMEL = 48, 9437184 // 2  # bf16 elements of one expert


def timed(fn, stream) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.cuda.stream(stream):
        fn()
    issued = time.perf_counter() - t0
    torch.cuda.synchronize()
    return issued / N * 1e6


def main() -> None:
    dev = torch.device("cuda")
    stream = torch.cuda.Stream(dev)
    src = torch.empty(N, NUMEL, dtype=torch.bfloat16, pin_memory=True)
    plain = torch.empty(N, NUMEL, dtype=torch.bfloat16)
    cudart = torch.cuda.cudart()
    nbytes = plain.numel() * plain.element_size()
    assert cudart.cudaHostRegister(plain.data_ptr(), nbytes, 0) == 0
    dst = torch.empty(N, NUMEL, dtype=torch.bfloat16, device=dev)
    srcs, regs, dsts = list(src.unbind(0)), list(plain.unbind(0)), list(dst.unbind(0))
    memcpy = raw_memcpy()  # the engine's copy path (offload/transfer.py)
    assert memcpy is not None, "libcudart is not loaded in this process"
    size = NUMEL * 2
    ptrs = [(d.data_ptr(), s.data_ptr()) for d, s in zip(dsts, srcs)]

    def torch_copy(sources):
        for d, s in zip(dsts, sources):
            d.copy_(s, non_blocking=True)

    def raw_copy():
        h = stream.cuda_stream
        for d, s in ptrs:
            assert memcpy(d, s, size, H2D, h) == 0

    for name, fn in (
        ("torch", lambda: torch_copy(srcs)),
        ("torch (registered)", lambda: torch_copy(regs)),
        ("cudart", raw_copy),
    ):
        runs = sorted(timed(fn, stream) for _ in range(5))
        print(f"{name:20s} {runs[len(runs) // 2]:7.1f} us per issued copy (median of 5 x {N})")
    assert torch.equal(dst.cpu(), src)  # the last run (cudart) moved the bytes
    cudart.cudaHostUnregister(plain.data_ptr())


if __name__ == "__main__":
    main()
