"""The benchmark suite on the CPU: bounds, access groups, the whole run, the report."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from duoserve.bench import common, metrics, report, suite
from duoserve.bench.replay import TraceReplay
from duoserve.config import EngineConfig
from duoserve.engine.llm_engine import LLMEngine
from duoserve.offload.simulate import belady_brute_force, belady_misses, simulate

TINY = "synthetic:olmoe-1b-7b:tiny"  # 16 MoE layers x 64 experts, top-8


def _trace(path, layers=16, tokens=256, experts=64, k=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(layers * tokens)])
    save_file({"expert_ids": ids.view(layers, tokens, k).to(torch.int16)}, str(path))
    return path


def test_min_misses_is_belady():
    rng = random.Random(0)
    for trial in range(200):
        num_layers, num_experts = rng.randint(1, 3), rng.randint(2, 6)
        k = rng.randint(1, min(3, num_experts))
        groups = [
            (layer, tuple(sorted(rng.sample(range(num_experts), rng.randint(1, k)))))
            for _ in range(rng.randint(1, 10))
            for layer in range(num_layers)
        ]
        cap = rng.randint(k, num_layers * num_experts + 1)
        got = metrics.min_misses(groups, cap)
        assert got == belady_misses(groups, cap).num_misses, (groups, cap)
        if trial % 4 == 0 and len(groups) <= 10:
            assert got == belady_brute_force(groups, cap)


def test_bounds_on_a_hand_checked_case():
    # decode MIN, cap 2, one layer: 0 1 2 0 1 2 -> misses 0 1 2(evict 1) . 1(evict 0) . = 4;
    # a free initial content {0, 1} saves 2 of them: bound 2 misses
    groups = [(0, (e,)) for e in (0, 1, 2, 0, 1, 2)]
    b = metrics.decode_bound_misses(groups, 2)
    assert b == {"min_misses_cold": 4, "distinct_experts": 3, "bound_misses": 2}
    # a replay: layer 0 routes token t to t % 3, layer 1 always to 3; prompt of 3 tokens in
    # slot 0 (base 0) -> prefill needs {0,1,2} + {3}; decode steps at positions 3, 4
    ids = torch.tensor([[t % 3 for t in range(8)], [3] * 8]).view(2, 8, 1)
    replay = SimpleNamespace(
        expert_ids=ids,
        base_of_slot=torch.tensor([0, 4]),
        layer_index={0: 0, 1: 1},
        num_tokens=8,
    )
    assert metrics.replay_access_groups(replay, [0], [3], 2) == [
        (0, (0,)), (1, (3,)), (0, (1,)), (1, (3,))
    ]  # fmt: skip
    assert metrics.replay_access_groups(replay, [0, 1], [3, 3], 1) == [(0, (0, 1)), (1, (3,))]
    case = suite.Case("c", 1, 3, 3)
    rows = [
        {"policy": "lru", "status": "ok", "budget_gib": 1.0, "slots": 2, "kv_slots": [0]},
        {"policy": "full-gpu (reference)", "status": "ok", "budget_gib": None, "slots": None,
         "kv_slots": [0], "decode_s": 0.5},
    ]  # fmt: skip
    out = metrics.case_bounds(replay, rows, case, expert_bytes=10**9, bw_gbps=50.0)
    assert out["prefill_experts"] == 4 and out["prefill_bound_s"] == pytest.approx(4 / 50)
    lru = rows[0]["bound"]
    # cap 2: groups 0 | 3 | 1 | 3 -> cold MIN 3 misses, 3 distinct: bound 3 - 2 = 1 miss
    assert (lru["min_misses_cold"], lru["bound_misses"]) == (3, 1)
    assert lru["decode_bound_s"] == pytest.approx(1 / 50 + 0.5)
    assert lru["tpot_bound_s"] == pytest.approx((1 / 50 + 0.5) / 2)
    assert lru["e2e_bound_s"] == pytest.approx(4 / 50 + 1 / 50 + 0.5)
    assert rows[1]["bound"]["bound_misses"] == 0  # everything resident


def test_access_groups_are_what_the_engine_runs(tmp_path):
    """The bound's access sequence is the engine's: the lru backend's access log, and the
    simulated lru misses of the decode part equal the measured ones."""
    kw = dict(device="cpu", max_model_len=32, max_num_seqs=2, max_num_batched_tokens=32)
    engine = LLMEngine(TINY, EngineConfig(policy="lru", gpu_memory_budget=0.01, **kw))
    replay = TraceReplay(_trace(tmp_path / "t.safetensors"), engine.device, window=32)
    replay.attach(engine)
    engine.experts.access_log = []
    prompts = common.case_prompts(engine.model_config.vocab_size, 2, 6)
    r = common.run_batch(engine, prompts, 4)
    pre = metrics.prefill_access_groups(replay, r["kv_slots"], [6, 6])
    dec = metrics.replay_access_groups(replay, r["kv_slots"], [6, 6], 3)
    assert engine.experts.access_log == pre + dec
    sim = simulate(pre + dec, engine.memory_plan.num_expert_slots, "lru")
    decode_misses = sum(len(m) for m in sim.group_miss_ids[len(pre) :])
    assert r["decode"]["misses"] == decode_misses
    assert r["prefill"]["misses"] == sum(len(ids) for _, ids in pre)  # cold: each once


def test_suite_end_to_end_on_cpu(tmp_path):
    trace = _trace(tmp_path / "t.safetensors")
    out = tmp_path / "results"
    argv = ["--scenario", "S2", "--model", TINY, "--trace", str(trace), "--device", "cpu"]
    argv += ["--budget-gib", "0.01", "--prompt-len", "8", "--max-tokens", "3", "--quick"]
    argv += ["--bandwidth-gbps", "50", "--out", str(out)]
    argv += ["--policies", "ondemand", "lru", "no-such-policy"]
    suite.main(argv)
    doc = json.loads((out / "suite-S2.json").read_text())
    assert doc["routing_replayed"] and "replayed" in doc["routing"]
    assert doc["env"]["torch"] == torch.__version__
    (case,) = doc["cases"]
    rows = {r["policy"]: r for r in case["rows"]}
    assert rows["full-gpu"]["status"] == "does not fit" and "GiB" in rows["full-gpu"]["reason"]
    assert rows["no-such-policy"]["status"] == "unavailable"
    for name in ("ondemand", "lru", "full-gpu (reference)"):
        r = rows[name]
        assert r["status"] == "ok", r
        assert r["greedy_prefix_agree_ref"] == 3  # offloaded outputs == all-resident outputs
        assert r["e2e_bound_ratio"] > 0 and r["bound"]["prefill_experts"] > 0
    lru = rows["lru"]
    assert lru["prefill"]["misses"] == lru["bound"]["prefill_experts"]  # cold, each once
    assert lru["prefill_bytes"] == lru["bound"]["prefill_bytes"]
    assert lru["speedup_e2e_vs_ondemand"] == pytest.approx(rows["ondemand"]["e2e_s"] / lru["e2e_s"])
    hf = case["hf"]
    assert hf["status"] == "ok", hf
    assert "extrapolated" in hf["e2e_note"]
    assert hf["e2e_s"] == pytest.approx(hf["ttft_s"] + 2 * hf["tpot_s"])
    assert lru["speedup_ttft_vs_hf"] == pytest.approx(hf["ttft_s"] / lru["ttft_s"])
    md = tmp_path / "docs" / "benchmarks.md"
    report.main(["--results", str(out), "--out", str(md)])
    text = md.read_text()
    assert "## Targets (issue 8)" in text and "| lru |" in text
    assert "`no-such-policy`: unavailable" in text


def _sample_doc() -> dict:
    row = dict(
        status="ok",
        budget_gib=13.0,
        peak_gib=12.5,
        within_budget=True,
        ttft_s=1.0,
        tpot_s=0.1,
        e2e_s=13.7,
        prefill_s=1.0,
        ttft_bound_ratio=1.1,
        tpot_bound_ratio=1.3,
        e2e_bound_ratio=1.2,
        speedup_e2e_vs_hf=8.0,
        speedup_ttft_vs_hf=5.0,
        slots=100,
        bound={"prefill_bound_s": 0.9, "tpot_bound_s": 0.08, "e2e_bound_s": 11.0},
    )
    rows = [
        {**row, "policy": "duoserve"},
        {**row, "policy": "lru", "peak_gib": 13.5, "within_budget": False},
        {"policy": "trace-match", "status": "unavailable", "reason": "ImportError: x"},
    ]
    case = dict(case="b1-p512", batch=1, prompt_len=512, max_tokens=128, rows=rows, bounds={})
    case["hf"] = dict(status="ok", ttft_s=5.0, tpot_s=0.9, e2e_s=119.3, decode_step_s=[0.9] * 3)
    case["hf"]["e2e_note"] = "extrapolated: TTFT + 127 x TPOT"
    return dict(
        kind="duoserve-bench-suite",
        scenario="S1",
        description="sample",
        env={"gpu": "GPU X", "driver": "1", "torch": "2", "date": "today", "commit": "abc"},
        command="duoserve bench suite --scenario S1",
        model="synthetic:mixtral-8x7b",
        expert_dtype="int4",
        expert_bytes=92_000_000,
        num_experts_total=256,
        budget_gib=13.0,
        budget_rule="15%",
        routing="routing replayed from x",
        link={},
        bandwidth_gbps=50.0,
        bandwidth_source="measured",
        timings={"engine_build_s": 30.0},
        cases=[case],
    )


def test_report_from_sample_json(tmp_path):
    (tmp_path / "suite-S1.json").write_text(json.dumps(_sample_doc()))
    md = tmp_path / "benchmarks.md"
    report.main(["--results", str(tmp_path), "--out", str(md)])
    text = md.read_text()
    lines = text.splitlines()

    def status(target: str) -> str:
        return next(line for line in lines if line.startswith(f"| {target}")).split("|")[-2]

    assert status("E2E vs HF >= 7.55x").strip() == "met"  # 8.0
    assert status("TTFT vs HF >= 5.34x").strip() == "unmet"  # 5.0
    assert status("duoserve TTFT <= 1.25x bound").strip() == "met"  # 1.1
    assert status("duoserve TPOT <= 1.25x bound").strip() == "unmet"  # 1.3
    assert status("peak GPU memory").strip() == "unmet"  # lru at 13.5 > 13.0
    assert "| duoserve | 1.000 | 0.900 | 1.10 |" in text
    assert "GPU X" in text and "`trace-match`: unavailable" in text
    assert (tmp_path / "figures" / "bench_S1_b1-p512.png").is_file()


def test_cli_bench_forwarding(tmp_path, capsys):
    from duoserve.cli import BENCH_PROGRAMS, _run_bench_program, main

    assert {"suite", "report", "prefill", "decode", "serve-sweep"} <= set(BENCH_PROGRAMS)
    assert (
        main(["bench", "report", "--results", str(tmp_path), "--out", str(tmp_path / "b.md")]) == 0
    )
    assert "No results yet" in (tmp_path / "b.md").read_text()
    BENCH_PROGRAMS["missing-one"] = "duoserve.bench.no_such_module"
    try:
        assert _run_bench_program("missing-one", []) == 2
        assert "is not available" in capsys.readouterr().err
    finally:
        del BENCH_PROGRAMS["missing-one"]


@pytest.mark.gpu
def test_hf_offload_baseline_offloads_under_the_budget(tmp_path):
    """accelerate places part of a full-size OLMoE (13.8 GB bf16) on the CPU at a 4 GiB budget."""
    from duoserve.bench.hf_baseline import run_hf_subprocess

    r = run_hf_subprocess("olmoe-1b-7b", "full", 4.0, [(1, 128)], 2, 400, tmp_path / "hf.json")
    assert r["status"] == "ok", r
    assert r["modules_on_cpu"] > 0 and r["modules_on_gpu"] > 0
    case = r["cases"]["1x128"]
    assert case["ttft_s"] > 0 and len(case["decode_step_s"]) == 2
