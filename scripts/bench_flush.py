"""Host cost of one TransferEngine.flush (GPU machine; a diagnostic for the decode host path).

    PYTHONPATH=. python3 scripts/bench_flush.py

A decode layer flushes its misses, then its prefetches: ~95 flushes of 1-6 expert copies per
step at Qwen3-30B-A3B topology, batch 1. This times, in host microseconds, a flush of k queued
copies of 9.4 MB (k = 1, 3, 6) as the engine issues it now (raw cudaMemcpyAsync on the copy
stream, named explicitly) and wrapped in `torch.cuda.stream(copy_stream)` (what flush did
before: the stream switch), plus the primitives a flush pays for: the stream switch alone,
creating and recording a timing event, and a stream wait on an event. Copies are waited for
outside the timings.
"""

from __future__ import annotations

import time

import torch

from duoserve.offload.transfer import TransferEngine

NUMEL = 9437184 // 2  # bf16 elements of one Qwen3-30B-A3B expert
ROUNDS = 200


def median_us(fn, rounds: int = ROUNDS) -> float:
    """Median host microseconds of fn() over `rounds` calls, the device idle before each."""
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2] * 1e6


def main() -> None:
    dev = torch.device("cuda")
    k_max = 6
    src = torch.empty(k_max, NUMEL, dtype=torch.bfloat16, pin_memory=True).normal_()
    dst = torch.empty(k_max, NUMEL, dtype=torch.bfloat16, device=dev)
    transfer = TransferEngine(k_max, dev)
    srcs, dsts = list(src.unbind(0)), list(dst.unbind(0))

    def flush(k: int, switch: bool):
        def run():
            for slot in range(k):
                transfer.copy_in(slot, srcs[slot], dsts[slot])
            if switch:
                with torch.cuda.stream(transfer.copy_stream):
                    transfer.flush()
            else:
                transfer.flush()

        return run

    print(f"{'what':48s} {'host us':>8}")
    for k in (1, 3, 6):
        for switch in (False, True):
            name = f"copy_in x{k} + flush" + (" inside a stream switch" if switch else "")
            print(f"{name:48s} {median_us(flush(k, switch)):8.1f}")
    assert torch.equal(dst.cpu(), src), "the copies did not land"
    stream = transfer.copy_stream

    def switch_only():
        with torch.cuda.stream(stream):
            pass

    def timing_event():
        torch.cuda.Event(enable_timing=True).record(stream)

    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream())

    for name, fn in (
        ("stream switch alone (enter + exit)", switch_only),
        ("torch.cuda.Event(timing) + record", timing_event),
        ("stream.wait_event", lambda: stream.wait_event(event)),
    ):
        print(f"{name:48s} {median_us(fn):8.1f}")


if __name__ == "__main__":
    main()
