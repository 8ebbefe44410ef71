"""Scheduler: default behaviour, the step-cost model, and SLO-aware planning on a fake clock."""

from __future__ import annotations

import pytest

from duoserve.engine.request import Request
from duoserve.engine.scheduler import Scheduler, SloTargets, StepCostModel
from duoserve.layers.sampler import SamplingParams


class FakeKV:
    """The KV-slot bookkeeping the scheduler uses, without tensors."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.free_slots = list(range(num_slots - 1, -1, -1))

    def allocate_slot(self) -> int:
        return self.free_slots.pop()

    def free_slot(self, slot: int) -> None:
        self.free_slots.append(slot)

    @property
    def num_free_slots(self) -> int:
        return len(self.free_slots)


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_request(rid: str, num_prompt: int, arrival: float, max_tokens: int = 100) -> Request:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    return Request(rid, list(range(num_prompt)), params, arrival_time=arrival)


def run_prefill(sched: Scheduler) -> list[str]:
    """Schedule one step, which must be a prefill; complete it as the engine would."""
    batch = sched.schedule()
    assert batch is not None and batch.phase == "prefill", batch
    for req, n in zip(batch.requests, batch.num_new_tokens):
        req.num_computed_tokens += n
        if not req.is_prefilling:
            req.output_token_ids.append(1)
            req.first_token_time = req.first_token_time or sched.clock()
    return [r.request_id for r in batch.requests]


def make_decoding(sched: Scheduler, clock: Clock, rid: str, num_out: int, first_at: float):
    """A running request past its prefill, with num_out tokens, the first at `first_at`."""
    req = make_request(rid, 4, arrival=first_at - 0.1)
    req.slot = sched.kv.allocate_slot()
    req.num_computed_tokens = 4 + num_out - 1
    req.output_token_ids = [1] * num_out
    req.first_token_time = first_at
    sched.running.append(req)
    return req


# ----------------------------------------------------------------------------- default


def test_default_is_prefill_first_and_fcfs():
    clock = Clock()
    sched = Scheduler(FakeKV(2), max_num_batched_tokens=8, max_model_len=64, clock=clock)
    for i, n in enumerate([5, 5, 3]):
        sched.add(make_request(f"r{i}", n, arrival=float(i)))
    assert run_prefill(sched) == ["r0", "r1"]  # 5 + 3 of 5 tokens: the budget splits r1
    assert run_prefill(sched) == ["r1"]  # finish the chunked prompt before decoding
    batch = sched.schedule()
    assert batch.phase == "decode" and [r.request_id for r in batch.requests] == ["r0", "r1"]
    sched.finish(batch.requests[0], "length")
    assert run_prefill(sched) == ["r2"]  # a freed slot is refilled at once


def test_observe_step_feeds_the_cost_models():
    sched = Scheduler(FakeKV(4), 64, 64)
    sched.add(make_request("a", 10, 0.0))
    run_prefill(sched)
    sched.observe_step(0.5)
    sched.schedule()
    sched.observe_step(0.02)
    sched.observe_step(9.9)  # no batch pending: ignored
    assert sched.prefill_cost.estimate(10) == pytest.approx(0.5)
    assert sched.decode_cost.estimate(1) == pytest.approx(0.02)


def test_step_cost_model_fits_a_line():
    model = StepCostModel()
    assert model.estimate(3) is None
    model.observe(4, 1.0)
    assert model.estimate(100) == 1.0  # one distinct x: the mean
    for x in (1, 2, 3, 8):
        model.observe(x, 0.2 + 0.05 * x)
    model.samples.popleft()  # drop the first point, off the line
    assert model.estimate(10) == pytest.approx(0.7)
    noisy = StepCostModel()
    for x, t in ((1, 0.5), (8, 0.1)):
        noisy.observe(x, t)
    assert noisy.estimate(1) == pytest.approx(0.3)  # negative slopes are clamped to flat


# ----------------------------------------------------------------------------- SLOs


def slo_scheduler(ttft_s: float | None, tpot_s: float | None, num_slots: int = 8):
    clock = Clock()
    sched = Scheduler(FakeKV(num_slots), 256, 512, slo=SloTargets(ttft_s, tpot_s), clock=clock)
    return sched, clock


def test_prefill_waits_while_it_would_break_tpot_then_runs_for_ttft():
    sched, clock = slo_scheduler(ttft_s=2.0, tpot_s=0.1)
    sched.prefill_cost.observe(16, 0.5)
    sched.decode_cost.observe(1, 0.05)
    # 3 tokens in 0.1 s since the first: a 0.55 s stall would make TPOT (0.1+0.55)/3 > 0.1
    make_decoding(sched, clock, "d", num_out=3, first_at=clock.now - 0.1)
    sched.add(make_request("w", 16, arrival=clock.now))
    assert sched.schedule().phase == "decode"
    clock.now += 1.0  # TTFT deadline in 1.0 s, prefill 0.5 s + one decode 0.05 s: still room
    assert sched.schedule().phase == "decode"
    clock.now += 0.46  # now deadline - prefill < one decode step: must prefill
    assert sched.schedule().phase == "prefill"


def test_prefill_runs_once_decodes_have_tpot_credit():
    sched, clock = slo_scheduler(ttft_s=None, tpot_s=0.1)
    sched.prefill_cost.observe(16, 0.5)
    sched.decode_cost.observe(1, 0.02)
    # 31 tokens in 0.6 s: (0.6 + 0.52) / 31 = 0.036 s per token even after the stall
    make_decoding(sched, clock, "d", num_out=31, first_at=clock.now - 0.6)
    sched.add(make_request("w", 16, arrival=clock.now))
    assert sched.schedule().phase == "prefill"


def test_without_measurements_slo_scheduling_is_prefill_first():
    sched, clock = slo_scheduler(ttft_s=1.0, tpot_s=0.01)
    make_decoding(sched, clock, "d", num_out=2, first_at=clock.now)
    sched.add(make_request("w", 8, arrival=clock.now))
    assert sched.schedule().phase == "prefill"


def test_batch_size_capped_by_tpot():
    sched, clock = slo_scheduler(ttft_s=None, tpot_s=0.035)
    for n in (1, 2, 4):
        sched.decode_cost.observe(n, 0.01 + 0.01 * n)  # 2 -> 0.03 s fits, 3 -> 0.04 s does not
    for i in range(5):
        sched.add(make_request(f"r{i}", 4, arrival=clock.now))
    assert run_prefill(sched) == ["r0", "r1"]
    assert len(sched.waiting) == 3
    assert sched.schedule().phase == "decode"  # nothing else admitted while 2 run


def test_admission_is_earliest_deadline_with_late_requests_yielding():
    sched, clock = slo_scheduler(ttft_s=1.0, tpot_s=None, num_slots=1)
    clock.now = 10.0
    sched.add(make_request("late", 4, arrival=8.5))  # missed at 9.5: key 10.5
    sched.add(make_request("fresh", 4, arrival=9.8))  # deadline 10.8
    sched.add(make_request("older", 4, arrival=9.2))  # deadline 10.2
    assert run_prefill(sched) == ["older"]
    sched.finish(sched.running[0], "length")
    assert run_prefill(sched) == ["late"]  # 10.5 < 10.8: yields for one period at most
    sched.finish(sched.running[0], "length")
    assert run_prefill(sched) == ["fresh"]


def test_slo_targets_are_validated():
    with pytest.raises(AssertionError):
        SloTargets(ttft_s=0.0)


def test_slo_scheduling_keeps_greedy_outputs(one_torch_thread):
    """Scheduling decisions change timing, never tokens."""
    from duoserve.llm import LLM

    llm = LLM("synthetic:olmoe-1b-7b:tiny", device="cpu", max_model_len=128, max_num_seqs=3)
    prompts = [f"prompt {i} " * (1 + i % 3) for i in range(5)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = [o.output_token_ids for o in llm.generate(prompts, params)]
    engine = llm.engine
    engine.scheduler.slo = SloTargets(ttft_s=0.5, tpot_s=0.001)  # tight: defers prefills
    ids = [engine.add_request(p, params).request_id for p in prompts]
    phases, final = [], {}
    for _ in range(200):
        if not engine.has_unfinished_requests():
            break
        outputs = engine.step()
        phases.append(engine.scheduler.last_batch.phase)
        engine.scheduler.observe_step(0.01 if phases[-1] == "decode" else 0.05)
        final.update({o.request_id: o.output_token_ids for o in outputs if o.finished})
    assert [final[i] for i in ids] == expected
    assert "decode" in phases and "prefill" in phases
