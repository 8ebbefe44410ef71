"""Shared fixtures: tiny HF checkpoints of every family, built with transformers itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from duoserve.weights.synthetic import byte_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(code: str) -> subprocess.CompletedProcess:
    """Run `python -c code` from the repo root with TRITON_INTERPRET=1 (it must be set before
    triton is first imported, hence a fresh process); asserts it exited 0."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


BASE = dict(
    vocab_size=300,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=256,
    eos_token_id=None,
    pad_token_id=None,
)
# family -> (transformers config class name, model class name, family-specific config)
FAMILIES = {
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2, sliding_window=7),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            intermediate_size=40,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=3,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            intermediate_size=40,
            moe_intermediate_size=16,
            num_experts=10,
            num_experts_per_tok=4,
            norm_topk_prob=True,
            head_dim=12,
            mlp_only_layers=[2],
            decoder_sparse_step=1,
        ),
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(
            intermediate_size=16,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            clip_qkv=0.3,
        ),
    ),
}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give every weight (norms and biases too) a random value, so each one is tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(1.0 + noise if "norm" in name else noise * 2)


def make_hf_checkpoint(family: str, out_dir: Path, seed: int = 0, shard: bool = True, **overrides):
    """Save a random tiny model of `family` with transformers; return (dir, hf_model)."""
    import transformers

    cfg_name, model_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(**{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).eval()
    randomize_(model, seed)
    model.save_pretrained(out_dir, max_shard_size="200KB" if shard else "10GB")
    byte_tokenizer().save(str(out_dir / "tokenizer.json"))
    tok_cfg = {"bos_token": "<s>", "eos_token": "</s>"}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return out_dir, model


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """One tiny checkpoint per family, shared by the tests of a session."""
    root = tmp_path_factory.mktemp("hf")
    return {f: make_hf_checkpoint(f, root / f, seed=i) for i, f in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tests: the CI machine's cores are shared, and tiny
    matmuls only gain contention from more threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_cuda_memory(request):
    """GPU tests: each starts with the memory of earlier tests freed and no per-process cap.

    Engines set a process-wide cap (the budget); a finished test's engine may still hold
    blocks until collected, which would count against the next test's budget.
    """
    if request.node.get_closest_marker("gpu") is not None and torch.cuda.is_available():
        import gc

        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0)
    yield


def budget_for_slots(llm, num_slots: int, scratch_copies: int = 1) -> float:
    """A budget (GiB) whose memory plan leaves exactly `num_slots` expert-sized slots for
    `llm`'s model (cache slots, plus ring slots for pipeline policies), with
    `scratch_copies` int4 dequant scratches (the pipeline holds a second one)."""
    from duoserve.offload.planner import SLACK_BYTES, SLACK_FRACTION, plan_memory

    engine = llm.engine
    probe = plan_memory(
        engine.model_config,
        engine.config.replace(gpu_memory_budget=1.0),
        engine.dtype,
        engine.device,
        "lru",
    )
    fixed = probe.dense_bytes + probe.kv_cache_bytes + probe.activation_bytes
    fixed += scratch_copies * probe.dequant_scratch_bytes + SLACK_BYTES[engine.device.type]
    return (fixed + (num_slots + 0.5) * probe.expert_bytes) / (1 - SLACK_FRACTION) / 2**30


def graphed_and_eager_decode(llm, prompts: list[list[int]]) -> tuple[torch.Tensor, ...]:
    """Prefill `prompts`, then the same decode step graphed, graphed again and eager (the
    runner's graphs set aside): float logits [B, V] of each. The step's K/V rows are
    rewritten with the same values each time."""
    engine, runner = llm.engine, llm.engine.runner
    assert runner.graphs is not None
    slots = [engine.kv.allocate_slot() for _ in prompts]
    runner.forward("prefill", prompts, slots, [0] * len(prompts))
    starts, last = [len(p) for p in prompts], [[p[-1]] for p in prompts]
    graphed = runner.forward("decode", last, slots, starts).float().clone()
    graphed_again = runner.forward("decode", last, slots, starts).float().clone()
    graphs, runner.graphs = runner.graphs, None
    eager = runner.forward("decode", last, slots, starts).float()
    runner.graphs = graphs
    return graphed, graphed_again, eager
