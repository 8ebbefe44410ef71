"""Transfer engine: one copy stream, a ready event per slot, compute waits on events.

Ordering, on CUDA:
- copy into slot s waits (on the copy stream) for `done_event[s]`, recorded on the compute
  stream after the last compute that read s, so a slot is never overwritten while read;
- compute that reads s waits (on the compute stream) for `ready_event[s]`, recorded on the
  copy stream after the copy; the host never waits.
Copies are issued in batches: `copy_in` queues, `flush` issues the queued copies under one
stream switch and records one ready event (and one timing pair) for all of them; a wait
flushes first. CUDA events and stream switches cost the host tens of microseconds each, and
a decode step issues hundreds of copies: callers flush once per batch (a layer's misses, its
prefetches), or after each copy where compute should start as each one lands.
Copy time and compute stall time are measured with CUDA events and resolved lazily.
On the CPU every copy is synchronous and the same code runs without events.

A flush issues each expert copy with one `cudaMemcpyAsync` of the process's own libcudart
(ctypes, `raw_memcpy`): 7.1 us of host time per copy on the H100 machine against 12.2 us for
torch's `copy_` (dispatch, and an event per copy from torch's pinned-memory allocator;
scripts/bench_copy_issue.py). Sources are host-store rows, alive as long as the engine, so
the allocator's event (which guards memory freed while a copy reads it) is not needed. Without
that library (not Linux, a static runtime) copies go through torch.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass, field

import torch

H2D = 1  # cudaMemcpyHostToDevice


@functools.cache
def raw_memcpy():
    """`cudaMemcpyAsync(dst, src, nbytes, kind, stream)` of the libcudart this process loaded,
    or None (not found: callers use torch)."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "/libcudart.so" in line})
    except OSError:
        return None
    if not paths:
        return None
    fn = ctypes.CDLL(paths[0]).cudaMemcpyAsync
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.argtypes += [ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


@dataclass
class TransferStats:
    """Bytes moved and device-side timings (seconds)."""

    num_copies: int = 0
    bytes_copied: int = 0
    copy_seconds: float = 0.0
    wait_seconds: float = 0.0
    pending_copy: list = field(default_factory=list)  # (start, end) events, unresolved
    pending_wait: list = field(default_factory=list)


QUEUED = object()  # ready_events[s] of a copy queued but not yet issued (see flush)


class TransferEngine:
    """Moves packed experts host -> device slots on a dedicated copy stream."""

    def __init__(self, num_slots: int, device: torch.device, timed: bool = True) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.is_cuda else None
        self.ready_events: list = [None] * num_slots
        self.done_events: list = [None] * num_slots
        self.timed = timed and self.is_cuda
        self.stats = TransferStats()
        self.use_raw = self.is_cuda  # queued copies by raw_memcpy (False: torch's copy_)
        self._queued: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (slot, src, dst)

    def _event(self, timing: bool = False):
        return torch.cuda.Event(enable_timing=timing)

    def copy_in(self, slot: int, src_host: torch.Tensor, dst: torch.Tensor) -> None:
        """Queue a copy of `src_host` into slot `slot` (view `dst`); `flush` issues it (on the
        CPU it is done when this returns)."""
        self.stats.num_copies += 1
        self.stats.bytes_copied += src_host.numel() * src_host.element_size()
        if not self.is_cuda:
            dst.copy_(src_host)
            return
        assert src_host.is_contiguous() and dst.is_contiguous() and dst.dtype == src_host.dtype
        assert dst.numel() == src_host.numel(), f"slot {slot}: {dst.numel()} != {src_host.numel()}"
        self._queued.append((slot, src_host, dst))
        self.ready_events[slot] = QUEUED

    def flush(self) -> None:
        """Issue the queued copies on the copy stream after the done events of their slots;
        one ready event for all of them. Returns at once."""
        if not self._queued:
            return
        queued, self._queued = self._queued, []
        stream = self.copy_stream
        waited: set[int] = set()
        for slot, _, _ in queued:
            done = self.done_events[slot]
            if done is not None and id(done) not in waited:
                waited.add(id(done))
                stream.wait_event(done)
        start = self._event(True) if self.timed else None
        if start is not None:
            start.record(stream)
        self._issue(queued)
        ready = self._event(self.timed)
        ready.record(stream)
        for slot, _, _ in queued:
            self.ready_events[slot] = ready
        if start is not None:
            self.stats.pending_copy.append((start, ready))

    def _issue(self, queued: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """The queued copies on the copy stream. Raw copies name the stream; only torch's
        copy_ needs it made current (around a flush the switch cost the H100 machine's host
        31-46 us, scripts/bench_flush.py: ~3-4 ms per batch-1 Qwen3 decode step)."""
        memcpy = raw_memcpy() if self.use_raw else None
        if memcpy is None:
            with torch.cuda.stream(self.copy_stream):
                for _, src, dst in queued:
                    dst.copy_(src, non_blocking=True)
            return
        stream = self.copy_stream.cuda_stream
        for _, src, dst in queued:
            nbytes = src.numel() * src.element_size()
            err = memcpy(dst.data_ptr(), src.data_ptr(), nbytes, H2D, stream)
            if err:
                raise RuntimeError(f"cudaMemcpyAsync of {nbytes} bytes failed: CUDA error {err}")

    def copy_sync(self, src_host: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy on the compute stream (no overlap): what module-hook offloading does."""
        self.stats.num_copies += 1
        self.stats.bytes_copied += src_host.numel() * src_host.element_size()
        if not self.is_cuda:
            dst.copy_(src_host)
            return
        start = self._event(True) if self.timed else None
        if start is not None:
            start.record()
        dst.copy_(src_host, non_blocking=True)
        if start is not None:
            end = self._event(True)
            end.record()
            self.stats.pending_copy.append((start, end))
            self.stats.pending_wait.append((start, end))  # compute waits for all of it

    def wait_ready(self, slot: int) -> None:
        """Make the compute stream wait until slot `slot` has landed (no host wait)."""
        if self.ready_events[slot] is QUEUED:
            self.flush()
        ready = self.ready_events[slot]
        if not self.is_cuda or ready is None:
            return
        stream = torch.cuda.current_stream(self.device)
        if self.timed:
            before, after = self._event(True), self._event(True)
            before.record(stream)
            stream.wait_event(ready)
            after.record(stream)
            self.stats.pending_wait.append((before, after))
        else:
            stream.wait_event(ready)
        self.ready_events[slot] = None

    def wait_ready_slots(self, slots: list[int]) -> None:
        """wait_ready for several slots, timed as one stall (one event pair for all of them)."""
        if any(self.ready_events[s] is QUEUED for s in slots):
            self.flush()
        ready = [self.ready_events[s] for s in slots]
        for s in slots:
            self.ready_events[s] = None
        self.wait_events(ready)

    def mark_read_slots(self, slots: list[int]) -> None:
        """mark_read for several slots with one event (recorded once, shared)."""
        if self.is_cuda and slots:
            done = self._event()
            done.record(torch.cuda.current_stream(self.device))
            for s in slots:
                self.done_events[s] = done

    def mark_read(self, slot: int) -> None:
        """Record that compute issued so far is the last reader of `slot`."""
        if self.is_cuda:
            done = self._event()
            done.record(torch.cuda.current_stream(self.device))
            self.done_events[slot] = done

    def resolve(self) -> TransferStats:
        """Fold finished event pairs into seconds (synchronizes with the device)."""
        if self.is_cuda and (self.stats.pending_copy or self.stats.pending_wait):
            torch.cuda.synchronize(self.device)
            self.stats.copy_seconds += (
                sum(a.elapsed_time(b) for a, b in self.stats.pending_copy) / 1e3
            )
            self.stats.wait_seconds += (
                sum(a.elapsed_time(b) for a, b in self.stats.pending_wait) / 1e3
            )
            self.stats.pending_copy.clear()
            self.stats.pending_wait.clear()
        return self.stats

    # ------------------------------------------------------------------ event-level API
    # For schedules that own their staging buffers (the prefill ring, offload/prefill.py): the
    # caller keeps the events. Bytes and timings count in `stats` and, when given, in `also`.

    def copy_after(
        self,
        src_host: torch.Tensor,
        dst: torch.Tensor,
        after=None,
        also: TransferStats | None = None,
    ):
        """Start copying `src_host` into `dst` on the copy stream once event `after` (the last
        reader of `dst`) has fired; returns the ready event at once (None on the CPU, where the
        copy is complete when this returns)."""
        nbytes = src_host.numel() * src_host.element_size()
        for s in (self.stats, also):
            if s is not None:
                s.num_copies += 1
                s.bytes_copied += nbytes
        if not self.is_cuda:
            dst.copy_(src_host)
            return None
        with torch.cuda.stream(self.copy_stream):
            if after is not None:
                self.copy_stream.wait_event(after)
            start = self._event(True) if self.timed else None
            if start is not None:
                start.record(self.copy_stream)
            dst.copy_(src_host, non_blocking=True)
            ready = self._event(self.timed)
            ready.record(self.copy_stream)
        if start is not None:
            for s in (self.stats, also):
                if s is not None:
                    s.pending_copy.append((start, ready))
        return ready

    def copy_after_many(
        self, items: list, also: TransferStats | None = None, time_each: bool = False
    ) -> list:
        """copy_after for several (src_host, dst, after) items under one stream switch; their
        ready events, in order. Timed as one span (first copy's start to last copy's end,
        including any wait on a later item's `after`), or each copy apart with `time_each`."""
        if time_each or not self.is_cuda or not self.timed or len(items) <= 1:
            return [self.copy_after(src, dst, after, also) for src, dst, after in items]
        for s in (self.stats, also):
            if s is not None:
                s.num_copies += len(items)
                s.bytes_copied += sum(src.numel() * src.element_size() for src, _, _ in items)
        out = []
        with torch.cuda.stream(self.copy_stream):
            start = None
            for i, (src, dst, after) in enumerate(items):
                if after is not None:
                    self.copy_stream.wait_event(after)
                if start is None:
                    start = self._event(True)
                    start.record(self.copy_stream)
                dst.copy_(src, non_blocking=True)
                ready = self._event(i == len(items) - 1)
                ready.record(self.copy_stream)
                out.append(ready)
        for s in (self.stats, also):
            if s is not None:
                s.pending_copy.append((start, out[-1]))
        return out

    def wait_events(self, events: list, also: TransferStats | None = None) -> None:
        """wait_event for several events, timed as one stall (one event pair)."""
        events = list({id(e): e for e in events if e is not None}.values())
        if not self.is_cuda or not events:
            return
        if len(events) == 1 or not self.timed:
            for e in events:
                self.wait_event(e, also)
            return
        stream = torch.cuda.current_stream(self.device)
        before, after = self._event(True), self._event(True)
        before.record(stream)
        for e in events:
            stream.wait_event(e)
        after.record(stream)
        for s in (self.stats, also):
            if s is not None:
                s.pending_wait.append((before, after))

    def wait_event(self, ready, also: TransferStats | None = None) -> None:
        """Make the compute stream wait for `ready` (no host wait); the stall is timed."""
        if not self.is_cuda or ready is None:
            return
        stream = torch.cuda.current_stream(self.device)
        if not self.timed:
            stream.wait_event(ready)
            return
        before, after = self._event(True), self._event(True)
        before.record(stream)
        stream.wait_event(ready)
        after.record(stream)
        for s in (self.stats, also):
            if s is not None:
                s.pending_wait.append((before, after))

    def record_compute(self):
        """An event recorded now on the compute stream (None on the CPU): a `done` event."""
        if not self.is_cuda:
            return None
        done = self._event()
        done.record(torch.cuda.current_stream(self.device))
        return done


def resolve_stats(stats: TransferStats, wait: bool = True) -> TransferStats:
    """Fold event pairs of `stats` into seconds: all of them (`wait`: blocks until the last
    pair of each list fired), or only pairs whose end event has fired (never blocks)."""
    for pending, attr in (
        (stats.pending_copy, "copy_seconds"),
        (stats.pending_wait, "wait_seconds"),
    ):
        if not pending:
            continue
        if wait:
            pending[-1][1].synchronize()  # each list's pairs were recorded on one stream
        fired = [wait or end.query() for _, end in pending]
        done = [p for p, f in zip(pending, fired) if f]
        seconds = sum(a.elapsed_time(b) for a, b in done) / 1e3
        setattr(stats, attr, getattr(stats, attr) + seconds)
        pending[:] = [p for p, f in zip(pending, fired) if not f]
    return stats
