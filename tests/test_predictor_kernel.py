"""The predictor's one-launch Triton kernel (predictor/_triton_predict.py) and its sparse
lookahead input (TraceReplay.lookahead_topk -> Learned -> FusedPredictor).

Oracles: FusedPredictor's torch path with dense lookahead probabilities (itself checked
against the training features in test_predictor.py), and Predictor.logits on training
features where the lookahead is padded with -1. The kernel runs under the Triton
interpreter in a fresh process (TRITON_INTERPRET must be set before triton is imported),
and on the GPU at the Qwen3-30B-A3B topology, in a CUDA graph too.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from duoserve.engine.context import StepContext, build_step_context, step_context
from duoserve.predictor import runtime
from duoserve.predictor.model import FEATURE_SETS, Predictor, PredictorConfig

from .conftest import run_interpreted

ROOT = Path(__file__).resolve().parent.parent
QWEN3 = ROOT / "duoserve/assets/predictors/qwen3-30b-a3b-topology.safetensors"


def random_predictor(config: PredictorConfig, seed: int) -> Predictor:
    """Random weights and tables everywhere (std 1: logits far apart), so every term counts."""
    gen = torch.Generator().manual_seed(seed)
    predictor = Predictor(config)
    for param in predictor.parameters():
        torch.nn.init.normal_(param, std=1.0, generator=gen)
    L, E = config.num_layers, config.num_experts
    unit = lambda t: t / t.sum(-1, keepdim=True)  # noqa: E731
    tables = {d: unit(torch.rand(L, E, E, generator=gen)) for d in config.distances}
    predictor.set_tables(unit(torch.rand(L, E, generator=gen)), tables)
    return predictor


def random_sets(rows: int, num_experts: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """[rows, k] distinct expert ids per row."""
    return torch.rand(rows, num_experts, generator=gen).argsort(-1)[:, :k]


def sparse_lookahead(rows: int, num_experts: int, width: int, gen: torch.Generator, pad: int = 0):
    """(ids [rows, width], probs [rows, width]): distinct ids, strictly decreasing probs; the
    last `pad` entries of every other row are absent (-1, p = 0)."""
    ids = random_sets(rows, num_experts, width, gen)
    probs = torch.rand(rows, width, generator=gen).sort(-1, descending=True).values * 0.5
    probs = probs + torch.linspace(0.02, 0.0, width)  # strictly decreasing
    if pad:
        none = torch.zeros(rows, width, dtype=torch.bool)
        none[::2, width - pad :] = True
        ids, probs = ids.masked_fill(none, -1), probs.masked_fill(none, 0.0)
    return ids, probs


def dense_of(ids: torch.Tensor, probs: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[rows, E] probabilities: probs at ids, 0 elsewhere (absent ids dropped)."""
    out = torch.zeros(ids.shape[0], num_experts + 1)
    return out.scatter_(1, torch.where(ids >= 0, ids, num_experts), probs)[:, :num_experts]


def assert_same_topk(ref: torch.Tensor, ids: torch.Tensor, tol: float) -> None:
    """ids [B, num] are a top-num of logits within tol of the reference logits [B, E]:
    distinct; the reference logit of the i-th is the reference's i-th largest within 2 tol;
    and they are torch.topk's ids wherever the sorted reference logits are more than 2 tol
    apart (no near-tie that the tolerance could flip)."""
    num = ids.shape[1]
    assert all(len(set(row)) == num for row in ids.tolist()), "ids must be distinct"
    top = ref.topk(min(num + 1, ref.shape[1]), dim=-1)  # the (num+1)-th decides the set
    got = ref.gather(1, ids)
    assert torch.allclose(got, top.values[:, :num], atol=2 * tol, rtol=0), (got, top.values)
    clear = (top.values[:, :-1] - top.values[:, 1:]).min(-1).values > 2 * tol
    assert torch.equal(ids[clear], top.indices[clear, :num]), "ids differ where no near-tie"


# ---------------------------------------------------------------- torch path (CPU)

CONFIGS = {
    "ours-rank": dict(num_layers=5, num_experts=12, top_k=3, lookahead_width=4, hidden=16),
    "linear": dict(num_layers=5, num_experts=10, top_k=2, lookahead_width=3, hidden=0),
    "no-rank": dict(num_layers=5, num_experts=9, top_k=2, lookahead_width=3, lookahead_rank=False),
}


def make_config(name: str, path_layers: int = 3, features=FEATURE_SETS["ours"], **kw):
    base = dict(distances=(1, 2), path_layers=path_layers, features=features, hidden=8)
    return PredictorConfig(**{**base, **CONFIGS[name], **kw})


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sparse_lookahead_equals_dense(name):
    """Recorded top-M' (M' > M, all present) gives the very logits the dense row gives, and
    prev given as a table plus row index gives those of the gathered prev."""
    config = make_config(name)
    fused = random_predictor(config, seed=1).fused("cpu")
    gen = torch.Generator().manual_seed(2)
    E, K, M, B = config.num_experts, config.top_k, config.lookahead_width, 5
    for d in (1, 2):
        for layer in range(config.num_layers - d):
            routed = torch.stack([random_sets(B, E, K, gen) for _ in range(layer + 1)], dim=1)
            ids, probs = sparse_lookahead(B, E, M + 1, gen)
            table = random_sets(7, E, K, gen)  # [S, K] previous experts of 7 KV slots
            rows = torch.randint(0, 7, (B,), generator=gen)
            dense = fused.scores(layer, routed, dense_of(ids, probs, E), d, table[rows])
            sparse = fused.scores(
                layer, routed, None, d, table, lookahead_top=(ids.int(), probs), prev_rows=rows
            )
            assert torch.equal(dense, sparse), (d, layer)
            got = fused.predict(layer, routed, d=d, num=4, lookahead_top=(ids, probs))
            no_prev = fused.scores(layer, routed, dense_of(ids, probs, E), d)
            assert torch.equal(got, no_prev.topk(4, dim=-1).indices), (d, layer)


@pytest.mark.parametrize("name", ["ours-rank", "linear"])
def test_padded_sparse_lookahead_is_the_training_feature(name):
    """Absent (-1) lookahead entries contribute nothing: the sparse path equals Predictor.logits
    on the training features (which drop them too). The dense path instead takes M entries,
    zero-probability ones included: it equals the sparse path fed its own topk."""
    config = make_config(name, path_layers=2)
    predictor = random_predictor(config, seed=3)
    fused = predictor.fused("cpu")
    gen = torch.Generator().manual_seed(4)
    L, E, K, M, B = config.num_layers, config.num_experts, config.top_k, config.lookahead_width, 6
    routed = torch.stack([random_sets(B, E, K, gen) for _ in range(L)], dim=1)  # [B, L, K]
    prev = torch.stack([random_sets(B, E, K, gen) for _ in range(L)], dim=1)
    la = [sparse_lookahead(B, E, M, gen, pad=2) for _ in range(L)]
    la_ids, la_probs = torch.stack([i for i, _ in la], 1), torch.stack([p for _, p in la], 1)
    d = 1
    batch = predictor.logits(d, predictor.features(d, routed, prev, la_ids, la_probs))
    for layer in range(L - d):
        top = (la_ids[:, layer], la_probs[:, layer])
        sparse = fused.scores(
            layer, routed[:, : layer + 1], None, d, prev[:, layer + d], lookahead_top=top
        )
        assert torch.allclose(sparse, batch[:, layer], atol=1e-4), layer
        dense_probs = dense_of(*top, E)
        dense = fused.scores(layer, routed[:, : layer + 1], dense_probs, d)
        picked = dense_probs.topk(M, dim=-1)
        again = fused.scores(
            layer, routed[:, : layer + 1], None, d, lookahead_top=(picked.indices, picked.values)
        )
        assert torch.equal(dense, again), layer


def replay_setup(tmp_path: Path, config: PredictorConfig, num_slots: int = 4):
    """A tiny replay file (recorded top-(M+1) lookahead at d = 1, 2 with distinct quantized
    probabilities), its TraceReplay on fake MoE blocks, and a Learned predictor over them."""
    from duoserve.bench.replay import TraceReplay
    from duoserve.predictor.online import Learned, StepState
    from duoserve.predictor.replay_file import write_replay
    from duoserve.predictor.trace import RoutingTrace

    gen = torch.Generator().manual_seed(5)
    L, E, K, W = config.num_layers, config.num_experts, config.top_k, config.lookahead_width + 1
    N = 40
    ids = torch.full((N, L, 2, W), -1, dtype=torch.int16)
    for d in (1, 2):
        ids[:, : L - d, d - 1] = random_sets(N * (L - d), E, W, gen).view(N, L - d, W).short()
    probs = torch.where(ids >= 0, 0.6 * 0.8 ** torch.arange(W), 0.0).half()  # codes 6 apart
    trace = RoutingTrace(
        expert_ids=random_sets(N * L, E, K, gen).view(N, L, K).short(),
        seq_id=torch.arange(N, dtype=torch.int32) // 20,
        position=torch.arange(N, dtype=torch.int32) % 20,
        is_prefill=torch.zeros(N, dtype=torch.bool),
        step=torch.arange(N, dtype=torch.int32),
        num_experts=E,
        lookahead_ids=ids,
        lookahead_probs=probs,
    )
    path = tmp_path / "replay.safetensors"
    write_replay(trace, path, distances=(1, 2))
    replay = TraceReplay(path, torch.device("cpu"))
    replay.layer_index = {layer: layer for layer in range(L)}
    replay.base_of_slot = torch.tensor(replay.slot_bases(num_slots))
    cfg = SimpleNamespace(
        num_moe_layers=L, num_experts=E, num_experts_per_tok=K, moe_layer_ids=list(range(L))
    )
    blocks = [SimpleNamespace(routing_hook=replay) for _ in range(L)]
    state = StepState(cfg, 16, num_slots, "cpu")
    predictor = random_predictor(config, seed=6)
    learned = Learned(cfg, blocks, state, predictor=predictor, distances=(1, 2), device="cpu")
    return replay, learned


def step_ctx(phase: str, slots: list[int], starts: list[int], lengths: list[int]) -> StepContext:
    return build_step_context(phase, slots, starts, lengths)


def replay_passes(replay, learned, num: int, check) -> int:
    """A prefill pass then a decode pass: every layer routes through the replay, then
    `check(li, d, x, num)` compares the learned predictor's paths; returns the checks made."""
    L, checks = learned.cfg.num_moe_layers, 0
    prefill = step_ctx("prefill", [0, 2], [0, 0], [3, 2])
    decode = step_ctx("decode", [0, 2, 3], [3, 2, 0], [1, 1, 1])  # slot 3: no prefill
    for ctx in (prefill, decode):
        T = ctx.positions_dev.shape[0]
        x = torch.zeros(T, 4)
        with step_context(ctx):
            learned.state.begin(ctx)
            for li in range(L):
                ids, _ = replay(li, x, None, torch.zeros(T, learned.cfg.num_experts_per_tok))
                learned.state.observe(li, ids)
                for d in (1, 2):
                    if li + d < L:
                        check(li, d, x, num)
                        checks += 1
    return checks


def recorded_top(data, replay, li: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The file's top-M for the current step's tokens, rows computed on the host."""
    from duoserve.engine.context import get_step_context

    ctx, N = get_step_context(), data.expert_ids.shape[1]
    bases = replay.base_of_slot.tolist()
    rows = [(bases[s] + p) % N for s, p in zip(ctx.token_slots_dev.tolist(), ctx.positions_dev)]
    j = data.distances.index(d)
    return data.lookahead_ids[li, rows, j], data.lookahead_probs[li, rows, j]


def test_learned_sparse_lookahead_through_trace_replay(tmp_path):
    from duoserve.predictor.replay_file import read_replay

    config = make_config("ours-rank")
    replay, learned = replay_setup(tmp_path, config)
    data, E = read_replay(replay.path), config.num_experts

    def check(li, d, x, num):
        top = replay.lookahead_topk(li, d, x)
        assert top[0].dtype == torch.int32 and top[1].dtype == torch.float32
        want_ids, want_probs = recorded_top(data, replay, li, d)
        assert torch.equal(top[0].long(), want_ids) and torch.equal(top[1], want_probs)
        assert torch.equal(dense_of(top[0].long(), top[1], E), replay.lookahead_probs(li, d, x))
        learned.sparse_lookahead = True
        sparse = learned.predict(li, d, x, num)
        learned.sparse_lookahead = False
        assert torch.equal(sparse, learned.predict(li, d, x, num)), (li, d)

    assert replay_passes(replay, learned, 4, check) == 2 * (2 * 5 - 3)
    x = torch.zeros(2, 4)
    with step_context(step_ctx("decode", [1, 3], [7, 9], [1, 1])):  # not routed: fresh rows
        assert torch.equal(
            replay.lookahead_topk(3, 1, x)[0].long(), recorded_top(data, replay, 3, 1)[0]
        )
        assert replay.lookahead_topk(0, 3, x) is None  # d = 3 not recorded


# ---------------------------------------------------------------- the kernel, interpreted

# (config name, path layers, features, num): hidden 0, no rank, no path (affinity only, or
# neither path nor affinity), no lookahead; num from 1 to E (a full sort)
KERNEL_CASES = [
    ("ours-rank", 3, FEATURE_SETS["ours"], 4),
    ("linear", 3, FEATURE_SETS["ours"], 10),
    ("no-rank", 2, FEATURE_SETS["ours"], 1),
    ("ours-rank", 4, ("affinity", "lookahead"), 5),
    ("linear", 2, ("lookahead", "prev"), 3),
    ("no-rank", 4, FEATURE_SETS["paper"], 2),
]


def _kernel_vs_torch(fused, layer, d, routed, num, **kw) -> None:
    E = fused.config.num_experts
    ref, got = torch.empty(routed.shape[0], E), torch.empty(routed.shape[0], E)
    runtime.BACKEND = "torch"
    fused.predict(layer, routed, d=d, num=num, logits_out=ref, **kw)
    runtime.BACKEND = "triton"
    ids = fused.predict(layer, routed, d=d, num=num, logits_out=got, **kw)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-5), (layer, (got - ref).abs().max())
    assert_same_topk(ref, ids, tol=1e-4)


def check_kernel_cases() -> None:
    """Kernel == torch path: sparse padded and dense lookahead, prev as rows of a table or
    none, strided routing (a [B, L, K] buffer's slice), first layers with fewer than W slots."""
    for i, (name, W, features, num) in enumerate(KERNEL_CASES):
        config = make_config(name, W, features)
        fused = random_predictor(config, seed=10 + i).fused("cpu")
        gen = torch.Generator().manual_seed(20 + i)
        L, E, K, M, B = (
            config.num_layers,
            config.num_experts,
            config.top_k,
            config.lookahead_width,
            3,
        )
        step_ids = torch.stack([random_sets(B, E, K, gen) for _ in range(L)], dim=1)
        table = random_sets(5, E, K, gen)  # previous experts of 5 KV slots
        for layer, d in ((0, 1), (1, 2), (L - 2, 1)):
            lo = max(0, layer + 1 - W)
            routed = step_ids[:, lo : layer + 1]  # a strided view, as Learned passes
            ids, probs = sparse_lookahead(B, E, M + 1, gen, pad=2)
            rows = torch.randint(0, 5, (B,), generator=gen)
            top = (ids.int(), probs)
            _kernel_vs_torch(fused, layer, d, routed, num, lookahead_top=top)
            _kernel_vs_torch(
                fused, layer, d, routed, num, lookahead_top=top, prev_ids=table, prev_rows=rows
            )
            dense = torch.softmax(torch.randn(B, E, generator=gen) * 2, -1)
            _kernel_vs_torch(
                fused, layer, d, routed, num, lookahead_probs=dense, prev_ids=table[rows]
            )


def check_tie_rule() -> None:
    """Equal logits go to the smaller id first; NaN logits still give distinct ids."""
    config = make_config("linear", 2, FEATURE_SETS["paper"])
    fused = random_predictor(config, seed=30).fused("cpu")
    E = config.num_experts
    routed = torch.zeros(2, 2, config.top_k, dtype=torch.long)
    runtime.BACKEND = "triton"
    fused.table.zero_()
    assert fused.predict(1, routed, num=E).tolist() == [list(range(E))] * 2
    fused.table[fused.rows_per_pair - 1, 3:6] = 1.0  # bias row of (layer 0, d 1): 3 tied
    assert fused.predict(0, routed, num=4).tolist() == [[3, 4, 5, 0]] * 2
    fused.table[fused.rows_per_pair - 1, 7] = float("nan")
    ids = fused.predict(0, routed, num=E)
    assert all(sorted(row) == list(range(E)) for row in ids.tolist()) and ids[0, -1] == 7


def check_learned_replay(tmp_path: Path) -> None:
    """The whole runtime path: TraceReplay.lookahead_topk -> Learned -> the kernel gives the
    torch dense path's predictions (prefill and decode passes, d = 1 and 2)."""
    config = make_config("ours-rank")
    replay, learned = replay_setup(tmp_path, config)

    def check(li, d, x, num):
        runtime.BACKEND, learned.sparse_lookahead = "triton", True
        kernel = learned.predict(li, d, x, num)
        runtime.BACKEND, learned.sparse_lookahead = "torch", False
        assert torch.equal(kernel, learned.predict(li, d, x, num)), (li, d)

    assert replay_passes(replay, learned, 5, check) > 0


def run_interpreter_checks(tmp: str) -> None:
    """Every kernel check; needs TRITON_INTERPRET=1 before triton is first imported."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    check_kernel_cases()
    check_tie_rule()
    check_learned_replay(Path(tmp))
    print("interpreter checks passed")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernel_interpreted(tmp_path):
    code = f"import tests.test_predictor_kernel as t; t.run_interpreter_checks({str(tmp_path)!r})"
    proc = run_interpreted(code)
    assert "interpreter checks passed" in proc.stdout


# ---------------------------------------------------------------- GPU, Qwen3 topology


@pytest.mark.gpu
def test_kernel_gpu_qwen3_topology_and_cuda_graph():
    """The shipped Qwen3-30B-A3B predictor (48 layers, E=128, K=8, M=16, H=64, W=4): kernel
    == torch at every layer (fp32 tables: tight; bf16 tables, as decode runs: within the
    torch path's bf16 rounding), then a step's 47 calls captured in one CUDA graph replay
    like eager calls on new inputs, for both backends. Prints device ms per step of each."""
    predictor = Predictor.load(QWEN3)
    c = predictor.config
    L, E, K, M, B, S = c.num_layers, c.num_experts, c.top_k, c.lookahead_width, 8, 10
    gen = torch.Generator().manual_seed(0)
    step_ids = torch.stack([random_sets(B, E, K, gen) for _ in range(L)], dim=1).cuda()
    prev = torch.stack([random_sets(S, E, K, gen) for _ in range(L)], dim=1).cuda()  # [S, L, K]
    slots = torch.randperm(S, generator=gen)[:B].cuda()
    la = [sparse_lookahead(B, E, M, gen) for _ in range(L)]
    la_ids = torch.stack([i for i, _ in la]).int().cuda()  # [L, B, M]
    la_p = torch.stack([p for _, p in la]).cuda()

    def call(fused, li: int, logits_out=None) -> torch.Tensor:
        routed = step_ids[:, max(0, li - 3) : li + 1]  # [B, n, K] as Learned slices it
        top = (la_ids[li], la_p[li])
        return fused.predict(
            li,
            routed,
            None,
            1,
            prev[:, li + 1],
            K,
            lookahead_top=top,
            prev_rows=slots,
            logits_out=logits_out,
        )

    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # the fp32 torch reference without TF32
    try:
        for dtype in (torch.float32, torch.bfloat16):
            fused = predictor.fused("cuda", dtype, distances=(1,))
            for li in range(L - 1):
                ref, got = torch.empty(B, E, device="cuda"), torch.empty(B, E, device="cuda")
                runtime.BACKEND = "torch"
                call(fused, li, ref)
                runtime.BACKEND = "auto"
                ids = call(fused, li, got)
                tol = 1e-3 if dtype == torch.float32 else 2e-2 * float(ref.abs().max())
                assert torch.allclose(got, ref, atol=tol, rtol=0), (dtype, li)
                assert_same_topk(ref.cpu(), ids.cpu(), tol=tol)
        timings = {}
        for backend in ("torch", "auto"):
            runtime.BACKEND = backend
            [call(fused, li) for li in range(L - 1)]  # warm-up: compiles, plans
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outs = [call(fused, li) for li in range(L - 1)]
            step_ids.copy_(step_ids.roll(1, dims=0))  # new inputs in the same buffers
            la_p.mul_(torch.linspace(1.0, 0.5, M, device="cuda"))
            graph.replay()
            for li, out in enumerate(outs):
                assert torch.equal(out, call(fused, li)), (backend, li)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            timings[backend] = round(start.elapsed_time(end) / 20, 3)
        print(f"predictor device ms per step ({L - 1} calls, B={B}, bf16): {timings}")
    finally:
        runtime.BACKEND = "auto"
        torch.set_float32_matmul_precision(precision)
