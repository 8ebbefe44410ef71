"""Bad checkpoints and configs get clear errors that name the file, tensor or key."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from duoserve import LLM
from duoserve.config import ConfigError
from duoserve.tokenizer import TokenizerError
from duoserve.weights.checkpoint import CheckpointError


@pytest.fixture
def model_copy(hf_checkpoints, tmp_path):
    path, _ = hf_checkpoints["olmoe"]
    dst = tmp_path / "m"
    shutil.copytree(path, dst)
    return dst


def _edit_config(path, **changes):
    raw = json.loads((path / "config.json").read_text())
    raw.update(changes)
    (path / "config.json").write_text(json.dumps(raw))


def _rewrite_tensor(path, name, fn):
    for f in path.glob("*.safetensors"):
        tensors = load_file(f)
        if name in tensors:
            new = fn(tensors.pop(name))
            if new is not None:
                tensors[name] = new
            save_file(tensors, f, metadata={"format": "pt"})
            return f
    raise AssertionError(name)


def test_unsupported_architecture(model_copy):
    _edit_config(model_copy, architectures=["LlamaForCausalLM"])
    with pytest.raises(
        ConfigError, match=r"config\.json: unsupported architecture 'LlamaForCausalLM'"
    ):
        LLM(str(model_copy), device="cpu")


def test_malformed_config(model_copy):
    (model_copy / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="malformed JSON"):
        LLM(str(model_copy), device="cpu")
    _edit_config_raw = {"architectures": ["OlmoeForCausalLM"], "hidden_size": "big"}
    (model_copy / "config.json").write_text(json.dumps(_edit_config_raw))
    with pytest.raises(ConfigError, match="'hidden_size' must be int"):
        LLM(str(model_copy), device="cpu")


def test_bad_values_in_config(model_copy):
    _edit_config(model_copy, num_experts_per_tok=99)
    with pytest.raises(ConfigError, match=r"num_experts_per_tok \(99\)"):
        LLM(str(model_copy), device="cpu")


def test_unsupported_rope(model_copy):
    _edit_config(model_copy, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4})
    with pytest.raises(ConfigError, match="rope type 'yarn' is not supported"):
        LLM(str(model_copy), device="cpu")


def test_missing_tensor(model_copy):
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    _rewrite_tensor(model_copy, name, lambda t: None)
    (model_copy / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match=f"missing tensor '{name}'"):
        LLM(str(model_copy), device="cpu")


def test_wrong_shape(model_copy):
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite_tensor(model_copy, name, lambda t: t[:-1])
    with pytest.raises(
        CheckpointError, match=rf"'{name}' has shape \(15, 32\), expected \(16, 32\)"
    ):
        LLM(str(model_copy), device="cpu")


def test_wrong_dtype(model_copy):
    name = "model.norm.weight"
    _rewrite_tensor(model_copy, name, lambda t: t.to(torch.int32))
    with pytest.raises(CheckpointError, match=f"'{name}' has dtype torch.int32"):
        LLM(str(model_copy), device="cpu")


def test_unused_tensor_is_reported(model_copy):
    _rewrite_tensor(model_copy, "model.norm.weight", lambda t: t)
    f = next(model_copy.glob("*.safetensors"))
    tensors = load_file(f)
    tensors["model.extra.weight"] = torch.zeros(2)
    save_file(tensors, f, metadata={"format": "pt"})
    (model_copy / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match=r"does not use: model\.extra\.weight"):
        LLM(str(model_copy), device="cpu")


def test_pickle_only_checkpoint_is_refused(model_copy):
    for f in model_copy.glob("*.safetensors*"):
        f.unlink()
    (model_copy / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: pickle checkpoints are never"):
        LLM(str(model_copy), device="cpu")


def test_malformed_tokenizer(model_copy):
    (model_copy / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: cannot be parsed"):
        LLM(str(model_copy), device="cpu")
    (model_copy / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="not found"):
        LLM(str(model_copy), device="cpu")


def test_over_long_prompt_uses_vllm_wording(hf_checkpoints):
    from duoserve import SamplingParams
    from duoserve.engine.llm_engine import RequestError

    path, _ = hf_checkpoints["olmoe"]
    llm = LLM(str(path), device="cpu", max_model_len=32)
    with pytest.raises(RequestError, match="maximum context length is 32 tokens"):
        llm.generate([[1] * 30], SamplingParams(max_tokens=8))
    with pytest.raises(RequestError, match=r"token ids must be in \[0, 300\)"):
        llm.generate([[1, 999]], SamplingParams(max_tokens=1))
    assert not llm.engine.has_unfinished_requests()
