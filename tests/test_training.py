"""Training side of issue 4: tiny models learn, export loads in transformers, resume works."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from duoserve.training.checkpoint import load_hf_checkpoint, save_hf_checkpoint
from duoserve.training.corpus import chat_examples, clean_rst, is_heldout
from duoserve.training.evaluate import heldout_loss, routing_statistics
from duoserve.training.model import MoeConfig, MoeForCausalLM, grouped_mm_works
from duoserve.training.presets import PRESETS, TrainConfig
from duoserve.training.tokenizer import CHAT_TEMPLATE, encode_documents, train_tokenizer
from duoserve.training.train import train_model

TEXT = (
    "A list is a mutable sequence of objects. Lists may be constructed in several ways. "
    "A tuple is an immutable sequence. A dictionary maps keys to values, and its keys "
    "must be hashable. The for statement iterates over the items of any sequence. "
    "Functions are defined with the def keyword and return a value with return. "
)
DOCS = [TEXT * 4, TEXT[::-1] * 2, "Strings are immutable sequences of Unicode code points. " * 8]


def tiny_config(family: str, vocab_size: int) -> MoeConfig:
    return MoeConfig(
        family=family,
        vocab_size=vocab_size,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        num_experts=8,
        top_k=2 if family == "mixtral" else 3,
        expert_intermediate_size=16,
        norm_topk_prob=family == "mixtral",
        max_position_embeddings=128,
    )


TINY_TRAIN = TrainConfig(
    batch_size=8,
    seq_len=32,
    peak_lr=1e-2,
    warmup_steps=3,
    max_minutes=0,
    max_epochs=0,
    max_steps=40,
    log_every_steps=10,
    eval_every_steps=20,
    heldout_eval_seqs=2,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(DOCS, vocab_size=300)


@pytest.fixture(scope="module")
def token_ids(tokenizer):
    return torch.from_numpy(encode_documents(tokenizer, DOCS).astype("int64"))


def new_model(family: str, vocab_size: int, std: float = 0.02) -> MoeForCausalLM:
    model = MoeForCausalLM(tiny_config(family, vocab_size))
    model.init_weights(std=std, seed=1)
    return model


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_tiny_training_reduces_loss(family, tokenizer, token_ids, tmp_path):
    model = new_model(family, tokenizer.get_vocab_size())
    if family == "qwen3_moe" and grouped_mm_works(torch.device("cpu")):
        model.set_expert_backend("grouped")  # the GPU path, backward included
    log = train_model(model, TINY_TRAIN, token_ids, token_ids, tmp_path, save_state=False)
    losses = [r["train_loss"] for r in log["records"] if "train_loss" in r]
    assert log["step"] == TINY_TRAIN.max_steps
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(0.9 < r["aux_loss"] < 2.0 for r in log["records"] if "aux_loss" in r)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_checkpoint_loads_in_transformers_with_same_logits(family, tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = new_model(family, tokenizer.get_vocab_size(), std=0.2).eval()  # spread routing
    shard_bytes = 50_000 if family == "qwen3_moe" else 1 << 30  # one sharded, one not
    save_hf_checkpoint(model, tokenizer, tmp_path, dtype=torch.float32, max_shard_bytes=shard_bytes)
    assert (tmp_path / "model.safetensors.index.json").exists() == (family == "qwen3_moe")
    ids = torch.randint(
        0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        ours = model(ids).logits
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        theirs = hf.eval()(ids).logits
    assert (theirs - ours).abs().max() <= 1e-4 * ours.abs().max()
    reloaded = load_hf_checkpoint(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, ours)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    prompt = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|user|>\nhi<|endoftext|>\n<|assistant|>\n"
    config = json.loads((tmp_path / "config.json").read_text())
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"] == hf_tokenizer.eos_token_id


def test_grouped_experts_match_loop(tokenizer):
    if not grouped_mm_works(torch.device("cpu")):
        pytest.skip("torch._grouped_mm not usable on this CPU build")
    model = new_model("qwen3_moe", tokenizer.get_vocab_size(), std=0.2).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (3, 20))
    with torch.no_grad():
        loop = model(ids).logits
        model.set_expert_backend("grouped")
        grouped = model(ids).logits
    torch.testing.assert_close(grouped, loop, atol=1e-5, rtol=1e-5)


def test_keep_best_restores_the_best_validated_weights(tokenizer, token_ids, tmp_path):
    tc = TrainConfig(**{**TINY_TRAIN.__dict__, "max_steps": 20, "eval_every_steps": 5})
    tc = TrainConfig(**{**tc.__dict__, "keep_best": True, "heldout_eval_seqs": 4})
    model = new_model("mixtral", tokenizer.get_vocab_size())
    log = train_model(model, tc, token_ids, token_ids[:400], tmp_path, save_state=False)
    losses = [r["heldout_loss"] for r in log["records"] if "heldout_loss" in r]
    assert log["best"]["heldout_loss"] <= min(losses) + 1e-6
    assert heldout_loss(model, token_ids[:400], 32, 16, 4) == pytest.approx(
        log["best"]["heldout_loss"], rel=1e-5
    )


def test_resume_continues_from_saved_step(tokenizer, token_ids, tmp_path):
    vocab = tokenizer.get_vocab_size()
    tc = TrainConfig(**{**TINY_TRAIN.__dict__, "max_steps": 8})
    straight = new_model("mixtral", vocab)
    train_model(straight, tc, token_ids, token_ids, tmp_path / "a", save_state=False)
    (tmp_path / "b").mkdir()
    first = new_model("mixtral", vocab)
    log = train_model(first, tc, token_ids, token_ids, tmp_path / "b", steps_this_run=3)
    assert (
        log["step"] == 3 and json.loads((tmp_path / "b/train_state.json").read_text())["step"] == 3
    )
    resumed = new_model("mixtral", vocab, std=0.5)  # different init: must be overwritten
    log = train_model(resumed, tc, token_ids, token_ids, tmp_path / "b")
    assert log["step"] == 8
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_rst_cleaning_and_split():
    source = """:mod:`json` --- JSON encoder
============================

.. module:: json
   :synopsis: Encode and decode JSON.

.. index:: single: JSON

This module exposes an API like :func:`~json.dumps` (see :pep:`8`), and ``loads``.

.. function:: dumps(obj)

   Serialize *obj* to a string::

      dumps([1, 2])

   .. versionadded:: 3.1

Details
-------

The :class:`JSONEncoder <json.JSONEncoder>` class is extensible by **subclassing** it in
many ways and forms.

.. note::
   Keys are strings.
"""
    text, sections = clean_rst(source)
    assert text.startswith(
        "json — JSON encoder\n\nThis module exposes an API like dumps (see PEP 8)"
    )
    assert "dumps(obj)\n\nSerialize obj to a string:\n\n   dumps([1, 2])" in text
    assert "New in version 3.1." in text and "Note: Keys are strings." in text
    assert "index" not in text and "synopsis" not in text and "===" not in text
    assert [title for title, _ in sections] == ["json — JSON encoder", "Details"]
    examples = chat_examples("library/json", sections * 4)
    assert examples and all(e.startswith("<|user|>\n") for e in examples)
    assert "<|endoftext|>\n<|assistant|>\n" in examples[0]
    assert "<|assistant|>" in CHAT_TEMPLATE
    assert is_heldout("library/re", 3.0) == is_heldout("library/re", 3.0)
    heldout = [is_heldout(f"doc{i}", 3.0) for i in range(2000)]
    assert 0.015 < sum(heldout) / len(heldout) < 0.05


def test_routing_statistics_against_uniform():
    num_layers, num_tokens, top_k, num_experts = 3, 4096, 2, 8
    gen = torch.Generator().manual_seed(0)
    random_ids = torch.stack(
        [torch.rand(num_tokens, num_experts, generator=gen).topk(top_k).indices for _ in range(3)]
    )
    stats = routing_statistics(random_ids, random_ids[1:], num_experts, seq_len=64)
    assert abs(stats["mean"]["load_entropy"] - math.log(num_experts)) < 0.01
    assert abs(stats["mean"]["consecutive_overlap"] - top_k * top_k / num_experts) < 0.05
    cooc = stats["mean"]["next_layer_cooccurrence"]["hit_fraction"]
    assert abs(cooc - top_k / num_experts) < 0.05
    assert stats["mean"]["next_layer_gate_lookahead"]["exact_rate"] == 1.0  # it is the truth
    fixed = torch.tensor([0, 1]).expand(num_layers, num_tokens, top_k)
    stats = routing_statistics(fixed, fixed[1:], num_experts, seq_len=64)
    assert stats["mean"]["load_entropy"] == pytest.approx(math.log(2), abs=1e-5)
    assert stats["mean"]["consecutive_overlap"] == top_k


def test_presets_fit_their_promises():
    default, _ = PRESETS["default"]
    assert default.num_params * 2 <= 14_000_000  # bf16 safetensors of the shipped model
    mixtral, _ = PRESETS["mixtral-8x7b-topology"]
    qwen3, _ = PRESETS["qwen3-30b-a3b-topology"]
    assert (mixtral.num_layers, mixtral.num_experts, mixtral.top_k) == (32, 8, 2)
    assert (qwen3.num_layers, qwen3.num_experts, qwen3.top_k) == (48, 128, 8)
    assert qwen3.norm_topk_prob and qwen3.family == "qwen3_moe"
    model = MoeForCausalLM(PRESETS["tiny-qwen3"][0])
    assert sum(p.numel() for p in model.parameters()) == PRESETS["tiny-qwen3"][0].num_params


def test_saved_model_path_is_independent(tmp_path: Path, tokenizer):
    model = new_model("mixtral", tokenizer.get_vocab_size())
    num_bytes = save_hf_checkpoint(model, tokenizer, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == num_bytes == model.cfg.num_params * 2
    assert len(set(index["weight_map"].values())) > 1
    torch.testing.assert_close(
        load_hf_checkpoint(tmp_path).lm_head.weight, model.lm_head.weight.bfloat16().float()
    )
