"""Issue 6 offline parts: trace format, tracer, baseline predictors, learned predictor, metrics."""

from __future__ import annotations

import json

import pytest
import torch

from duoserve.config import EngineConfig
from duoserve.predictor.baselines import make_scorer
from duoserve.predictor.cli import main as predictor_main
from duoserve.predictor.evaluate import evaluate_predictors, score_predictor, set_metrics
from duoserve.predictor.features import affinity, popularity
from duoserve.predictor.model import FEATURE_SETS, Predictor, PredictorConfig
from duoserve.predictor.trace import (
    RoutingTrace,
    access_groups,
    load_trace,
    save_trace,
    split_by_sequence,
)
from duoserve.predictor.tracer import RoutingTracer, read_prompts
from duoserve.predictor.train import TokenTensors, train_predictor


def make_trace(expert_ids: torch.Tensor, seq_len: int, num_experts: int, **extra) -> RoutingTrace:
    """A decode-only trace of [N, L, K] ids cut into sequences of seq_len tokens."""
    N = expert_ids.shape[0]
    rows = torch.arange(N, dtype=torch.int32)
    return RoutingTrace(
        expert_ids=expert_ids.to(torch.int16),
        seq_id=rows // seq_len,
        position=rows % seq_len,
        is_prefill=torch.zeros(N, dtype=torch.bool),
        step=rows,
        num_experts=num_experts,
        **extra,
    )


def random_sets(n: int, num_experts: int, top_k: int, gen: torch.Generator) -> torch.Tensor:
    """[n, K] distinct random expert ids per row."""
    return torch.rand(n, num_experts, generator=gen).argsort(-1)[:, :top_k]


def with_lookahead(trace: RoutingTrace, D: int, noise: float, gen: torch.Generator) -> RoutingTrace:
    """Lookahead fields that name the true layer-l+d experts, each replaced w.p. `noise`."""
    N, L, K = trace.expert_ids.shape
    ids = torch.full((N, L, D, K), -1, dtype=torch.int16)
    for d in range(1, D + 1):
        true = trace.expert_ids[:, d:].long()  # [N, L-d, K]
        wrong = torch.randint(0, trace.num_experts, true.shape, generator=gen)
        keep = torch.rand(true.shape, generator=gen) >= noise
        ids[:, : L - d, d - 1] = torch.where(keep, true, wrong).to(torch.int16)
    probs = torch.where(ids >= 0, torch.linspace(0.5, 0.3, K), 0.0).to(torch.float16)
    trace.lookahead_ids, trace.lookahead_probs = ids, probs
    return trace


# ------------------------------------------------------------------ trace format


def test_trace_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(0)
    ids = torch.stack([random_sets(50, 8, 2, gen) for _ in range(5)], dim=1)  # [50, 5, 2]
    trace = with_lookahead(make_trace(ids, 10, 8), 3, 0.2, gen)
    trace.weights = torch.rand(50, 5, 2).half()
    trace.is_prefill[:7] = True
    trace.meta = {"model": "test", "topology": {"moe_layer_ids": [0, 1, 2, 3, 4]}}
    out = save_trace(trace, tmp_path / "t", chunk_tokens=16)
    meta = json.loads((out / "meta.json").read_text())
    assert len(meta["chunks"]) == 4 and meta["num_prefill_tokens"] == 7
    back = load_trace(out)
    for name in ("expert_ids", "seq_id", "position", "is_prefill", "step", "weights"):
        assert torch.equal(getattr(back, name), getattr(trace, name)), name
    assert torch.equal(back.lookahead_ids, trace.lookahead_ids)
    assert torch.equal(back.lookahead_probs, trace.lookahead_probs)
    assert back.num_experts == 8 and back.meta["model"] == "test"
    assert back.expert_ids.dtype == torch.int16 and back.weights.dtype == torch.float16
    assert load_trace(out / "chunk-00001.safetensors").num_tokens == 50  # a chunk names its folder


def test_training_routing_trace_loads(tmp_path):
    from safetensors.torch import save_file

    ids = torch.randint(0, 8, (4, 12, 2), dtype=torch.uint8)  # [L, N, K]
    save_file(
        {"expert_ids": ids, "token_ids": torch.arange(12, dtype=torch.int32)},
        str(tmp_path / "routing_trace.safetensors"),
        metadata={"seq_len": "5"},
    )
    (tmp_path / "eval.json").write_text(json.dumps({"routing": {"num_experts": 8}}))
    trace = load_trace(tmp_path / "routing_trace.safetensors")
    assert trace.expert_ids.shape == (12, 4, 2) and trace.num_experts == 8
    assert torch.equal(trace.expert_ids[3, 2], ids[2, 3].to(torch.int16))
    assert trace.seq_id.tolist() == [0] * 5 + [1] * 5 + [2] * 2
    assert trace.position.tolist()[5:8] == [0, 1, 2] and trace.lookahead_ids is None
    rows = evaluate_predictors(trace, trace, names=("prev-token", "ours"), distances=(1,))
    assert rows[1] == {"predictor": "ours", "skipped": "the traces have no lookahead fields"}


def test_access_groups_by_step_and_token():
    ids = torch.tensor([[[0, 1], [2, 3]], [[1, 4], [3, 5]], [[0, 1], [2, 3]]])  # [3, 2, 2]
    trace = make_trace(ids, 3, 6)
    trace.step = torch.tensor([0, 0, 1], dtype=torch.int32)  # two tokens share step 0
    assert access_groups(trace) == [(0, (0, 1, 4)), (1, (2, 3, 5)), (0, (0, 1)), (1, (2, 3))]
    assert access_groups(trace, by="token")[2:4] == [(0, (1, 4)), (1, (3, 5))]


# ------------------------------------------------------------------ tracer


@pytest.fixture(scope="module")
def engine():
    from duoserve.engine.llm_engine import LLMEngine

    return LLMEngine("synthetic:mixtral-8x7b:tiny", EngineConfig(device="cpu", max_model_len=128))


def test_tracer_records_what_the_model_routed(engine):
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    blocks = engine.model.moe_blocks()

    slots: list[int] = []

    def run(hooked: bool) -> torch.Tensor:
        slots[:] = [engine.kv.allocate_slot() for _ in prompts]
        try:
            return engine.runner.forward("prefill", prompts, slots, [0, 0], all_logits=True)
        finally:
            for slot in slots:
                engine.kv.free_slot(slot)

    plain_logits = run(False)
    with RoutingTracer(engine.model, lookahead=2, seq_id_of_slot=lambda s: 100 + s) as tracer:
        traced_logits = run(True)
    traced_slots = list(slots)
    rows = tracer.drain()
    assert torch.equal(plain_logits, traced_logits), "the tracer changed the outputs"
    seen: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def oracle(layer_id, x, topk_ids, topk_weights):
        seen[layer_id] = (x.clone(), topk_ids.clone(), topk_weights.clone())
        return topk_ids, topk_weights

    for block in blocks:
        block.routing_hook = oracle
    try:
        run(True)
    finally:
        for block in blocks:
            block.routing_hook = None
    assert rows["expert_ids"].shape == (8, len(blocks), 2)
    assert rows["position"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert rows["seq_id"].tolist() == [100 + traced_slots[0]] * 5 + [100 + traced_slots[1]] * 3
    assert rows["is_prefill"].all() and rows["step"].tolist() == [0] * 8
    for index, block in enumerate(blocks):
        x, ids, weights = seen[block.layer_id]
        assert torch.equal(rows["expert_ids"][:, index].long(), ids)
        assert torch.equal(rows["weights"][:, index], weights.half())
        if index + 1 < len(blocks):  # lookahead d=1: the next router on this layer's input
            probs = torch.softmax(blocks[index + 1].router(x).float(), -1)
            top = probs.topk(tracer.lookahead_width, dim=-1).indices
            assert torch.equal(rows["lookahead_ids"][:, index, 0].long(), top)
    assert (rows["lookahead_ids"][:, -1] == -1).all()


def test_trace_cli_end_to_end(engine, tmp_path, monkeypatch):
    from duoserve.predictor.tracer import trace_prompts

    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text('{"prompt": "hello there"}\n\n{"text": "general kenobi"}\n')
    prompts = read_prompts(prompts_file)
    assert prompts == ["hello there", "general kenobi"]
    out = trace_prompts(engine, prompts, tmp_path / "trace", max_tokens=4, chunk_tokens=8)
    trace = load_trace(out)
    lengths = [len(engine.tokenizer.encode(p)) for p in prompts]
    assert int(trace.is_prefill.sum()) == sum(lengths)
    for seq, n in enumerate(lengths):
        mine = trace.select(trace.seq_id == seq)
        num_decode = int((~mine.is_prefill).sum())
        assert 1 <= num_decode <= 3  # the last sampled token is never forwarded
        assert sorted(mine.position.tolist()) == list(range(n + num_decode))
    assert all(b.routing_hook is None for b in engine.model.moe_blocks())


# ------------------------------------------------------------------ baselines


def scorer_metrics(name: str, train: RoutingTrace, test: RoutingTrace, d: int = 1):
    scorer = make_scorer(name)
    scorer.fit(train)
    return score_predictor(scorer, TokenTensors.of(test), [d], budget=2)[d]


def test_popularity_exact_when_routing_never_changes():
    ids = torch.tensor([3, 5]).expand(40, 4, 2)
    m = scorer_metrics("popularity", make_trace(ids, 10, 8), make_trace(ids, 10, 8))
    assert m["exact"] == 1.0 and m["precision_b"] == 1.0


def test_prev_token_exact_on_repeating_routing():
    gen = torch.Generator().manual_seed(1)
    per_seq = torch.stack([random_sets(8, 8, 2, gen) for _ in range(4)], dim=1)  # [8 seqs, L, K]
    ids = per_seq.repeat_interleave(10, dim=0)  # every token of a sequence routes alike
    trace = make_trace(ids, 10, 8)
    scorer = make_scorer("prev-token")
    scorer.fit(trace)
    data = TokenTensors.of(trace)
    has_prev = data.prev_ids[:, 0, 0] >= 0
    assert int(has_prev.sum()) == 72  # all but the first token of each sequence
    m = set_metrics(scorer.scores(data, slice(None), 1)[has_prev], data.routed_ids[has_prev, 1:], 2)
    assert m["exact"] == m["count"]


def chain_trace(n: int, gen: torch.Generator, L: int = 6, E: int = 8) -> RoutingTrace:
    """Layer l+1 routes exactly {e + 1 mod E : e routed at l}; layer 0 is random."""
    first = random_sets(n, E, 2, gen)
    ids = torch.stack([(first + layer) % E for layer in range(L)], dim=1)
    return make_trace(ids, 20, E)


def test_affinity_exact_on_a_deterministic_layer_map():
    gen = torch.Generator().manual_seed(2)
    train, test = chain_trace(400, gen), chain_trace(100, gen)
    for d in (1, 3):
        assert scorer_metrics("affinity", train, test, d)["exact"] == 1.0
    assert scorer_metrics("popularity", train, test)["exact"] < 0.2


def test_gate_lookahead_scores_the_recorded_signal():
    gen = torch.Generator().manual_seed(3)
    train = with_lookahead(chain_trace(100, gen), 2, 0.0, gen)
    assert scorer_metrics("gate-lookahead", train, train, 2)["exact"] == 1.0


def test_trace_match_finds_the_request_kind():
    # Two request kinds, each routing one fixed set everywhere; held-out requests are new
    # instances of both kinds. After a token's first layer the kind is known.
    kind_sets = torch.tensor([[0, 1], [6, 7]])
    kinds = torch.tensor([0, 1, 0, 1, 1, 0])
    ids = kind_sets[kinds].repeat_interleave(5, dim=0)[:, None].expand(-1, 4, -1)
    trace = make_trace(ids, 5, 8)
    train, test = trace.select(trace.seq_id < 4), trace.select(trace.seq_id >= 4)
    assert scorer_metrics("trace-match", train, test)["exact"] == 1.0


# ------------------------------------------------------------------ learned predictor


def sum_trace(n: int, gen: torch.Generator, L: int = 6, E: int = 8) -> RoutingTrace:
    """Layer l routes {(a + b) mod E, (a + b + 3) mod E}, a and b the first experts of the
    two layers before: learnable from the path, invisible to popularity and to one layer."""
    first = torch.randint(0, E, (n, 2), generator=gen)
    lead = [first[:, 0], first[:, 1]]
    for _ in range(2, L):
        lead.append((lead[-1] + lead[-2]) % E)
    lead_t = torch.stack(lead, dim=1)  # [n, L]
    ids = torch.stack([lead_t, (lead_t + 3) % E], dim=-1)
    return make_trace(ids, 50, E)


def test_learned_predictor_beats_popularity_and_matches_runtime_api(tmp_path):
    gen = torch.Generator().manual_seed(4)
    train, test = sum_trace(3000, gen), sum_trace(500, gen)
    config = PredictorConfig(6, 8, 2, distances=(1,), features=FEATURE_SETS["paper"], path_layers=2)
    predictor = train_predictor(train, config, epochs=15, lr=1e-2, log=lambda s: None)
    rows = evaluate_predictors(
        train,
        test,
        names=("popularity", "affinity", "paper"),
        distances=(1,),
        predictors={"paper": predictor},
    )
    exact = {r["predictor"]: r["exact"] for r in rows}
    # layer 1 is random given layer 0, so 4 of the 5 source layers are predictable: <= 0.8
    assert exact["paper"] > 0.75 and exact["popularity"] < 0.2 and exact["affinity"] < 0.5

    # the runtime call (one layer, tensors of the decode step) ranks like the batch path
    path = predictor.save(tmp_path / "p.safetensors")
    loaded = Predictor.load(path)
    data = TokenTensors.of(test)
    batch = loaded.logits(1, data.inputs(loaded, 1, slice(0, 64)))  # [64, L, E]
    for layer in (0, 3):
        runtime = loaded.scores(layer, data.routed_ids[:64, : layer + 1], d=1)
        assert torch.allclose(runtime, batch[:, layer], atol=1e-5)
        assert loaded.predict(layer, data.routed_ids[:64, : layer + 1]).shape == (64, 2)


@pytest.mark.parametrize("hidden", [16, 0])
@pytest.mark.parametrize("features", ["ours", "paper"])
def test_runtime_predictor_matches_training_features(hidden, features):
    gen = torch.Generator().manual_seed(5)
    trace = with_lookahead(chain_trace(200, gen), 2, 0.0, gen)  # noise could repeat an id
    config = PredictorConfig(
        6,
        8,
        2,
        distances=(1, 2),
        lookahead_width=2,
        hidden=hidden,
        path_layers=3,
        features=FEATURE_SETS[features],
    )
    predictor = Predictor(config)
    for param in predictor.parameters():  # random weights everywhere, so every term is tested
        torch.nn.init.normal_(param, std=0.5, generator=gen)
    predictor.set_tables(popularity(trace), {d: affinity(trace, d) for d in (1, 2)})
    data = TokenTensors.of(trace)
    rows = slice(0, 30)
    for d in (1, 2):
        batch = predictor.logits(d, data.inputs(predictor, d, rows))
        for layer in range(6 - d):
            check_runtime_row(predictor, data, rows, d, layer, batch)


def check_runtime_row(predictor, data, rows, d: int, layer: int, batch: torch.Tensor) -> None:
    """Predictor.scores on the decode-step inputs equals the batch logits of that layer."""
    la_ids = data.lookahead_ids[rows, layer, d - 1]  # the runtime sees all E probabilities
    probs = torch.full((30, 8), 0.01).scatter_(1, la_ids, data.lookahead_probs[rows, layer, d - 1])
    routed = data.routed_ids[rows, : layer + 1]
    prev = data.prev_ids[rows, layer + d]  # [30, K], -1 for a sequence's first token
    has_prev = prev[:, 0] >= 0
    for pick, prev_ids in ((has_prev, prev[has_prev]), (~has_prev, None)):
        runtime = predictor.scores(layer, routed[pick], probs[pick], d, prev_ids)
        assert torch.allclose(runtime, batch[pick, layer], atol=1e-4), (layer, d)


def test_ours_beats_popularity_with_a_noisy_lookahead():
    gen = torch.Generator().manual_seed(6)
    trace = with_lookahead(sum_trace(2000, gen), 2, 0.4, gen)
    train, test = split_by_sequence(trace, 0.25)
    kw = {"epochs": 6, "lr": 1e-2, "log": lambda s: None, "max_distance": 2}
    rows = evaluate_predictors(
        train, test, names=("popularity", "gate-lookahead", "ours"), distances=(1, 2), train_kw=kw
    )
    exact = {(r["predictor"], r["d"]): r["exact"] for r in rows}
    for d in (1, 2):
        assert exact[("ours", d)] > exact[("gate-lookahead", d)] > exact[("popularity", d)]


def flat_router_trace(n: int, gen: torch.Generator, noise: float) -> RoutingTrace:
    """E = 32, K = 8 routing with a 16-wide lookahead that ranks layer l+1's experts first
    (its 8th and 9th swapped w.p. `noise`) but with nearly flat probabilities, like the
    routers of an E = 128, K = 8 model: only the rank says where the routed set ends."""
    L, E, K, M = 4, 32, 8, 16
    ranking = torch.rand(n, L, E, generator=gen).argsort(-1)  # [n, L, E] each layer's order
    ids = torch.full((n, L, 1, M), -1, dtype=torch.int16)
    look = ranking[:, 1:, :M].clone()  # [n, L-1, M] layer l+1's ranking, seen from layer l
    swap = torch.rand(n, L - 1, generator=gen) < noise
    look[swap, K - 1], look[swap, K] = ranking[:, 1:, K][swap], ranking[:, 1:, K - 1][swap]
    ids[:, : L - 1, 0] = look.to(torch.int16)
    probs = torch.where(ids >= 0, torch.linspace(0.040, 0.036, M), 0.0).to(torch.float16)
    trace = make_trace(ranking[..., :K], 50, E)
    trace.lookahead_ids, trace.lookahead_probs = ids, probs
    return trace


def test_ours_keeps_the_lookahead_ranking_when_router_probabilities_are_flat():
    gen = torch.Generator().manual_seed(12)
    train, test = flat_router_trace(1500, gen, 0.2), flat_router_trace(300, gen, 0.2)
    kw = {"epochs": 2, "log": lambda s: None, "max_distance": 1, "lookahead_width": 16}
    rows = evaluate_predictors(
        train, test, names=("gate-lookahead", "ours"), distances=(1,), train_kw=kw
    )
    gate, ours = ({m: r[m] for m in ("exact", "recall_k")} for r in rows)
    assert 0.7 < gate["exact"] < 0.9, gate  # the swapped rows are the misses
    assert ours["exact"] >= gate["exact"] - 0.01 and ours["recall_k"] >= gate["recall_k"] - 0.01


# ------------------------------------------------------------------ metrics and CLI


def test_metrics_on_hand_worked_examples():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0]]).expand(3, 4)  # ranking 0, 1, 2, 3
    targets = torch.tensor([[1, 0], [0, 3], [2, 3]])
    m = set_metrics(scores, targets, budget=3)
    assert m == {
        "count": 3.0,
        "exact": 1.0,  # row 0
        "half": 2.0,  # rows 0 and 1 (>= 1 of 2 right)
        "recall_k": 1.5,  # 2/2 + 1/2 + 0/2
        "recall_b": 2.0,  # top-3 = {0, 1, 2}: 2/2 + 1/2 + 1/2
        "precision_b": pytest.approx(4 / 3),  # 2/3 + 1/3 + 1/3
    }


def test_train_and_eval_commands(tmp_path):
    gen = torch.Generator().manual_seed(7)
    trace = with_lookahead(chain_trace(300, gen), 2, 0.2, gen)
    save_trace(trace, tmp_path / "trace")
    out = tmp_path / "pred.safetensors"
    common = ["--lookahead", "2", "--epochs", "2", "--hidden", "8", "--device", "cpu"]
    assert (
        predictor_main(["train-predictor", str(tmp_path / "trace"), "--out", str(out), *common])
        == 0
    )
    assert Predictor.load(out).config.distances == (1, 2)
    files = ["--json", str(tmp_path / "rows.json"), "--plot", str(tmp_path / "p.png")]
    args = ["eval-predictor", "--train", str(tmp_path / "trace"), "--load", f"ours={out}"]
    assert predictor_main([*args, *files, *common]) == 0
    record = json.loads((tmp_path / "rows.json").read_text())
    assert {r["predictor"] for r in record["rows"]} >= {"ours", "trace-match", "popularity"}
    assert (tmp_path / "p.png").stat().st_size > 1000
    # docs tables regenerate from the JSON (duoserve.predictor.report)
    from duoserve.predictor.report import main as report_main

    assert report_main([str(tmp_path / "rows.json"), "--out", str(tmp_path / "t.md")]) == 0
    text = (tmp_path / "t.md").read_text()
    ours = next(r for r in record["rows"] if r["predictor"] == "ours" and r["d"] == 2)
    line = next(x for x in text.splitlines() if x.startswith("| **ours** | 2 |"))
    assert line.split(" | ")[2].strip("*") == f"{100 * ours['exact']:.1f}"
    assert "d = 1 on every set" in text and "| prev-token | 1 |" in text


# ------------------------------------------------------------------ device, time limit, export


def test_max_minutes_stops_after_the_first_epoch_and_keeps_the_best():
    gen = torch.Generator().manual_seed(8)
    trace = sum_trace(600, gen)
    config = PredictorConfig(6, 8, 2, distances=(1,), features=FEATURE_SETS["paper"], hidden=8)
    quiet = {"log": lambda s: None, "lr": 1e-2}
    stopped = train_predictor(trace, config, epochs=5, max_minutes=0.0, device="cpu", **quiet)
    assert stopped.training_record["epochs_run"] == 1 and stopped.training_record["best_epoch"] == 1
    full = train_predictor(trace, config, epochs=1, **quiet)  # the same first epoch
    for key, value in full.state_dict().items():
        assert torch.equal(value, stopped.state_dict()[key]), key


def test_export_keeps_distances_and_fits_a_byte_limit(tmp_path):
    from duoserve.predictor.export import export_predictor, keep_distances

    gen = torch.Generator().manual_seed(9)
    trace = with_lookahead(chain_trace(200, gen), 3, 0.2, gen)
    config = PredictorConfig(6, 8, 2, distances=(1, 2, 3), lookahead_width=2, hidden=8)
    predictor = Predictor(config)
    predictor.set_tables(popularity(trace), {d: affinity(trace, d) for d in (1, 2, 3)})
    src = predictor.save(tmp_path / "p.safetensors")
    one = keep_distances(Predictor.load(src), (1,))
    data = TokenTensors.of(trace)
    for d, p in ((1, one),):
        want = Predictor.load(src).logits(d, data.inputs(p, d, slice(0, 20)))
        assert torch.equal(p.logits(d, data.inputs(p, d, slice(0, 20))), want)
    full = export_predictor(src, tmp_path / "all.safetensors", None, None)
    assert full["distances"] == [1, 2, 3]
    limit = full["bytes"] - 1  # one byte short: drops d=3 (and d=2 if needed)
    trimmed = export_predictor(src, tmp_path / "t.safetensors", None, limit)
    assert trimmed["bytes"] <= limit and trimmed["distances"] in ([1, 2], [1])
    assert Predictor.load(tmp_path / "t.safetensors").config.distances == tuple(
        trimmed["distances"]
    )


def test_eval_runs_on_a_replay_file(tmp_path):
    from duoserve.predictor.replay_file import write_replay

    gen = torch.Generator().manual_seed(10)
    trace = with_lookahead(chain_trace(200, gen), 2, 0.0, gen)
    write_replay(trace, tmp_path / "r.safetensors", distances=(1,))
    back = load_trace(tmp_path / "r.safetensors")
    rows = evaluate_predictors(trace, back, names=("gate-lookahead",), distances=(1, 2))
    assert [r["d"] for r in rows] == [1] and rows[0]["exact"] == 1.0


@pytest.mark.gpu
def test_training_on_the_gpu_matches_the_cpu():
    gen = torch.Generator().manual_seed(11)
    trace = with_lookahead(sum_trace(1500, gen), 2, 0.3, gen)
    config = PredictorConfig(6, 8, 2, distances=(1, 2), lookahead_width=2, hidden=16)
    kw = {"epochs": 3, "log": lambda s: None}
    cpu = train_predictor(trace, config, device="cpu", **kw)
    gpu = train_predictor(trace, config, device="cuda", **kw)
    assert gpu.popularity.is_cuda
    a, b = cpu.training_record["valid_loss"], gpu.training_record["valid_loss"]
    assert abs(a - b) < 0.02 * a, (a, b)
    rows = evaluate_predictors(
        trace,
        trace,
        names=("ours", "trace-match"),
        distances=(1,),
        predictors={"ours": gpu},
        device="cuda",
    )
    assert rows[0]["exact"] > 0.5
