"""transformers baselines on the same synthetic weights as ours (fully on the GPU, or offloaded)."""

from __future__ import annotations

import time
from typing import Any

import torch

from duoserve.config import ModelConfig
from duoserve.weights.checkpoint import SyntheticCheckpoint
from duoserve.weights.mapping import dense_param_table, expert_tensor_names


def hf_config(raw: dict[str, Any]):
    import transformers

    kwargs = {k: v for k, v in raw.items() if k not in ("architectures", "model_type", "dtype")}
    kwargs["eos_token_id"] = None  # generate exactly max_new_tokens
    return transformers.AutoConfig.for_model(raw["model_type"], **kwargs)


@torch.no_grad()
def fill_from_synthetic(model: torch.nn.Module, cfg: ModelConfig, seed: int, device: str) -> None:
    """Overwrite every parameter of a transformers model with our synthetic weights."""
    source = SyntheticCheckpoint(seed=seed, device=device)
    disk_of = {
        disk.replace("block_sparse_moe.", "mlp."): (disk, shape)
        for disk, shape in dense_param_table(cfg).values()
    }
    H, I = cfg.hidden_size, cfg.moe_intermediate_size
    for name, param in model.named_parameters():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            layer_id = int(name.split(".")[2])
            for e in range(cfg.num_experts):
                gate, up, down = expert_tensor_names(cfg, layer_id, e)
                if name.endswith("gate_up_proj"):
                    param[e, :I].copy_(source.get(gate, (I, H), device))
                    param[e, I:].copy_(source.get(up, (I, H), device))
                else:
                    param[e].copy_(source.get(down, (H, I), device))
            continue
        if name not in disk_of:
            raise KeyError(f"transformers parameter {name} has no synthetic counterpart")
        disk, shape = disk_of[name]
        param.copy_(source.get(disk, shape, device))


def build_hf_model(raw: dict[str, Any], seed: int, device: str = "cuda", **from_config: Any):
    """A transformers model of config `raw` holding exactly our synthetic weights."""
    import transformers

    cfg = ModelConfig.from_dict(raw)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            hf_config(raw), dtype=torch.bfloat16, **from_config
        )
    fill_from_synthetic(model, cfg, seed, device)
    return model.eval()


@torch.no_grad()
def time_hf_generate(model, prompt_ids: list[int], max_tokens: int, device: str = "cuda") -> dict:
    """TTFT (a 1-token generate) and decode speed (a max_tokens generate), greedy."""
    ids = torch.tensor([prompt_ids], device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    kw = dict(do_sample=False, pad_token_id=0)
    model.generate(ids[:, :16], max_new_tokens=2, min_new_tokens=2, **kw)  # warm up
    sync()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    sync()
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, **kw)
    sync()
    total = time.perf_counter() - t0
    decode_s = max(total - ttft, 1e-9)
    return {
        "ttft_s": ttft,
        "tpot_s": decode_s / (max_tokens - 1),
        "decode_tok_s": (max_tokens - 1) / decode_s,
        "e2e_s": total,
        "output_token_ids": out[0, len(prompt_ids) :].tolist(),
    }
