"""Sampling, stopping, batching and chat templates of the engine."""

from __future__ import annotations

import pytest

from duoserve import LLM, SamplingParams
from duoserve.tokenizer import TokenizerError

from .test_parity import PROMPTS


@pytest.fixture(scope="module")
def llm(hf_checkpoints):
    path, _ = hf_checkpoints["qwen3_moe"]
    return LLM(str(path), device="cpu", dtype="float32", max_num_seqs=2, max_num_batched_tokens=8)


def tokens(outs):
    return [o.output_token_ids for o in outs]


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=123, ignore_eos=True)
    alone = tokens(llm.generate(PROMPTS[:1], params))
    batched = tokens(llm.generate(PROMPTS, params))
    assert alone[0] == batched[0]
    other = tokens(llm.generate(PROMPTS[:1], SamplingParams(**{**params.__dict__, "seed": 7})))
    assert other != alone


@pytest.mark.parametrize(
    "params", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0), dict(temperature=1e-5)]
)
def test_degenerate_sampling_equals_greedy(llm, params):
    greedy = tokens(
        llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    )
    sampled = SamplingParams(
        max_tokens=8, seed=1, ignore_eos=True, **{"temperature": 1.0, **params}
    )
    assert tokens(llm.generate(PROMPTS, sampled)) == greedy


def test_chunked_prefill_matches_whole_prompt(hf_checkpoints, llm):
    path, _ = hf_checkpoints["qwen3_moe"]
    whole = LLM(str(path), device="cpu", dtype="float32", max_num_batched_tokens=512)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert tokens(llm.generate(PROMPTS, params)) == tokens(whole.generate(PROMPTS, params))


def test_stop_strings_tokens_and_eos(llm):
    base = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    full = llm.generate(PROMPTS[:1], base)[0]
    assert full.finish_reason == "length" and len(full.output_token_ids) == 12
    stop_text = full.text[2:4]
    if stop_text:
        out = llm.generate(PROMPTS[:1], SamplingParams(**{**base.__dict__, "stop": (stop_text,)}))[
            0
        ]
        assert out.finish_reason == "stop" and out.stop_reason == stop_text
        assert out.text == full.text[: full.text.find(stop_text)]
    third = full.output_token_ids[2]
    out = llm.generate(
        PROMPTS[:1], SamplingParams(**{**base.__dict__, "stop_token_ids": (third,)})
    )[0]
    first_hit = full.output_token_ids.index(third)
    assert out.output_token_ids == full.output_token_ids[: first_hit + 1]
    assert out.finish_reason == "stop" and out.stop_reason == third
    llm.engine.tokenizer.eos_token_ids = (third,)
    try:
        out = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=12))[0]
    finally:
        llm.engine.tokenizer.eos_token_ids = ()
    assert out.finish_reason == "stop" and out.output_token_ids[-1] == third


def test_sampling_params_are_validated():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(max_tokens=0), dict(stop=["x"] * 17)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_chat_template_renders_in_sandbox(llm):
    tok = llm.engine.tokenizer
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<s>[user]hi[assistant]"
    tok.chat_template = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(TokenizerError, match="chat template failed"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    tok.chat_template = None
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_cli_generate_and_synth(tmp_path, capsys):
    from duoserve.cli import main

    assert main(["synth", "--arch", "mixtral-8x7b", "--out", str(tmp_path / "m")]) == 0
    rc = main(
        [
            "generate",
            "--model",
            str(tmp_path / "m"),
            "--prompt",
            "hi",
            "--chat",
            "--max-tokens",
            "3",
            "--device",
            "cpu",
            "--temperature",
            "0.7",
            "--seed",
            "1",
        ]
    )
    assert rc == 0
    assert "3 tokens" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2


def test_static_kv_length_decode_equals_dynamic(hf_checkpoints):
    """What a captured decode graph computes (attention over all cache rows, masked)."""
    import torch

    from duoserve.engine.context import build_step_context, step_context

    path, _ = hf_checkpoints["mixtral"]  # sliding window: the mask must also hold it
    llm = LLM(str(path), device="cpu", dtype="float32", max_model_len=64)
    engine = llm.engine
    slots = [engine.kv.allocate_slot() for _ in PROMPTS]
    engine.runner.forward("prefill", PROMPTS, slots, [0] * len(PROMPTS))
    starts = [len(p) for p in PROMPTS]
    last = [[p[-1]] for p in PROMPTS]
    dynamic = engine.runner.forward("decode", last, slots, starts)
    ctx = build_step_context("decode", slots, starts, [1] * len(PROMPTS), engine.device)
    ctx.static_kv_len = engine.kv.max_len
    with step_context(ctx), torch.inference_mode():
        ids = torch.tensor([t[0] for t in last])
        rows = torch.arange(len(PROMPTS))
        static = engine.model(ids, ctx.positions_dev, engine.kv, rows)
    assert torch.allclose(static, dynamic, atol=1e-5, rtol=0)


def test_kv_scratch_slot_is_never_handed_out(llm):
    kv = llm.engine.kv
    taken = [kv.allocate_slot() for _ in range(kv.num_free_slots)]
    assert kv.scratch_slot not in taken and kv.keys[0].shape[0] == kv.num_slots + 1
    for slot in taken:
        kv.free_slot(slot)
