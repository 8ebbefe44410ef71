"""Held-out perplexity through duoserve (quant/perplexity.py) against the training model.

Oracles: the training code's own model and evaluator (training/evaluate.py:heldout_loss on a
checkpoint loaded by training/checkpoint.py), with the experts fake-quantized in torch
(quantize, then dequantize to bf16 as the int4 reference path does) for int4. A tiny model and
a tiny corpus built here; no shipped files needed.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

from duoserve.quant import loading
from duoserve.quant.int4 import dequantize_int4, quantize_int4
from duoserve.quant.perplexity import heldout_windows, main, measure, read_tokens
from duoserve.training.checkpoint import load_hf_checkpoint, save_hf_checkpoint
from duoserve.training.evaluate import heldout_loss
from duoserve.training.model import MoeConfig, MoeForCausalLM
from duoserve.training.tokenizer import encode_documents, train_tokenizer
from duoserve.training.train import split_heldout

TEXT = (
    "A list is a mutable sequence of objects. Lists may be constructed in several ways. "
    "A tuple is an immutable sequence. A dictionary maps keys to values, and its keys "
    "must be hashable. The for statement iterates over the items of any sequence. "
)
DOCS = [TEXT * 3, "Strings are immutable sequences of Unicode code points. " * 6, TEXT[::-1] * 2]
SEQ_LEN, MAX_WINDOWS = 32, 4
TOL = 2e-5  # nats: fp32 on both sides, same bf16 weights (results keep 6 decimals)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(DOCS, vocab_size=300)


@pytest.fixture(scope="module")
def corpus(tokenizer, tmp_path_factory):
    """A corpus folder: heldout.tokens.npy and tokenizer/tokenizer.json, as build_corpus.sh."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "tokenizer").mkdir()
    tokenizer.save(str(root / "tokenizer" / "tokenizer.json"))
    np.save(root / "heldout.tokens.npy", encode_documents(tokenizer, DOCS * 2))
    return root


def save_model(tokenizer, family: str, path):
    cfg = MoeConfig(
        family=family,
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        num_experts=8,
        top_k=2,
        expert_intermediate_size=32,
        norm_topk_prob=family == "mixtral",
        max_position_embeddings=128,
    )
    model = MoeForCausalLM(cfg)
    model.init_weights(std=0.2, seed=3)  # spread routing and logits: int4 error shows
    save_hf_checkpoint(model, tokenizer, path)  # bf16, as training exports
    return path


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def model_dir(request, tokenizer, tmp_path_factory):
    return save_model(tokenizer, request.param, tmp_path_factory.mktemp(request.param))


def oracle_nll(model_dir, corpus, method: str | None = None) -> float:
    """The training evaluator's NLL on the test part; experts fake-quantized when method."""
    model = load_hf_checkpoint(model_dir).eval()
    if method is not None:
        h, i = model.cfg.hidden_size, model.cfg.expert_intermediate_size
        group = loading.int4_group_size(h, i)
        with torch.no_grad():
            for layer in model.layers:
                for w in (layer.moe.w_gate, layer.moe.w_up, layer.moe.w_down):
                    for e in range(w.shape[0]):
                        q = quantize_int4(w[e], group, method=method)
                        w[e] = dequantize_int4(*q, group, torch.bfloat16).float()
    _, test = split_heldout(read_tokens(corpus / "heldout.tokens.npy"), eos_id=0)
    return heldout_loss(model, test, SEQ_LEN, batch_size=8, max_windows=MAX_WINDOWS)


def run(model_dir, corpus, expert_dtype: str, method: str = "rtn") -> dict:
    return measure(
        str(model_dir),
        corpus / "heldout.tokens.npy",
        expert_dtype,
        method,
        seq_len=SEQ_LEN,
        device="cpu",
        dtype="float32",
        max_windows=MAX_WINDOWS,
    )


def test_bf16_nll_equals_training_evaluator(model_dir, corpus):
    result = run(model_dir, corpus, "bf16")
    assert result["tokens"] == MAX_WINDOWS * SEQ_LEN and result["group_size"] is None
    assert abs(result["nll"] - oracle_nll(model_dir, corpus)) < TOL, result
    assert result["ppl"] == pytest.approx(math.exp(result["nll"]), rel=1e-4)
    assert "encodes like" in result["tokenizer_check"]


@pytest.mark.parametrize("method", ["rtn", "clip"])
def test_int4_nll_equals_fake_quantized_training_model(model_dir, corpus, method):
    result = run(model_dir, corpus, "int4", method)
    expected = oracle_nll(model_dir, corpus, method)
    assert math.isfinite(result["nll"]) and result["group_size"] == 32
    assert result["method"] == method and loading.QUANT_METHOD == "rtn"  # restored
    assert abs(result["nll"] - expected) < TOL, (result, expected)
    # the oracle tells int4 from bf16 apart: quantization moved the NLL well past TOL
    assert abs(expected - oracle_nll(model_dir, corpus)) > 10 * TOL


def test_windows_are_the_training_test_split():
    ids = torch.tensor([5, 6, 7, 8, 9, 0, 10, 11, 0, 12, 13, 14, 15, 16, 17])  # eos = 0
    windows = heldout_windows(ids, eos_id=0, seq_len=2)  # test part: after the eos at 8
    assert windows.tolist() == [[12, 13, 14], [14, 15, 16]]
    assert heldout_windows(ids, eos_id=0, seq_len=2, max_windows=1).tolist() == [[12, 13, 14]]


def test_wrong_tokens_files_are_refused(model_dir, corpus, tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"build_corpus\.sh"):
        measure(str(model_dir), tmp_path / "missing.npy", seq_len=SEQ_LEN)
    big = tmp_path / "big" / "heldout.tokens.npy"
    big.parent.mkdir()
    np.save(big, np.full(200, tokenizer.get_vocab_size(), dtype=np.uint16))
    with pytest.raises(ValueError, match="vocab"):
        measure(str(model_dir), big, seq_len=SEQ_LEN)
    other = tmp_path / "other"
    (other / "tokenizer").mkdir(parents=True)
    train_tokenizer([d[::-1] for d in DOCS], 300).save(str(other / "tokenizer" / "tokenizer.json"))
    np.save(other / "heldout.tokens.npy", np.load(corpus / "heldout.tokens.npy"))
    with pytest.raises(ValueError, match="unlike the model's tokenizer"):
        measure(str(model_dir), other / "heldout.tokens.npy", seq_len=SEQ_LEN)


def test_cli_writes_json(model_dir, corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r.json"
    argv = ["perplexity", "--model", str(model_dir), "--tokens", str(corpus / "heldout.tokens.npy")]
    argv += ["--seq-len", str(SEQ_LEN), "--max-windows", "2", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    main()
    written = json.loads(out.read_text())
    assert written == json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert written["windows"] == 2 and written["dtype"] == "float32"
