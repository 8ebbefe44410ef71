"""Exact parity with transformers (the oracle): logits in fp32 and greedy generation."""

from __future__ import annotations

import json

import pytest
import torch

from duoserve import LLM, SamplingParams

from .conftest import FAMILIES

PROMPTS = [[256, 5, 17, 99, 3, 250, 42, 7, 8, 9, 11, 12], [256, 40, 41], [256, 1, 2, 3, 4, 5, 6]]


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(hf_checkpoints, family):
    path, hf_model = hf_checkpoints[family]
    llm = LLM(str(path), device="cpu", dtype="float32")
    ours = llm.logits(PROMPTS)
    for ids, got in zip(PROMPTS, ours):
        want = hf_logits(hf_model, ids)
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= 1e-4 * scale, family


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generation_matches_transformers(hf_checkpoints, family):
    path, hf_model = hf_checkpoints[family]
    llm = LLM(str(path), device="cpu", dtype="float32", max_num_seqs=2)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for ids, out in zip(PROMPTS, outs):
        with torch.no_grad():
            want = hf_model.generate(
                torch.tensor([ids]), max_new_tokens=32, do_sample=False, pad_token_id=0
            )[0, len(ids) :].tolist()
        assert out.output_token_ids == want, family


def test_old_rope_spelling_gives_same_logits(hf_checkpoints, tmp_path):
    """config.json with rope_theta/rope_scaling instead of rope_parameters."""
    import shutil

    path, hf_model = hf_checkpoints["qwen2_moe"]
    copy = tmp_path / "old"
    shutil.copytree(path, copy)
    raw = json.loads((copy / "config.json").read_text())
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params.pop("rope_theta")
    raw["rope_scaling"] = {"type": params["rope_type"], "factor": params["factor"]}
    (copy / "config.json").write_text(json.dumps(raw))
    got = LLM(str(copy), device="cpu", dtype="float32").logits(PROMPTS[:1])[0]
    want = hf_logits(hf_model, PROMPTS[0])
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
